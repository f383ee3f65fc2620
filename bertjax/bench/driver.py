"""Training and eval throughput of bertjax next to a Hugging Face PyTorch loop, in one run.

  python -m bertjax.bench --config configs/minilm_sst2.py --peer torch --json runs/bench.json \
      --config.data.train=../shared/data/sst2/train.tsv --config.data.eval=../shared/data/sst2/dev.tsv \
      [--steps 150] [--warmup 10] [--repeats 3] [--profile]

Two worker processes (bertjax.bench.workers) hold the two trainers: bertjax (the trainer's own data pipeline,
optimizer, sharding and jitted train step, through its public `Trainer` and `runs.SingleRun`) and
`bertjax.bench.peer_torch`. They take turns, so
only one computes at a time: each round runs one block of `--steps` bertjax steps, then the torch
loop on exactly the same examples with dynamic padding, then with length grouping (rounds alternate
which side goes first); the report takes the median block. bertjax's steps decide the examples (with
packing, `global_batch_size` examples per step on average); torch batches them `global_batch_size`
at a time in the same order. Eval runs the whole eval split through bertjax's jitted Evaluator and
through torch no_grad inference with dynamic padding, once per round.

When bertjax's products take bfloat16 operands (`model.matmul_dtype`, `auto` on a CPU with AMX-BF16 or
AVX512-BF16), torch runs twice per block, in float32 and under torch.autocast(bfloat16) (the Trainer's
bf16=True), each with its own model and optimizer, and each ratio is against torch's faster precision
(`--peer_dtypes` chooses). MFU uses `bertjax.flops` and the float32 matmul peak measured by the
bertjax worker in the same run (`bertjax.matmul_peak.measure_matmul_peak`, not the trainer's cached
figure); `mfu_own_dtype` divides by the peak of each side's operand dtype.
`--profile` adds where a bertjax step's time goes (step variants timed on one fixed batch).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from bertjax.bench.workers import PREFIX, jax_worker, torch_worker
from bertjax.errors import UserError, exit_on_user_error
from bertjax.host_memory import keep_freed_memory
from bertjax.models.config import cpu_has_bf16_dot, cpuinfo_value

# Above this global batch the torch peer accumulates gradients over these micro-batches instead of taking the
# batch whole, as a Trainer user at a large batch would; the headline ratios are against its fastest setting.
# On SST-2 with MiniLM at batch 1024 (docs/performance.md) micro-batches of 64 and 128 ran 1.1-1.2x faster than
# 32 or 256 and 5x faster than the whole batch.
WHOLE_BATCH_UP_TO = 128
TORCH_MICRO_BATCHES = (64, 128)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_enum("peer", "torch", ["torch"], "The trainer to compare with.")
flags.DEFINE_string("json", None, "Where to write the results.")
flags.DEFINE_integer("steps", 150, "bertjax train steps per measured block.")
flags.DEFINE_integer("warmup", 10, "Untimed bertjax steps (and their examples in torch) before the blocks.")
flags.DEFINE_integer("repeats", 3, "Measured rounds; the report gives the median block.")
flags.DEFINE_bool("eval", True, "Also time eval over data.eval (if set).")
flags.DEFINE_bool("profile", False, "Also time variants of the bertjax step on one batch.")
flags.DEFINE_string("workdir", None, "Token cache and plan files (default: a temporary directory).")
flags.DEFINE_bool("peer_keep_freed_memory", False,
                  "Give the peer's process the malloc setting bertjax's worker uses (bertjax.host_memory).")
flags.DEFINE_list("peer_dtypes", None,
                  "torch precisions to run: float32 and/or bfloat16 (torch.autocast, as the Trainer's bf16=True). "
                  "Default: float32, and also bfloat16 when bertjax's matmuls are bfloat16 (model.matmul_dtype).")
flags.DEFINE_list("peer_micro_batches", None,
                  "torch's micro-batch sizes, each a variant (the Trainer's per_device_train_batch_size with "
                  "gradient_accumulation_steps); 0 is the whole batch in one step. Default: 0 up to batch "
                  f"{WHOLE_BATCH_UP_TO}; above it {','.join(map(str, TORCH_MICRO_BATCHES))}.")
flags.DEFINE_bool("input_only", False, "Time the host side alone (plan, batches, host-to-device copies; "
                  "bertjax.bench.host_input), with no model and no peer.")
flags.DEFINE_integer("input_epochs", 3, "With --input_only: consecutive epochs timed end to end.")
flags.DEFINE_enum("worker", None, ["jax", "torch"], "Internal: run as a worker process.")
FLAGS = flags.FLAGS

# ----- the driver ----------------------------------------------------------------------------


class Worker:
  """A worker process; `call` sends one command and waits for its result line."""

  def __init__(self, kind: str, workdir: Path):
    passed, skip = [], False
    for a in sys.argv[1:]:  # the driver's own flags stay here, in `--f=v` or `--f v` form
      own = a.split("=")[0] in ("--worker", "--workdir", "--json")
      if not (skip or own):
        passed.append(a)
      skip = own and "=" not in a
    cmd = [sys.executable, "-m", "bertjax.bench", *passed, f"--worker={kind}", f"--workdir={workdir}"]
    self.kind = kind
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.ready = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(PREFIX):
        return json.loads(line[len(PREFIX):])
      sys.stderr.write(line)
    raise UserError(f"the {self.kind} worker exited with code {self.proc.wait()} (its errors are above)")

  def call(self, op: str, **args) -> dict:
    self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def _machine() -> dict:
  """The CPU's model and flags: benches on different CPUs are not comparable in examples/s."""
  return {"cpus": os.cpu_count(), "cpu": cpuinfo_value("model name") or platform.processor(),
          "bf16_dot": cpu_has_bf16_dot(), "platform": platform.platform()}


