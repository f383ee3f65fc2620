"""Counts the top-level operations (what a GPU runs as separate kernels, roughly) of the compiled MiniLM
train step, for one trial and for K trials vmapped (a trial group), on a few SST-2 rows: the steps the
trainer runs (`runs.SingleRun` and `trial_group.TrialGroup`), lowered for their abstract states.

  python -m bertjax.bench.count_step_ops [--k 4] [--rows 3000]

The input for docs/trial_groups.md's GPU estimate: a vmapped group runs about the same number of
operations as one trial, each K times larger.
"""

import argparse
import re
import tempfile
from pathlib import Path


from bertjax import sharding
from bertjax.config_base import call_python_file
from bertjax.runs import SingleRun
from bertjax.trial_group import TrialGroup

REPO = Path(__file__).resolve().parents[2]
SKIP = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}


def top_level_ops(compiled_text: str) -> int:
  entry = compiled_text[compiled_text.index("ENTRY"):]
  body = entry[:entry.index("\n}")].splitlines()[1:]
  kinds = [re.search(r"= \S+ ([\w-]+)\(", line) for line in body]
  return sum(1 for k in kinds if k and k.group(1) not in SKIP)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--rows", type=int, default=3000)
  p.add_argument("--data", default=str(REPO.parent / "shared/data/sst2/train.tsv"))
  args = p.parse_args()
  tmp = Path(tempfile.mkdtemp())
  lines = Path(args.data).read_text(encoding="utf-8").splitlines()[:args.rows + 1]
  (tmp / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  configs = []
  for k in range(args.k):  # K learning rates: what a group's trials differ in
    config = call_python_file(str(REPO / "configs/minilm_sst2.py"), "get_config", "config file")
    config.data.train, config.data.eval = str(tmp / "train.tsv"), ""
    config.optimizer.learning_rate *= 2.0 ** k
    configs.append(config)
  group = TrialGroup(configs, [str(tmp / f"trial{k}") for k in range(args.k)], str(tmp / "group"))
  single = SingleRun(group.lead)
  batcher = group.lead.data.train.batcher
  batch = sharding.global_batch(next(batcher.iterate(0)), sharding.batch_sharding(group.lead.mesh))
  for name, runs, state in (("1 trial", single, group.lead.abstract_state()),
                            (f"{args.k} trials vmapped", group, group.abstract)):
    compiled = runs.jit_train_step().lower(state, batch).compile()
    print(f"{name}: {top_level_ops(compiled.as_text())} top-level ops (batch {list(batch.shape[:2])}, "
          f"{group.lead.grad_accum_steps} micro-batches)")


if __name__ == "__main__":
  main()
