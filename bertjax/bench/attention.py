"""Times the attention implementations (`model.attention`) side by side in one process: the MiniLM train
step and eval forward on packed rows, alternating implementations so load drifts hit all alike.

  python -m bertjax.bench.attention [--rows 5,43] [--repeats 5] [--calls 10] [--impls einsum,xla] \
      [--model FOLDER (default all-MiniLM-L6-v2)] [--json OUT]

Rows of 80 tokens, as SST-2 packed at batch 32 (5 rows) and 256 (43 rows) when this was measured, hold
examples of SST-2-like lengths (4-66 tokens, mean ~14, at most 16 per row). Both implementations train
without attention dropout (the fused ones have none); hidden dropout stays on. Prints median milliseconds
per call, the median over repeats of each repeat's ratio to the first implementation (with their range),
and JSON (also written to --json).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bertjax import config_base, models, optim
from bertjax.data.batching import SLOT_FIELDS, TOKEN_FIELDS, Batch
from bertjax.models.config import resolve_matmul_dtype
from bertjax.models.layers import cast_kernels
from bertjax.step import make_eval_step, make_train_step, new_train_state


ROW, SLOTS = 80, 16


def packed_rows(rows: int, seed: int = 0) -> Batch:
  """A packed batch of `rows` rows of ROW tokens filled with examples of 4-66 tokens (SST-2-like)."""
  rng = np.random.default_rng(seed)
  data = np.zeros((rows, 4, ROW + SLOTS), np.int32)  # the Batch layout: token fields, then slot fields
  token = lambda name: data[:, TOKEN_FIELDS.index(name), :ROW]  # views into data
  slot = lambda name: data[:, SLOT_FIELDS.index(name), ROW:]
  ids, segments, positions = token("input_ids"), token("segment_ids"), token("position_ids")  # types stay 0
  cls_index, labels, mask, example_ids = (slot(name) for name in SLOT_FIELDS)
  example_ids[:] = -1
  for r in range(rows):
    start = 0
    for k in range(SLOTS):
      n = int(min(rng.geometric(1 / 11) + 3, 66))
      if start + n > ROW:
        break
      ids[r, start:start + n] = rng.integers(1000, 30000, n)
      segments[r, start:start + n] = k + 1
      positions[r, start:start + n] = np.arange(n)
      cls_index[r, k], mask[r, k], example_ids[r, k] = start, 1, r * SLOTS + k
      labels[r, k] = np.float32(rng.integers(2)).view(np.int32)
      start += n
  return Batch(data, SLOTS)


def median_ms(fn, args, calls: int) -> float:
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", default="5,43")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--impls", default="einsum,xla")
  p.add_argument("--model", default="", help="a BERT-layout model folder (default: all-MiniLM-L6-v2)")
  p.add_argument("--json", default="", help="also write the result here")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  impls = args.impls.split(",")
  loaded = models.load(args.model or config_base.minilm_path(), num_labels=2)
  cfg = loaded.cfg.replace(attention_dropout=0.0, matmul_dtype=resolve_matmul_dtype("auto", "float32"))
  plan = optim.plan_optimizer(config_base.base_config().optimizer, total_steps=1000, global_batch_size=32)
  tx, schedule = optim.build_optimizer(plan, plan.hparams, loaded.params)
  params = jax.device_put(loaded.params)
  state = new_train_state(params, tx, seed=0)
  eval_params = jax.jit(lambda p: cast_kernels(cfg, p))(params)
  result = {"cpu": models.config.cpuinfo_value("model name"), "matmul_dtype": cfg.matmul_dtype,
            "row_length": ROW, "repeats": args.repeats, "calls": args.calls, "ms": {}, "ratios": {}}
  for rows in map(int, args.rows.split(",")):
    batch = jax.device_put(packed_rows(rows))
    length = batch.length
    steps = {}
    for impl in impls:
      model = models.SequenceClassifier(cfg.replace(attention=impl))
      train = jax.jit(make_train_step(model, tx, schedule, regression=False))  # no donation: state reused
      forward = jax.jit(make_eval_step(model))
      steps[impl] = {"train": (train, (state, batch)), "eval": (forward, (eval_params, batch))}
      for fn, fn_args in steps[impl].values():
        jax.block_until_ready(fn(*fn_args))  # compile
    samples = {(impl, kind): [] for impl in impls for kind in ("train", "eval")}
    for _ in range(args.repeats):
      for impl in impls:
        for kind, (fn, fn_args) in steps[impl].items():
          samples[impl, kind].append(median_ms(fn, fn_args, args.calls))
    for kind in ("train", "eval"):
      base = samples[impls[0], kind]
      for impl in impls:
        ms = statistics.median(samples[impl, kind])
        # Each repeat's ratio to the first implementation, timed right next to it: robust to load drifts.
        ratios = sorted(a / b for a, b in zip(samples[impl, kind], base))
        result["ms"][f"{kind}_rows{rows}_{impl}"] = ms
        result["ratios"][f"{kind}_rows{rows}_{impl}"] = ratios
        print(f"{kind:5s} [{rows}, {length}] {impl:7s} {ms:8.1f} ms  {statistics.median(ratios):.3f}x {impls[0]} "
              f"(repeats {ratios[0]:.3f}-{ratios[-1]:.3f})", flush=True)
  print(json.dumps(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
  return result


if __name__ == "__main__":
  main()