def _eval_name(dtype: str) -> str:
  return "torch" if dtype == "float32" else "torch_bf16"


def _summary(blocks: list[dict]) -> dict:
  """Medians over blocks of examples/s and tokens/s, and the padding share."""
  median = lambda key: statistics.median(b[key] / b["seconds"] for b in blocks)
  out = {"train_examples_per_sec": median("examples"), "train_tokens_per_sec": median("tokens"),
         "padding_fraction": 1.0 - sum(b["tokens"] for b in blocks) / sum(b["slots"] for b in blocks),
         "block_seconds": [b["seconds"] for b in blocks],
         "steps_per_block": blocks[0]["steps"], "examples_per_block": [b["examples"] for b in blocks]}
  return out


def _peer_micro_batches(global_batch: int) -> list[int]:
  """torch's micro-batch sizes (--peer_micro_batches or the default); 0 is the whole batch."""
  if FLAGS.peer_micro_batches is not None:
    return [int(m) for m in FLAGS.peer_micro_batches]
  return list(TORCH_MICRO_BATCHES) if global_batch > WHOLE_BATCH_UP_TO else [0]


def drive(config, workdir: Path) -> dict:
  if config.data.eval == "" and FLAGS.eval:
    FLAGS.eval = False
  t0, load_before = time.time(), os.getloadavg()
  jx = Worker("jax", workdir)
  th = None
  try:
    th = Worker("torch", workdir)
    peer_dtypes = jx.ready["peer_dtypes"]
    # (name, grouped, dtype, micro-batch) of each torch variant; float32 at the whole batch keeps the old names
    micro = _peer_micro_batches(config.train.global_batch_size)
    peers = [(f"torch_{mode}{'' if dtype == 'float32' else '_bf16'}{f'_micro{m}' if m else ''}", mode == "grouped",
              dtype, m) for dtype in peer_dtypes for m in micro for mode in ("dynamic", "grouped")]
    # What the Trainer's grouping pads over a whole epoch (megabatches of 50 batches) at each micro-batch, against
    # the bench's grouping within a block of --steps batches (more padding when --steps < 50).
    epoch_padding = th.call("epoch_padding", micro_batches=micro)
    runs = {"bertjax": [], **{name: [] for name, *_ in peers}}
    evals = {"bertjax": [], **{_eval_name(dtype): [] for dtype in peer_dtypes}}
    for r in range(FLAGS.repeats):
      order = ["bertjax", *[p[0] for p in peers]]
      for name in order if r % 2 == 0 else order[::-1]:
        if name == "bertjax":
          runs[name].append(jx.call("train", block=r))
        else:
          _, grouped, dtype, m = next(p for p in peers if p[0] == name)
          runs[name].append(th.call("train", block=r, grouped=grouped, dtype=dtype, micro_batch=m or None))
        b = runs[name][-1]
        print(f"round {r + 1}/{FLAGS.repeats} {name}: {b['examples'] / b['seconds']:.1f} examples/s "
              f"({b['seconds']:.1f}s, load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
      if FLAGS.eval:
        order = ["bertjax", *peer_dtypes]
        for who in order if r % 2 == 0 else order[::-1]:
          if who == "bertjax":
            evals[who].append(jx.call("eval"))
          else:
            evals[_eval_name(who)].append(th.call("eval", dtype=who))
    again = jx.call("peak")["matmul_peak_flops"]
    peaks = {dtype: max(flops, again[dtype]) for dtype, flops in jx.ready["matmul_peak_flops"].items()}
    profile = jx.call("profile") if FLAGS.profile else None
  finally:
    jx.close()
    if th is not None:
      th.close()
  digests = [[b["ids"] for b in blocks] for blocks in runs.values()]
  peak = peaks["float32"]
  result = {
      "command": " ".join(["python -m bertjax.bench", *sys.argv[1:]]),
      "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0)),
      # The CPU's model: benches on different CPUs are not comparable in examples/s.
      "machine": {**_machine(), "jax": jx.ready["jax"], "torch": th.ready["torch"],
                  "torch_threads": th.ready["threads"],
                  "torch_interop_threads": th.ready["interop_threads"],
                  # bertjax.host_memory's malloc setting in each worker process
                  "keeps_freed_memory": {"bertjax": jx.ready["keeps_freed_memory"],
                                         "torch": th.ready["keeps_freed_memory"]},
                  # Other work on the machine skews both sides; the 1-minute load should stay near 1.
                  "load_average_before": load_before, "load_average_after": os.getloadavg()},
      "setup": {"model_name_or_path": config.model.name_or_path, "model": jx.ready["model"],
                "train": config.data.train, "eval": config.data.eval if FLAGS.eval else None,
                "max_length": config.data.max_length, "global_batch_size": config.train.global_batch_size,
                "packing": config.data.packing, "rows_per_step": jx.ready["rows_per_step"],
                "row_length": jx.ready["row_length"],
                "dtype": jx.ready["dtype"], "matmul_dtype": jx.ready["matmul_dtype"], "peer_dtypes": peer_dtypes,
                "peer_micro_batches": micro, "grad_accum_steps": jx.ready["grad_accum_steps"],
                "steps_per_block": FLAGS.steps, "warmup_steps": FLAGS.warmup, "repeats": FLAGS.repeats,
                "train_padding_fraction_epoch0": jx.ready["padding_fraction_epoch0"],
                "mean_train_length": jx.ready["mean_train_length"]},
      # MFU divides by the float32 peak (the definition) and, as mfu_own_dtype, by the peak of the
      # operand dtype bertjax's products use; both measured in this run (best of two measurements).
      "matmul_peak_flops": peak,
      "matmul_peak_flops_by_dtype": peaks,
      "same_examples": all(d == digests[0] for d in digests),
      **{name: _summary(blocks) for name, blocks in runs.items()},
      "blocks": runs,
  }
  for name, grouped, _, m in peers:
    if grouped:
      result[name]["trainer_epoch_padding_fraction"] = epoch_padding[str(m)]
  flops_per_example = statistics.median(b["flops"] / b["examples"] for b in runs["bertjax"])
  own_dtype = {"bertjax": jx.ready["matmul_dtype"], **{name: dtype for name, _, dtype, _ in peers}}
  for name in runs:  # same examples, same model FLOPs
    eps = result[name]["train_examples_per_sec"]
    result[name]["mfu"] = eps * flops_per_example / peak
    result[name]["mfu_own_dtype"] = eps * flops_per_example / peaks[own_dtype[name]]
  jax_eps = result["bertjax"]["train_examples_per_sec"]
  fastest = lambda mode: max((n for n, *_ in peers if mode in n), key=lambda n: result[n]["train_examples_per_sec"])
  # The headline ratios are against torch's faster precision (named in *_peer); ratios_by_peer has each.
  result["ratios"], result["ratios_by_peer"] = {}, {"train": {}, "eval": {}}
  for mode in ("dynamic", "grouped"):
    result["ratios"][f"train_vs_torch_{mode}"] = jax_eps / result[fastest(mode)]["train_examples_per_sec"]
    result["ratios"][f"train_vs_torch_{mode}_peer"] = fastest(mode)
  for name, *_ in peers:
    result["ratios_by_peer"]["train"][name] = jax_eps / result[name]["train_examples_per_sec"]
  if FLAGS.eval:
    rates = {name: statistics.median(e["examples"] / e["seconds"] for e in es) for name, es in evals.items()}
    result["bertjax"]["eval_examples_per_sec"] = rates["bertjax"]
    result["bertjax"]["eval_padding_fraction"] = jx.ready["eval_padding_fraction"]
    # Eval MFU: the model's forward FLOPs of the eval split (real tokens) per second over the peak of each
    # side's operand dtype. At 100% of that peak bertjax would be `eval_vs_torch_at_own_peak` x torch's best.
    per_example = jx.ready["eval_forward_flops"] / evals["bertjax"][0]["examples"]
    result["bertjax"]["eval_mfu_own_dtype"] = rates["bertjax"] * per_example / peaks[own_dtype["bertjax"]]
    for dtype in peer_dtypes:
      # kept with the dtype's first dynamic-padding variant (eval takes no micro-batches)
      side = result[next(name for name, grouped, d, _ in peers if d == dtype and not grouped)]
      side["eval_examples_per_sec"] = rates[_eval_name(dtype)]
      side["eval_mfu_own_dtype"] = rates[_eval_name(dtype)] * per_example / peaks[dtype]
    best = max((n for n in rates if n != "bertjax"), key=rates.get)
    result["ratios"]["eval_vs_torch"] = rates["bertjax"] / rates[best]
    result["ratios"]["eval_vs_torch_peer"] = best
    result["ratios"]["eval_vs_torch_at_own_peak"] = peaks[own_dtype["bertjax"]] / (rates[best] * per_example)
    for name in rates:
      if name != "bertjax":
        result["ratios_by_peer"]["eval"][name] = rates["bertjax"] / rates[name]
    result["evals"] = evals
  if profile is not None:
    result["profile"] = profile
  return result


def _print_table(r: dict) -> None:
  print(f"{'':24s} {'train ex/s':>10s} {'tokens/s':>9s} {'padding':>8s} {'MFU f32':>8s} {'MFU own':>8s} "
        f"{'eval ex/s':>10s}")
  for name in r["blocks"]:
    s = r[name]
    ev = s.get("eval_examples_per_sec")
    print(f"{name:24s} {s['train_examples_per_sec']:10.1f} {s['train_tokens_per_sec']:9.0f} "
          f"{s['padding_fraction']:8.1%} {s['mfu']:8.1%} {s['mfu_own_dtype']:8.1%} "
          f"{'' if ev is None else f'{ev:10.1f}'}")
  print("ratios: " + ", ".join(f"{k} {v:.2f}x" if isinstance(v, float) else f"{k} {v}" for k, v in r["ratios"].items())
        + f"; same examples on all sides: {r['same_examples']}")
  for kind, ratios in r["ratios_by_peer"].items():
    if ratios:
      print(f"{kind} against each: " + ", ".join(f"{name} {v:.2f}x" for name, v in ratios.items()))


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if FLAGS.steps < 1 or FLAGS.repeats < 1 or FLAGS.warmup < 0:
    raise UserError("--steps and --repeats must be >= 1 and --warmup >= 0")
  if FLAGS.peer_dtypes is not None and (not FLAGS.peer_dtypes or set(FLAGS.peer_dtypes) - {"float32", "bfloat16"}):
    raise UserError(f"--peer_dtypes takes float32 and/or bfloat16, got {','.join(FLAGS.peer_dtypes)!r}")
  micro = FLAGS.peer_micro_batches or []
  if (not all(m.isdigit() and int(m) < config.train.global_batch_size for m in micro)
      or len({int(m) for m in micro}) < len(micro) or FLAGS.peer_micro_batches == []):
    raise UserError(f"--peer_micro_batches takes distinct sizes below the global batch "
                    f"({config.train.global_batch_size}; 0 for the whole batch), got {','.join(micro)!r}")
  if FLAGS.worker is not None:
    # Before jax or torch starts its threads.
    kept = keep_freed_memory() if FLAGS.worker == "jax" or FLAGS.peer_keep_freed_memory else False
    (jax_worker if FLAGS.worker == "jax" else torch_worker)(config, Path(FLAGS.workdir), kept)
    return
  if not FLAGS.json:
    raise UserError("--json OUT.json is required")
  if FLAGS.input_only and FLAGS.input_epochs < 1:
    raise UserError(f"--input_epochs must be >= 1, got {FLAGS.input_epochs}")
  run_bench = drive
  if FLAGS.input_only:
    from bertjax.bench import host_input
    keep_freed_memory()  # as the trainer's process does, before jax starts
    run_bench = lambda c, w: host_input.measure(c, w, epochs=FLAGS.input_epochs, repeats=FLAGS.repeats)
  load_before, started = os.getloadavg(), time.time()
  if FLAGS.workdir:
    result = run_bench(config, Path(FLAGS.workdir))
  else:
    with tempfile.TemporaryDirectory(prefix="bertjax_bench_") as tmp:
      result = run_bench(config, Path(tmp))
  if FLAGS.input_only:
    import jax
    result = {"command": " ".join(["python -m bertjax.bench", *sys.argv[1:]]),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
              "machine": {**_machine(), "jax": jax.__version__, "load_average_before": load_before,
                          "load_average_after": os.getloadavg()}, **result}
  out = Path(FLAGS.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  if FLAGS.input_only:
    host_input.print_table(result)
  else:
    _print_table(result)
  print(f"wrote {out}")


def run() -> None:
  from bertjax.config_base import exit_on_bad_command_line
  exit_on_bad_command_line(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
