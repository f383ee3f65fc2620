"""Counts the top-level operations (what a GPU runs as separate kernels, roughly) of the compiled
MiniLM train step, for one trial and for K trials vmapped (a trial group), on a few SST-2 rows.

  python scripts/count_step_ops.py [--k 4] [--rows 3000]

The input for docs/trial_groups.md's GPU estimate: a vmapped group runs about the same number of
operations as one trial, each K times larger.
"""

import argparse
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from bertjax.config_base import call_python_file
from bertjax.step import make_train_step
from bertjax.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
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
  config = call_python_file(str(REPO / "configs/minilm_sst2.py"), "get_config", "config file")
  config.data.train, config.data.eval = str(tmp / "train.tsv"), ""
  tr = Trainer(config, str(tmp / "work"))
  state, _ = tr._init_state()
  batch = next(tr.data.train.batcher.iterate(0))
  one = make_train_step(tr.model, tr.tx, tr.schedule, tr.regression, 1)
  group = jax.vmap(one, in_axes=(0, None))
  stacked = jax.tree.map(lambda x: jnp.stack([x] * args.k), state)
  for name, fn, st in (("1 trial", one, state), (f"{args.k} trials vmapped", group, stacked)):
    print(f"{name}: {top_level_ops(jax.jit(fn).lower(st, batch).compile().as_text())} top-level ops "
          f"(batch {list(batch.shape[:2])})")


if __name__ == "__main__":
  main()
