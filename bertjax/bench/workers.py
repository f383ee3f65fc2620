"""The two worker processes of `python -m bertjax.bench` (bertjax.bench.driver starts them): the bertjax trainer
and the Hugging Face PyTorch peer. Each answers the driver's commands (one JSON line each on stdin) with one
`PREFIX` line on stdout."""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

from absl import flags

FLAGS = flags.FLAGS  # the driver's flags (bertjax.bench.driver defines them)
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


class JaxSide:
  """bertjax as its trainer runs: the run's Trainer, its first state, its own jitted step (`runs.SingleRun`) and
  evaluator, advanced over contiguous blocks of the training plan."""

  def __init__(self, config, workdir: Path):
    from bertjax import sharding
    from bertjax.evaluate import Evaluator
    from bertjax.runs import SingleRun
    from bertjax.step import CompiledByShape
    from bertjax.trainer import Trainer
    self.tr = Trainer(config, str(workdir))
    run = SingleRun(self.tr)
    self.state = self.tr.init_state()
    self.step = CompiledByShape(run.jit_train_step(), "train step")
    self.evaluator = Evaluator(self.tr.eval_model, self.tr.mesh, run.param_shardings)
    self.batch_sharding = sharding.batch_sharding(self.tr.mesh)
    self.batcher = self.tr.data.train.batcher

  def batches(self, positions: list[tuple[int, int]]):
    """This host's batches of contiguous positions (possibly across an epoch boundary), on the devices."""
    from bertjax import sharding
    from bertjax.data.prefetch import Prefetch
    return Prefetch(self.batcher.stream(*positions[0], len(positions)),
                    lambda chunk: sharding.global_batches(chunk, self.batch_sharding))

  def train(self, positions: list[tuple[int, int]]) -> tuple[float, float]:
    """(seconds without compilation, last loss) of the steps at `positions`."""
    import jax
    compiled, t = self.step.compile_seconds, time.perf_counter()
    batches = self.batches(positions)
    try:
      for batch in batches:
        self.state, metrics = self.step(self.state, batch)
      jax.block_until_ready((self.state, metrics))
    finally:
      batches.close()
    return time.perf_counter() - t - (self.step.compile_seconds - compiled), float(metrics["loss"])

  def evaluate(self, split) -> float:
    """Seconds of a pass of the evaluator over `split`, without compilation."""
    compiled, t = self.evaluator.step.compile_seconds, time.perf_counter()
    self.evaluator.logits(self.state.params, split.batcher, len(split.labels))
    return time.perf_counter() - t - (self.evaluator.step.compile_seconds - compiled)


def jax_worker(config, workdir: Path, keeps_freed_memory: bool) -> None:
  import jax
  from bertjax import flops, matmul_peak

  side = JaxSide(config, workdir)
  tr, batcher = side.tr, side.batcher
  positions = _positions(batcher, FLAGS.warmup + FLAGS.repeats * FLAGS.steps)
  ids_at = lambda pos: [i for e, s in pos for i in batcher.plan(e)[s]]
  blocks = [positions[FLAGS.warmup + r * FLAGS.steps:FLAGS.warmup + (r + 1) * FLAGS.steps]
            for r in range(FLAGS.repeats)]
  peer_dtypes = FLAGS.peer_dtypes or ["float32"] + (["bfloat16"] if tr.matmul_dtype == "bfloat16" else [])
  plan = {"warmup": ids_at(positions[:FLAGS.warmup]), "blocks": [ids_at(b) for b in blocks],
          "total_steps": tr.total_steps, "peer_dtypes": peer_dtypes}  # the torch schedule's length
  (workdir / "plan.json").write_text(json.dumps(plan))
  side.train(positions[:max(FLAGS.warmup, 1)])
  eval_split = tr.data.eval if FLAGS.eval else None
  if eval_split is not None:
    side.evaluate(eval_split)  # compiles
  # Measured afresh in this run (not the trainer's cached or vendor figure): the sides are compared as they ran.
  peaks = lambda: {dtype: matmul_peak.measure_matmul_peak(dtype) * matmul_peak.devices_sharing_peak()
                   for dtype in ("float32", "bfloat16")}
  peak = peaks()

  def train(block: int) -> dict:
    seconds, loss = side.train(blocks[block])
    ids = plan["blocks"][block]
    lengths = batcher.lengths[ids]
    slots = sum(r * l for e, s in blocks[block] for r, l in [batcher.step_shapes(e)[s]]) * batcher.process_count
    return {"seconds": seconds, "examples": len(ids), "tokens": int(lengths.sum()), "slots": slots,
            "steps": len(blocks[block]), "flops": flops.train_flops(tr.model_cfg, lengths), "ids": _ids_digest(ids),
            "last_loss": loss, "compilations": side.step.num_compilations}

  def profile() -> dict:
    batches = side.batches(blocks[0][:1])
    try:
      return profile_step(tr, side.state, next(batches))
    finally:
      batches.close()

  _reply({"ready": True, "keeps_freed_memory": keeps_freed_memory, "matmul_peak_flops": peak,
          "dtype": tr.dtype, "matmul_dtype": tr.matmul_dtype, "peer_dtypes": peer_dtypes,
          "rows_per_step": batcher.rows_per_step, "row_length": batcher.row_length, "packing": batcher.packing,
          "grad_accum_steps": tr.grad_accum_steps,
          "padding_fraction_epoch0": batcher.padding_fraction(0),
          "steps_per_epoch": batcher.steps_per_epoch(), "num_train_examples": len(batcher.lengths),
          "mean_train_length": float(batcher.lengths.mean()),
          "eval_padding_fraction": eval_split.batcher.padding_fraction(0) if eval_split else None,
          "eval_forward_flops": flops.forward_flops(tr.model_cfg, eval_split.batcher.lengths) if eval_split else None,
          "model": {"layers": tr.model_cfg.num_layers, "hidden": tr.model_cfg.hidden_size,
                    "heads": tr.model_cfg.num_heads, "intermediate": tr.model_cfg.intermediate_size},
          "devices": jax.device_count(), "jax": jax.__version__})
  _serve({"train": train, "eval": lambda: {"seconds": side.evaluate(eval_split), "examples": len(eval_split.labels)},
          "profile": profile, "peak": lambda: {"matmul_peak_flops": peaks()}})


