"""Training and eval throughput of bertjax next to a Hugging Face PyTorch loop, in one run.

  python -m bertjax.bench --config configs/minilm_sst2.py --peer torch --json runs/bench.json \
      --config.data.train=../shared/data/sst2/train.tsv --config.data.eval=../shared/data/sst2/dev.tsv \
      [--steps 150] [--warmup 10] [--repeats 3] [--profile]

Two worker processes hold the two trainers: bertjax (the trainer's own data pipeline, optimizer,
sharding and jitted train step from `bertjax.step`) and `bertjax.peer_torch`. They take turns, so
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

import hashlib
import itertools
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

from bertjax.errors import UserError, exit_on_user_error
from bertjax.host_memory import keep_freed_memory
from bertjax.models.config import cpu_has_bf16_dot, cpuinfo_value

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
flags.DEFINE_bool("input_only", False, "Time the host side alone (plan, batches, host-to-device copies; "
                  "bertjax.bench_input), with no model and no peer.")
flags.DEFINE_integer("input_epochs", 3, "With --input_only: consecutive epochs timed end to end.")
flags.DEFINE_enum("worker", None, ["jax", "torch"], "Internal: run as a worker process.")
FLAGS = flags.FLAGS

PREFIX = "BENCH "  # result lines on a worker's stdout start with this; anything else is passed on


def _reply(obj: dict) -> None:
  print(PREFIX + json.dumps(obj), flush=True)


def _ids_digest(ids) -> str:
  """Order-free fingerprint of a set of example ids, to check both sides saw the same examples."""
  return hashlib.sha1(",".join(map(str, sorted(int(i) for i in ids))).encode()).hexdigest()[:16]


def _serve(handlers: dict) -> None:
  """Answers one JSON command per stdin line until 'quit'."""
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "quit":
      return
    _reply(handlers[cmd["op"]](**cmd.get("args", {})))


# ----- the bertjax worker --------------------------------------------------------------------


def _positions(batcher, count: int) -> list[tuple[int, int]]:
  """(epoch, step) of the first `count` steps of training, running on through epochs."""
  out, epoch = [], 0
  while len(out) < count:
    out += [(epoch, s) for s in range(batcher.steps_in_epoch(epoch))][:count - len(out)]
    epoch += 1
  return out


def _batches(batcher, positions: list[tuple[int, int]]):
  """This host's batches at contiguous positions (possibly across an epoch boundary)."""
  for epoch, group in itertools.groupby(positions, key=lambda p: p[0]):
    group = list(group)
    yield from itertools.islice(batcher.iterate(epoch, group[0][1]), len(group))


