"""The host side of training alone, per host: planning, batch building and host-to-device copies.

  python -m bertjax.bench --config configs/minilm_sst2.py --input_only --json OUT.json \
      --config.data.train=../shared/data/sst2/train.tsv --config.train.global_batch_size=1024

Reads and tokenizes the training split as a run would (the token cache included), then times, on fresh
epochs each: planning an epoch alone; building its batches alone (its plan ready); copying built batches
to the devices alone; and end to end, the trainer's own pipeline over `--input_epochs` consecutive epochs
(batches built and copied in the prefetch thread, each next epoch planned in the background, the main
thread taking every batch as a train loop does, with no model). `input_examples_per_sec` is the end-to-end
figure: the most examples per second this host could feed its devices.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import jax
import numpy as np

from bertjax import sharding
from bertjax.data.prefetch import CHUNK, Prefetch


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def measure(config, workdir: Path, epochs: int = 3, repeats: int = 3) -> dict:
  """Host-side rates of `config`'s training split on this process; `workdir` holds the token cache."""
  from bertjax.trainer import build_inputs

  t = time.perf_counter()
  inputs = build_inputs(config, workdir, workdir / "cache")
  mesh, data = inputs.mesh, inputs.data
  setup_seconds = time.perf_counter() - t
  batcher = data.train.batcher
  batch_sharding = sharding.batch_sharding(mesh)
  examples = len(batcher.lengths)
  fresh = iter(range(1000, 10 ** 6))  # epochs not planned yet

  def end_to_end() -> float:
    first = next(fresh)
    for _ in range(epochs - 1):
      next(fresh)
    t = time.perf_counter()
    last = None
    for epoch in range(first, first + epochs):
      batches = Prefetch(batcher.iterate(epoch), lambda chunk: sharding.global_batches(chunk, batch_sharding))
      try:
        for last in batches:
          pass
      finally:
        batches.close()
    jax.block_until_ready(last)
    return time.perf_counter() - t

  def build_only() -> float:
    epoch = next(fresh)
    batcher.steps_in_epoch(epoch), batcher.steps_in_epoch(epoch + 1)  # both planned: iterate plans nothing
    next(fresh)
    return _timed(lambda: sum(1 for _ in batcher.iterate(epoch)))

  def copy_only() -> float:
    built = list(batcher.iterate(next(fresh)))
    t = time.perf_counter()
    jax.block_until_ready([sharding.global_batches(built[i:i + CHUNK], batch_sharding)
                           for i in range(0, len(built), CHUNK)])  # in the prefetch thread's chunks
    return time.perf_counter() - t

  plan = [_timed(lambda: batcher.steps_in_epoch(next(fresh))) for _ in range(repeats)]
  build = [build_only() for _ in range(repeats)]
  copy = [copy_only() for _ in range(repeats)]
  whole = [end_to_end() for _ in range(repeats)]
  steps = batcher.steps_per_epoch()
  rate = lambda seconds, count=1: count * examples / statistics.median(seconds)
  return {
      "input_examples_per_sec": rate(whole, epochs),
      "plan_examples_per_sec": rate(plan),
      "build_examples_per_sec": rate(build),
      "copy_examples_per_sec": rate(copy),
      "seconds_per_epoch": {"plan": statistics.median(plan), "build": statistics.median(build),
                            "copy": statistics.median(copy), "end_to_end": statistics.median(whole) / epochs},
      "epochs_end_to_end": epochs, "repeats": repeats,
      "num_train_examples": examples, "steps_per_epoch": steps,
      "mean_examples_per_step": examples / steps, "global_batch_size": config.train.global_batch_size,
      "batch_shape": list(batcher.shapes()[0]), "packing": batcher.packing,
      "padding_fraction_epoch0": batcher.padding_fraction(0),
      "mean_train_length": float(np.mean(batcher.lengths)),
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "local_devices": jax.local_device_count(), "backend": jax.default_backend(),
      "read_and_tokenize_seconds": setup_seconds,
  }


def print_table(r: dict) -> None:
  s = r["seconds_per_epoch"]
  print(f"host pipeline, {r['num_train_examples']} examples, batch {r['global_batch_size']} "
        f"({r['mean_examples_per_step']:.1f} examples per step, rows {r['batch_shape'][:2]}), "
        f"process {r['process_index']} of {r['process_count']}:")
  print(f"  seconds per epoch: plan {s['plan']:.3f}, build {s['build']:.3f}, copy {s['copy']:.3f}, "
        f"end to end {s['end_to_end']:.3f}")
  print(f"  input_examples_per_sec {r['input_examples_per_sec']:,.0f} (plan alone {r['plan_examples_per_sec']:,.0f}, "
        f"build alone {r['build_examples_per_sec']:,.0f}, copy alone {r['copy_examples_per_sec']:,.0f})")