def profile_step(tr, state, batch, reps: int = 20) -> dict:
  """Median milliseconds of variants of the train step on one batch: where the step's time goes."""
  import jax
  import numpy as np
  import optax
  from bertjax import flops
  from bertjax.models.dropout import keep_mask
  from bertjax.models.heads import SequenceClassifier
  from bertjax.step import loss_sums, make_eval_step, make_train_step

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
  grad = lambda model, k: jax.jit(jax.value_and_grad(lambda p: loss_sums(model, p, batch, reg, k)[0]))
  steps = {}  # model config -> its jitted train step, compiled once

  def train(model):
    if model.cfg not in steps:
      steps[model.cfg] = jax.jit(make_train_step(model, tr.tx, tr.schedule, reg, accum))
    return steps[model.cfg]

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
  ms["forward_train_mode"] = timed(jax.jit(lambda p: loss_sums(tr.model, p, batch, reg, key)[0]), state.params)
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
  cost = train(tr.model).lower(state, batch).cost_analysis()  # of the step as lowered, before XLA's passes
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out["xla_flops"] = float(cost.get("flops", float("nan"))) if cost else None
  return out


# ----- the torch worker ----------------------------------------------------------------------


def torch_worker(config, workdir: Path, keeps_freed_memory: bool) -> None:
  import numpy as np
  import torch
  from bertjax import optim
  from bertjax.data import pipeline
  from bertjax.data.tokenizer import load_tokenizer
  from bertjax.models import hf_weights
  from bertjax.models.config import from_hf_config
  from bertjax.bench.peer_torch import TorchPeer, in_order, length_grouped, micro_slices

  folder = hf_weights.resolve_folder(config.model.name_or_path)
  base_cfg = from_hf_config(hf_weights.read_hf_config(folder), str(folder / "config.json"))
  tc = config.train
  eval_batch = tc.eval_batch_size or tc.global_batch_size
  # Same reading and (cached) tokenization as the bertjax worker; only the token ids are used here.
  data = pipeline.build(config.data, load_tokenizer(folder), base_cfg, workdir / "cache",
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

  def train(block: int, grouped: bool, dtype: str, micro_batch: int | None = None) -> dict:
    ids = plan["blocks"][block]
    batches = (length_grouped(ids, lengths, tc.global_batch_size) if grouped
               else in_order(ids, tc.global_batch_size))
    out = peers[dtype].train(train_tok, train_labels, batches, micro_batch)
    return {**out, "examples": len(ids), "tokens": int(lengths[ids].sum()),
            "ids": _ids_digest(i for b in batches for i in b)}

  def evaluate(dtype: str) -> dict:
    return peers[dtype].evaluate(eval_split.batcher.tokenized, eval_batch)

  def epoch_padding(micro_batches: list[int]) -> dict:
    """Per micro-batch size (0: the whole batch), the padding of the Trainer's length grouping over one epoch."""
    order = [int(i) for i in np.random.default_rng(tc.seed).permutation(len(lengths))]
    batches = length_grouped(order, lengths, tc.global_batch_size)
    out = {}
    for m in micro_batches:
      parts = [part for b in batches for part in micro_slices(b, m)]
      out[str(m)] = 1.0 - float(lengths.sum()) / sum(len(p) * int(lengths[p].max()) for p in parts)
    return out

  _reply({"ready": True, "keeps_freed_memory": keeps_freed_memory, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()})
  _serve({"train": train, "eval": evaluate, "epoch_padding": epoch_padding})