def jax_worker(config, workdir: Path, keeps_freed_memory: bool) -> None:
  import jax
  from bertjax import flops, matmul_peak, sharding
  from bertjax.data.prefetch import Prefetch
  from bertjax.evaluate import Evaluator
  from bertjax.step import CompiledByShape
  from bertjax.trainer import Trainer

  tr = Trainer(config, str(workdir))
  state, _ = tr._init_state()
  bs = sharding.batch_sharding(tr.mesh)
  step_fn = CompiledByShape(tr.jit_train_step(tr.state_shardings), "train step")
  batcher = tr.data.train.batcher
  positions = _positions(batcher, FLAGS.warmup + FLAGS.repeats * FLAGS.steps)
  ids_at = lambda pos: [i for e, s in pos for i in batcher.plan(e)[s]]
  blocks = [positions[FLAGS.warmup + r * FLAGS.steps:FLAGS.warmup + (r + 1) * FLAGS.steps]
            for r in range(FLAGS.repeats)]
  peer_dtypes = FLAGS.peer_dtypes or ["float32"] + (["bfloat16"] if tr.matmul_dtype == "bfloat16" else [])
  plan = {"warmup": ids_at(positions[:FLAGS.warmup]), "blocks": [ids_at(b) for b in blocks],
          "total_steps": tr.total_steps, "peer_dtypes": peer_dtypes}  # the torch schedule's length
  (workdir / "plan.json").write_text(json.dumps(plan))

  def run(pos):
    nonlocal state
    compiled = step_fn.compile_seconds
    t = time.perf_counter()
    batches = Prefetch(_batches(batcher, pos), lambda b: sharding.global_batch(b, bs))
    try:
      for batch in batches:
        state, metrics = step_fn(state, batch)
      jax.block_until_ready((state, metrics))
    finally:
      batches.close()
    return time.perf_counter() - t - (step_fn.compile_seconds - compiled), float(metrics["loss"])

  run(positions[:max(FLAGS.warmup, 1)])
  evaluator = Evaluator(tr.eval_model, tr.mesh, tr.state_shardings.params)
  eval_split = tr.data.eval if FLAGS.eval else None
  if eval_split is not None:
    evaluator.logits(state.params, eval_split.batcher, len(eval_split.labels))  # compiles
  # Measured afresh in this run (not the trainer's cached or vendor figure): the sides are compared as they ran.
  peaks = lambda: {dtype: matmul_peak.measure_matmul_peak(dtype) * matmul_peak.devices_sharing_peak()
                   for dtype in ("float32", "bfloat16")}
  peak = peaks()

  def train(block: int) -> dict:
    seconds, loss = run(blocks[block])
    ids = plan["blocks"][block]
    lengths = batcher.lengths[ids]
    slots = sum(r * l for e, s in blocks[block] for r, l in [batcher.step_shapes(e)[s]]) * batcher.process_count
    return {"seconds": seconds, "examples": len(ids), "tokens": int(lengths.sum()), "slots": slots,
            "steps": len(blocks[block]), "flops": flops.train_flops(tr.model_cfg, lengths), "ids": _ids_digest(ids),
            "last_loss": loss, "compilations": step_fn.num_compilations}

  def evaluate() -> dict:
    compiled = evaluator.step.compile_seconds
    t = time.perf_counter()
    evaluator.logits(state.params, eval_split.batcher, len(eval_split.labels))
    seconds = time.perf_counter() - t - (evaluator.step.compile_seconds - compiled)
    return {"seconds": seconds, "examples": len(eval_split.labels)}

  def profile() -> dict:
    batch = sharding.global_batch(next(_batches(batcher, blocks[0][:1])), bs)
    return profile_step(tr, state, batch)

  _reply({"ready": True, "keeps_freed_memory": keeps_freed_memory, "matmul_peak_flops": peak,
          "dtype": tr.dtype, "matmul_dtype": tr.matmul_dtype, "peer_dtypes": peer_dtypes,
          "rows_per_step": batcher.rows_per_step, "row_length": batcher.row_length, "packing": batcher.packing,
          "padding_fraction_epoch0": batcher.padding_fraction(0),
          "steps_per_epoch": batcher.steps_per_epoch(), "num_train_examples": len(batcher.lengths),
          "mean_train_length": float(batcher.lengths.mean()),
          "eval_padding_fraction": eval_split.batcher.padding_fraction(0) if eval_split else None,
          "eval_forward_flops": flops.forward_flops(tr.model_cfg, eval_split.batcher.lengths) if eval_split else None,
          "model": {"layers": tr.model_cfg.num_layers, "hidden": tr.model_cfg.hidden_size,
                    "heads": tr.model_cfg.num_heads, "intermediate": tr.model_cfg.intermediate_size},
          "devices": jax.device_count(), "jax": jax.__version__})
  _serve({"train": train, "eval": evaluate, "profile": profile, "peak": lambda: {"matmul_peak_flops": peaks()}})


