"""Speed of a trial group (K trials as one vmapped step) against the same K trials run one after another.

  python -m bertjax.bench.trial_group --model tiny --k 4 --steps 40 --out runs/bench_trial_group_tiny.json
  python -m bertjax.bench.trial_group --model minilm --k 4 --steps 20 --train_rows 2000 \
      --out runs/bench_trial_group_minilm.json

Both modes train the same K configs (learning rates base * 2**(k - 1), train.seed k, data.shuffle_seed 0)
on the same data, in this process, each in fresh workdirs under --root: first the K single runs
(`trainer.train_and_evaluate`, one after another), then the group (`trial_group.train_group`). No
persistent compilation cache, so each single run compiles its own step, as separate `bertjax.train`
processes without the cache would. The JSON holds each mode's wall seconds (setup, compile, train,
eval, checkpoints), train seconds (step time only, from the summaries), compile seconds, the
speed-ups, how far the group's final eval losses are from the single runs', and the load average.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SST2 = REPO.parent / "shared" / "data" / "sst2"


def tiny_setup(root: Path, args):
  sys.path.insert(0, str(REPO / "tests"))
  from conftest import tiny_bert_with_tokenizer
  from bertjax import demo_data
  from bertjax.config_base import base_config
  demo_data.write(root / "data", args.train_rows or 512, args.eval_rows or 100, seed=0)
  c = base_config()
  c.model.name_or_path = str(tiny_bert_with_tokenizer(root / "model"))
  c.data.max_length = 32
  c.train.global_batch_size = 16
  c.optimizer.learning_rate = 3e-3
  return c


def minilm_setup(root: Path, args):
  from bertjax.config_base import base_config, minilm_path
  (root / "data").mkdir(parents=True)
  for name, rows in (("train.tsv", args.train_rows or 2000), ("dev.tsv", args.eval_rows or 200)):
    lines = (SST2 / name).read_text().splitlines()
    (root / "data" / name).write_text("\n".join(lines[:rows + 1]) + "\n")  # header + rows
  c = base_config()
  c.model.name_or_path = minilm_path()
  c.data.max_length = 64
  c.train.global_batch_size = 32
  c.optimizer.learning_rate = 5e-5
  return c


def configs(base, root: Path, args) -> list:
  out = []
  for k in range(args.k):
    c = base.copy_and_resolve_references()
    c.data.train, c.data.eval = str(root / "data" / "train.tsv"), str(root / "data" / "dev.tsv")
    c.data.shuffle_seed = 0
    c.train.seed = k
    c.train.max_steps = args.steps
    c.train.eval_every_steps = args.steps  # one eval and one checkpoint, at the end
    c.train.log_every_steps = 10
    c.optimizer.learning_rate = base.optimizer.learning_rate * 2.0 ** (k - 1)
    out.append(c)
  return out


def timing(summaries: list[dict], wall: float) -> dict:
  return {"wall_seconds": wall,
          "train_seconds": summaries[0]["train_seconds"] if "trial_group" in summaries[0]
          else sum(s["train_seconds"] for s in summaries),
          "compile_seconds": summaries[0]["compile_seconds"] if "trial_group" in summaries[0]
          else sum(s["compile_seconds"] for s in summaries),
          "final_eval_loss": [s["final"]["eval_loss"] for s in summaries]}


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--train_rows", type=int, default=0, help="0 = 512 (tiny) / 2000 (minilm)")
  p.add_argument("--eval_rows", type=int, default=0, help="0 = 100 (tiny) / 200 (minilm)")
  p.add_argument("--matmul_dtype", default="auto", help="model.matmul_dtype of every run")
  p.add_argument("--root", default="/tmp/bench_trial_group")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  from bertjax import trainer, trial_group

  root = Path(args.root) / args.model
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  base = (tiny_setup if args.model == "tiny" else minilm_setup)(root, args)
  base.model.matmul_dtype = args.matmul_dtype
  cfgs = configs(base, root, args)
  load_before = os.getloadavg()

  t = time.perf_counter()
  singles = [trainer.train_and_evaluate(c, str(root / f"single{k}")) for k, c in enumerate(cfgs)]
  sequential = timing(singles, time.perf_counter() - t)
  t = time.perf_counter()
  group = trial_group.train_group(cfgs, [str(root / f"group{k}") for k in range(args.k)])
  grouped = timing(group, time.perf_counter() - t)

  s0 = singles[0]
  report = {
      "command": " ".join([sys.executable, "-m", "bertjax.bench.trial_group", *argv]),
      "model": args.model, "k": args.k, "steps": args.steps, "global_batch_size": s0["global_batch_size"],
      "max_length": cfgs[0].data.max_length, "num_train_examples": s0["num_train_examples"],
      "num_eval_examples": s0["num_eval_examples"],
      "sequential": sequential, "group": grouped,
      "speedup_wall": sequential["wall_seconds"] / grouped["wall_seconds"],
      "speedup_train": sequential["train_seconds"] / grouped["train_seconds"],
      "max_abs_final_eval_loss_diff": max(abs(a - b) for a, b in zip(sequential["final_eval_loss"],
                                                                  grouped["final_eval_loss"])),
      "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  print(json.dumps({k: report[k] for k in ("speedup_wall", "speedup_train", "max_abs_final_eval_loss_diff")}))
  return report


if __name__ == "__main__":
  from bertjax.host_memory import keep_freed_memory
  keep_freed_memory()  # as the train CLI does, before jax creates its CPU client
  main()