def profile_step(tr, state, batch, reps: int = 20) -> dict:
  """Median milliseconds of variants of the train step on one batch: where the step's time goes."""
  import jax
  import numpy as np
  import optax
  from bertjax import flops
  from bertjax.models.dropout import keep_mask
  from bertjax.models.heads import SequenceClassifier
  from bertjax.step import _sums, make_eval_step, make_train_step

  def timed(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)

  cfg, reg, accum = tr.model_cfg, tr.regression, tr.grad_accum_steps
  quiet = SequenceClassifier(cfg.replace(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0,
                                         pooler_dropout=0.0, mlp_dropout=0.0))
  key = jax.random.fold_in(state.rng, 0)
  grad = lambda model, k: jax.jit(jax.value_and_grad(lambda p: _sums(model, p, batch, reg, k)[0]))
  train = lambda model: jax.jit(make_train_step(model, tr.tx, tr.schedule, reg, accum))
  out = {"batch_shape": list(batch.shape[:2]), "reps": reps, "ms": {}}
  ms = out["ms"]
  ms["train_step"] = timed(train(tr.model), state, batch)
  ms["train_step_no_dropout"] = timed(train(quiet), state, batch)
  # Each (compute dtype, matmul operand dtype) on this machine: what model.dtype / matmul_dtype=auto decide.
  for dtype, matmul_dtype in (("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")):
    variant = SequenceClassifier(cfg.replace(dtype=dtype, matmul_dtype=matmul_dtype))
    ms[f"train_step_{dtype}_matmul_{matmul_dtype}"] = timed(train(variant), state, batch)
  ms["train_step_again"] = timed(train(tr.model), state, batch)  # drift check
  ms["forward_backward"] = timed(grad(tr.model, key), state.params)
  ms["forward_backward_no_dropout"] = timed(grad(quiet, None), state.params)
  ms["forward_train_mode"] = timed(jax.jit(lambda p: _sums(tr.model, p, batch, reg, key)[0]), state.params)
  ms["forward_eval"] = timed(jax.jit(make_eval_step(tr.eval_model)), state.params, batch)
  update = jax.jit(lambda g, o, p: optax.apply_updates(p, tr.tx.update(g, o, p)[0]))
  ms["optimizer_update"] = timed(update, state.params, state.opt_state, state.params)
  if cfg.architecture == "bert":
    # The random bits of every dropout mask in a BERT-layout model, drawn alone: embeddings, each applied layer
    # (its last one at the read-out tokens only), the head's two.
    r, l, slots = batch.shape
    h, n = cfg.hidden_size, cfg.num_heads
    layer = lambda q: [(r, n, q, l), (r, q, h), (r, q, h)]
    shapes = ([(r, l, cfg.emb_size)] + layer(l) * (len(cfg.layer_schedule()) - 1) + layer(slots)
              + [(r, slots, h)] * 2)
    masks = lambda draw: jax.jit(lambda k: [draw(jax.random.fold_in(k, i), s) for i, s in enumerate(shapes)])
    ms["dropout_masks_alone"] = timed(masks(lambda k, s: keep_mask(k, s, 0.1)), key)  # what the model draws
    ms["dropout_masks_alone_threefry"] = timed(masks(lambda k, s: jax.random.bernoulli(k, 0.9, s)), key)
  ids = np.asarray(batch.fields()["example_ids"])
  lengths = tr.data.train.batcher.lengths[ids[ids >= 0]]
  out["model_train_flops"] = flops.train_flops(cfg, lengths)
  cost = train(tr.model).lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out["xla_flops"] = float(cost.get("flops", float("nan"))) if cost else None
  return out


# ----- the torch worker ----------------------------------------------------------------------


def torch_worker(config, workdir: Path, keeps_freed_memory: bool) -> None:
  import torch
  from bertjax.data import pipeline
  from bertjax.models import hf_weights
  from bertjax.models.config import from_hf_config
  from bertjax import optim
  from bertjax.peer_torch import TorchPeer, in_order, length_grouped

  folder = hf_weights.resolve_folder(config.model.name_or_path)
  base_cfg = from_hf_config(hf_weights.read_hf_config(folder), str(folder / "config.json"))
  tc = config.train
  eval_batch = tc.eval_batch_size or tc.global_batch_size
  # Same reading and (cached) tokenization as the bertjax worker; only the token ids are used here.
  data = pipeline.build(config.data, pipeline.load_tokenizer(folder), base_cfg, workdir / "cache",
                        global_batch_size=tc.global_batch_size, eval_batch_size=eval_batch, seed=tc.seed,
                        process_index=0, process_count=1, row_multiple=1)
  plan = json.loads((workdir / "plan.json").read_text())
  train_tok, train_labels = data.train.batcher.tokenized, data.train.labels
  lengths = train_tok.lengths
  eval_split = data.eval if FLAGS.eval else None
  # The optimizer values the bertjax run resolved (batch rule included), rebuilt from the same config.
  opt_plan = optim.plan_optimizer(config.optimizer, plan["total_steps"], tc.global_batch_size)
  peers = {}
  for dtype in plan["peer_dtypes"]:  # each its own model and optimizer, trained on the same blocks
    peers[dtype] = TorchPeer(folder, data.num_labels, opt_plan, seed=tc.seed, bf16=dtype == "bfloat16")
    if plan["warmup"]:
      peers[dtype].train(train_tok, train_labels, in_order(plan["warmup"], tc.global_batch_size))
    if eval_split is not None:
      peers[dtype].evaluate(eval_split.batcher.tokenized, eval_batch)

  def train(block: int, grouped: bool, dtype: str) -> dict:
    ids = plan["blocks"][block]
    batches = (length_grouped(ids, lengths, tc.global_batch_size) if grouped
               else in_order(ids, tc.global_batch_size))
    out = peers[dtype].train(train_tok, train_labels, batches)
    return {**out, "examples": len(ids), "tokens": int(lengths[ids].sum()),
            "ids": _ids_digest(i for b in batches for i in b)}

  def evaluate(dtype: str) -> dict:
    return peers[dtype].evaluate(eval_split.batcher.tokenized, eval_batch)

  _reply({"ready": True, "keeps_freed_memory": keeps_freed_memory, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()})
  _serve({"train": train, "eval": evaluate})


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


def drive(config, workdir: Path) -> dict:
  if config.data.eval == "" and FLAGS.eval:
    FLAGS.eval = False
  t0, load_before = time.time(), os.getloadavg()
  jx = Worker("jax", workdir)
  th = None
  try:
    th = Worker("torch", workdir)
    peer_dtypes = jx.ready["peer_dtypes"]
    # (name, grouped, dtype) of each torch variant; float32 keeps the names it always had
    peers = [(f"torch_{mode}{'' if dtype == 'float32' else '_bf16'}", mode == "grouped", dtype)
             for dtype in peer_dtypes for mode in ("dynamic", "grouped")]
    runs = {"bertjax": [], **{name: [] for name, _, _ in peers}}
    evals = {"bertjax": [], **{_eval_name(dtype): [] for dtype in peer_dtypes}}
    for r in range(FLAGS.repeats):
      order = ["bertjax", *[p[0] for p in peers]]
      for name in order if r % 2 == 0 else order[::-1]:
        if name == "bertjax":
          runs[name].append(jx.call("train", block=r))
        else:
          _, grouped, dtype = next(p for p in peers if p[0] == name)
          runs[name].append(th.call("train", block=r, grouped=grouped, dtype=dtype))
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
      "machine": {**_machine(), "jax": jx.ready["jax"], "torch": th.ready["torch"], "torch_threads": th.ready["threads"],
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
  flops_per_example = statistics.median(b["flops"] / b["examples"] for b in runs["bertjax"])
  own_dtype = {"bertjax": jx.ready["matmul_dtype"], **{name: dtype for name, _, dtype in peers}}
  for name in runs:  # same examples, same model FLOPs
    eps = result[name]["train_examples_per_sec"]
    result[name]["mfu"] = eps * flops_per_example / peak
    result[name]["mfu_own_dtype"] = eps * flops_per_example / peaks[own_dtype[name]]
  jax_eps = result["bertjax"]["train_examples_per_sec"]
  fastest = lambda mode: max((n for n, _, _ in peers if mode in n), key=lambda n: result[n]["train_examples_per_sec"])
  # The headline ratios are against torch's faster precision (named in *_peer); ratios_by_peer has each.
  result["ratios"], result["ratios_by_peer"] = {}, {"train": {}, "eval": {}}
  for mode in ("dynamic", "grouped"):
    result["ratios"][f"train_vs_torch_{mode}"] = jax_eps / result[fastest(mode)]["train_examples_per_sec"]
    result["ratios"][f"train_vs_torch_{mode}_peer"] = fastest(mode)
  for name, _, _ in peers:
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
      side = result[_eval_name(dtype).replace("torch", "torch_dynamic")]
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
    from bertjax import bench_input
    keep_freed_memory()  # as the trainer's process does, before jax starts
    run_bench = lambda c, w: bench_input.measure(c, w, epochs=FLAGS.input_epochs, repeats=FLAGS.repeats)
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
    bench_input.print_table(result)
  else:
    _print_table(result)
  print(f"wrote {out}")


def run() -> None:
  from bertjax.config_base import exit_on_bad_command_line
  exit_on_bad_command_line(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
