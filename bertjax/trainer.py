"""The training loop: build, (resume,) step, evaluate, checkpoint, log, summarise.

Everything that can fail on bad input (config, model folder, data) is checked before the workdir
is touched, so a failed start loses nothing.
"""

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bertjax import checkpoint as ckpt_lib
from bertjax import flops, optim, plot, run_log, sharding
from bertjax.data import pipeline
from bertjax.data.prefetch import Prefetch
from bertjax.config_base import base_config
from bertjax.errors import UserError
from bertjax.evaluate import Evaluator
from bertjax.models import hf_weights
from bertjax.models.config import from_hf_config
from bertjax.models.heads import SequenceClassifier
from bertjax.step import CompiledByShape, TrainState, make_train_step


class WriteFailed(Exception):
  """The workdir could not be written (disk full, permissions): reported in one line, exit code 1."""


def _first_line(e: BaseException) -> str:
  text = str(e) or type(e).__name__
  return text.splitlines()[0][:300]


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


class _StopSignal:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the current step and exits.
  A second signal ends the process at once."""

  def __init__(self):
    self.received = None
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, _frame):
    if self.received is not None:  # a second signal: the user wants out now, checkpoint or not
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.received = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _config_snapshot(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _check_resume_compatible(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """A resumed run must train the same model on the same data; step budgets may change."""
  saved_path = workdir / "config.json"
  if not saved_path.exists():
    return
  saved, now = json.loads(saved_path.read_text()), _config_snapshot(config)
  defaults = _config_snapshot(base_config())
  for group in ("model", "data"):
    for key in sorted(set(saved.get(group, {})) | set(now.get(group, {}))):
      if key not in saved.get(group, {}) and now[group].get(key) == defaults[group].get(key):
        continue  # a key added after the run started, left at its default
      if saved.get(group, {}).get(key) != now.get(group, {}).get(key):
        raise UserError(f"{saved_path}: this workdir was trained with {group}.{key}="
                        f"{saved.get(group, {}).get(key)!r}, not {now.get(group, {}).get(key)!r}; "
                        "use a new --workdir or the same setting")


class Trainer:
  """Owns the run's objects; `run()` trains to the end (or a stop) and returns the summary."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = Path(workdir)
    self.is_primary = jax.process_index() == 0
    t0 = time.perf_counter()
    self.wall_start = time.time()
    tc = config.train
    if tc.grad_accum_steps < 1 or tc.global_batch_size % tc.grad_accum_steps:
      raise UserError(f"train.global_batch_size={tc.global_batch_size} must be a multiple of "
                      f"train.grad_accum_steps={tc.grad_accum_steps}")
    if config.model.dtype not in ("float32", "bfloat16"):
      raise UserError(f"model.dtype must be float32 or bfloat16, got {config.model.dtype!r}")
    if config.data.task not in ("classification", "regression"):
      raise UserError(f"data.task must be classification or regression, got {config.data.task!r}")
    if (self.workdir / "checkpoints").exists():
      _check_resume_compatible(self.workdir, config)

    # Model folder, tokenizer, data: all validated before anything is written.
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    folder = hf_weights.resolve_folder(config.model.name_or_path)
    base_cfg = from_hf_config(hf_weights.read_hf_config(folder), str(folder / "config.json"))
    self.tokenizer = pipeline.load_tokenizer(folder)
    saved_labels = self._saved_label_names()
    eval_batch = tc.eval_batch_size or tc.global_batch_size
    data_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    local_devices = sharding.local_rows_multiple(self.mesh)
    for name, size in (("train.global_batch_size", tc.global_batch_size // tc.grad_accum_steps),
                       ("train.eval_batch_size", eval_batch)):
      if not config.data.packing and size % data_devices:
        raise UserError(f"{name} (per accumulation step: {size}) must be a multiple of the {data_devices} devices")
    self.data = pipeline.build(
        config.data, self.tokenizer, base_cfg, self.workdir / "cache", global_batch_size=tc.global_batch_size,
        eval_batch_size=eval_batch, seed=tc.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), row_multiple=local_devices * tc.grad_accum_steps,
        label_names=saved_labels)
    self.loaded = hf_weights.load(str(folder), num_labels=self.data.num_labels, dtype=config.model.dtype,
                                  seed=tc.seed)
    for note in self.loaded.notes:
      log(f"model: {note}")
    self.model_cfg = self.loaded.cfg
    self.model = SequenceClassifier(self.model_cfg)
    self.regression = self.data.task == "regression"

    # Packed epochs differ by a step or so (each epoch packs its own shuffle), so count them one by one.
    batcher = self.data.train.batcher
    self.steps_per_epoch = batcher.steps_in_epoch(0)
    if tc.max_steps:
      self.total_steps = tc.max_steps
    else:
      full = int(tc.num_epochs)
      self.total_steps = sum(batcher.steps_in_epoch(e) for e in range(full))
      self.total_steps += int(math.ceil((tc.num_epochs - full) * batcher.steps_in_epoch(full)))
    if self.total_steps < 1:
      raise UserError(f"train.num_epochs={tc.num_epochs} gives no training step")
    self.tx, self.schedule, self.effective_lr = optim.make_optimizer(
        config.optimizer, self.loaded.params, self.total_steps, tc.global_batch_size)
    self.setup_seconds = time.perf_counter() - t0

  def _saved_label_names(self):
    path = self.workdir / "labels.json"
    if (self.workdir / "checkpoints").exists() and path.exists():
      return json.loads(path.read_text())["label_names"]
    return None

  # ----- state ---------------------------------------------------------------------------

  def _init_state(self):
    params = self.loaded.params
    abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                   opt_state=self.tx.init(p), rng=jax.random.PRNGKey(0)), params)
    shardings = sharding.state_shardings(abstract, self.mesh)
    self.state_shardings = shardings
    params = jax.device_put(params, shardings.params)
    init = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p),
                                        rng=jax.random.PRNGKey(self.config.train.seed)),
                   in_shardings=(shardings.params,), out_shardings=shardings)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return init(params), abstract

  def _write_run_files(self) -> None:
    """Config, labels and the model folder (HF config + tokenizer) that evaluate/predict/export read."""
    if not self.is_primary:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    (self.workdir / "config.json").write_text(json.dumps(_config_snapshot(self.config), indent=2) + "\n")
    (self.workdir / "labels.json").write_text(json.dumps(
        {"task": self.data.task, "label_names": self.data.label_names}, indent=2) + "\n")
    model_dir = self.workdir / "model"
    model_dir.mkdir(exist_ok=True)
    hf = hf_weights.hf_config_for(self.model_cfg, self.loaded.hf_config, self.data.label_names, self.regression)
    (model_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    self.tokenizer.save_pretrained(str(model_dir))

  # ----- the loop ------------------------------------------------------------------------

  def run(self) -> dict:
    config, tc = self.config, self.config.train
    state, abstract = self._init_state()
    checkpoints = ckpt_lib.Checkpoints(str(self.workdir / "checkpoints"), keep_best=True, async_save=True,
                                       is_primary=self.is_primary)
    meta = {"epoch": 0, "step_in_epoch": 0, "best": None, "evals_since_best": 0, "stats": {}, "last_eval": None}
    latest = checkpoints.latest_step()
    if latest is not None:
      state, meta = checkpoints.restore(latest, abstract)
      log(f"resumed from {self.workdir}/checkpoints/{latest} (epoch {meta['epoch']}, "
          f"step {meta['step_in_epoch']} of {self.data.train.batcher.steps_in_epoch(meta['epoch'])})")
    if latest is None:
      try:
        self._write_run_files()
      except OSError as e:
        raise WriteFailed(f"cannot write the run files in {self.workdir}: {e.strerror or e}") from None
    runlog = run_log.RunLog(str(self.workdir), self.is_primary)
    step = int(jax.device_get(state.step))
    runlog.truncate_after(step)
    self._print_start(step)

    batch_sharding = sharding.batch_sharding(self.mesh)
    train_step = CompiledByShape(jax.jit(
        make_train_step(self.model, self.tx, self.schedule, self.regression, tc.grad_accum_steps,
                        tc.skip_nonfinite_steps),
        in_shardings=(self.state_shardings, batch_sharding), out_shardings=(self.state_shardings, None),
        donate_argnums=(0,)), "train step", log)
    evaluator = Evaluator(self.model, self.mesh, self.state_shardings.params)
    progress = run_log.Progress(self.total_steps, is_primary=self.is_primary, every_steps=tc.log_every_steps)
    stop = _StopSignal()
    stats = {"train_seconds": 0.0, "examples": 0, "tokens": 0, "slots": 0, "wait_seconds": 0.0,
             "wall_seconds": 0.0, **meta["stats"]}
    self.wall_before = stats["wall_seconds"]
    best, evals_since_best = meta["best"], meta["evals_since_best"]
    epoch, step_in_epoch = meta["epoch"], meta["step_in_epoch"]
    pending: list[tuple[int, dict]] = []  # device metrics not yet read (read after the next dispatch)
    window = {"examples": 0, "tokens": 0, "seconds": 0.0}  # since the last train log line
    stopped_by = None
    last_eval = meta.get("last_eval")

    def flush(upto_log: bool):
      """Reads pending step metrics; stops on a non-finite loss with the step number."""
      nonlocal pending
      if not pending:
        return
      fetched = jax.device_get([m for _, m in pending])
      for (s, _), m in zip(pending, fetched):
        stats["skipped_steps"] = stats.get("skipped_steps", 0) + int(m["skipped"])
        if m["skipped"]:
          log(f"step {s}: non-finite loss or gradients ({m['loss']}); update skipped "
              f"({stats['skipped_steps']} so far)")
        elif not np.isfinite(m["loss"]):
          raise UserError(f"non-finite loss ({m['loss']}) at step {s}; stopped. The last good checkpoint "
                          f"(step {checkpoints.latest_step()}) is kept in {self.workdir}/checkpoints")
      if upto_log:
        n = sum(float(m["examples"]) for m in fetched)
        runlog.write(pending[-1][0], {
            "loss": sum(float(m["loss"]) * float(m["examples"]) for m in fetched) / max(n, 1),
            "accuracy": sum(float(m["accuracy"]) * float(m["examples"]) for m in fetched) / max(n, 1),
            "learning_rate": float(fetched[-1]["learning_rate"]), "grad_norm": float(fetched[-1]["grad_norm"]),
            "examples_per_sec": window["examples"] / max(window["seconds"], 1e-9),
            "tokens_per_sec": window["tokens"] / max(window["seconds"], 1e-9)}, "train")
        window.update(examples=0, tokens=0, seconds=0.0)
        progress.update(pending[-1][0], fetched[-1]["loss"])
      pending = []

    def do_eval():
      nonlocal best, evals_since_best, last_eval
      if self.data.eval is None:
        return None
      result = evaluator.evaluate(state.params, self.data.eval.batcher, self.data.eval.labels, self.data.task,
                                  self.data.label_names)
      scalars = _eval_scalars(result, self.regression)
      runlog.write(step, scalars, "eval")
      last_eval = {"step": step, **scalars}
      log(f"eval @ step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scalars.items()
                                              if k in ("loss", "accuracy", "macro_f1", "mcc", "pearson", "spearman")))
      if best is None or scalars["loss"] < best["eval_loss"]:
        best = _best_entry(step, scalars)
        evals_since_best = 0
      else:
        evals_since_best += 1
      return scalars

    def save(eval_scalars=None):
      if checkpoints.latest_step() == step:
        return
      stats["wall_seconds"] = self.wall_before + time.time() - self.wall_start
      meta_now = {"epoch": epoch, "step_in_epoch": step_in_epoch, "best": best, "last_eval": last_eval,
                  "evals_since_best": evals_since_best, "stats": stats, "label_names": self.data.label_names}
      metrics = {"eval_loss": eval_scalars["loss"]} if eval_scalars else None
      try:
        checkpoints.save(step, state, meta_now, metrics=metrics)
      except ckpt_lib.CheckpointError as e:
        raise WriteFailed(f"saving the checkpoint of step {step} failed ({_first_line(e)}); the previous "
                               f"checkpoint (step {checkpoints.latest_step()}) is intact") from None

    try:
      while step < self.total_steps and stopped_by is None:
        batcher = self.data.train.batcher
        real_tokens = batcher.global_real_tokens(epoch)
        plan_sizes = [len(s) for s in batcher.plan(epoch)]
        epoch_len = len(plan_sizes)
        if step_in_epoch >= epoch_len:  # resumed exactly at an epoch's end
          epoch, step_in_epoch = epoch + 1, 0
          continue
        batches = Prefetch(batcher.iterate(epoch, step_in_epoch), lambda b: sharding.global_batch(b, batch_sharding))
        t_segment, compile_mark = time.perf_counter(), train_step.compile_seconds
        try:
          for batch in batches:
            state, metrics = train_step(state, batch)
            stats["examples"] += plan_sizes[step_in_epoch]
            stats["tokens"] += int(real_tokens[step_in_epoch])
            window["examples"] += plan_sizes[step_in_epoch]
            window["tokens"] += int(real_tokens[step_in_epoch])
            stats["slots"] += int(np.prod(batch["input_ids"].shape))
            step += 1
            step_in_epoch += 1
            epoch_end = step_in_epoch == epoch_len
            if epoch_end:
              epoch, step_in_epoch = epoch + 1, 0
            pending.append((step, metrics))
            eval_due = (step % tc.eval_every_steps == 0) if tc.eval_every_steps else epoch_end
            eval_due = eval_due or step == self.total_steps
            boundary = (eval_due or step == self.total_steps or
                        (tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0) or
                        stop.received is not None)
            if step % tc.log_every_steps == 0 or boundary:
              jax.block_until_ready(metrics)
              # Compilation is reported apart (compile_seconds), not as slow training.
              elapsed = time.perf_counter() - t_segment - (train_step.compile_seconds - compile_mark)
              stats["train_seconds"] += elapsed
              window["seconds"] += elapsed
              flush(upto_log=True)
              t_segment, compile_mark = time.perf_counter(), train_step.compile_seconds
            if boundary:
              stats["wait_seconds"] += batches.wait_seconds
              batches.wait_seconds = 0.0
              eval_scalars = do_eval() if eval_due else None
              if eval_scalars is not None or step == self.total_steps or stop.received is not None or (
                  tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0):
                save(eval_scalars)
              if eval_scalars is not None:
                self._write_summary(step, epoch + step_in_epoch / self.data.train.batcher.steps_in_epoch(epoch), best, last_eval, stats, evaluator, train_step)
              if tc.early_stopping_patience and evals_since_best >= tc.early_stopping_patience:
                stopped_by = f"early stopping (eval loss did not improve for {evals_since_best} evals)"
              if stop.received is not None:
                stopped_by = f"signal {stop.received}"
              t_segment, compile_mark = time.perf_counter(), train_step.compile_seconds
            if step >= self.total_steps or stopped_by is not None:
              break
          stats["wait_seconds"] += batches.wait_seconds
        finally:
          batches.close()
      flush(upto_log=True)
      if self.data.eval is not None and (last_eval is None or last_eval["step"] != step):
        eval_scalars = do_eval()
        save(eval_scalars)
      try:
        checkpoints.wait()
      except ckpt_lib.CheckpointError as e:
        raise WriteFailed(f"writing the final checkpoint failed ({_first_line(e)}); the previous "
                               f"checkpoint (step {checkpoints.latest_step()}) is intact") from None
      summary = self._write_summary(step, epoch + step_in_epoch / self.data.train.batcher.steps_in_epoch(epoch), best, last_eval, stats, evaluator, train_step, done=True,
                                    stopped_by=stopped_by)
    finally:
      stop.restore()
      checkpoints.close()
      runlog.close()
    if self.is_primary:
      plot.plot_metrics(self.workdir)
    log(f"done: {stopped_by or 'finished'} at step {step}; checkpoints in {self.workdir}/checkpoints "
        f"(latest {checkpoints.latest_step()}, best {checkpoints.best_step()}), "
        f"TensorBoard logs in {self.workdir}/tensorboard, summary in {self.workdir}/summary.json")
    return summary

  # ----- reporting -----------------------------------------------------------------------

  def _print_start(self, step: int) -> None:
    tc, d = self.config.train, self.data
    lr_note = (f" (scaled {self.config.optimizer.lr_scaling} from {self.config.optimizer.learning_rate:g} "
               f"at batch {self.config.optimizer.base_batch_size})" if self.config.optimizer.lr_scaling != "none"
               else "")
    log(f"model: {self.model_cfg.family} {self.config.model.name_or_path} ({self.model_cfg.num_layers} layers, "
        f"hidden {self.model_cfg.hidden_size}, {self.data.num_labels} labels, {self.config.model.dtype})")
    log(f"data: {len(d.train.examples)} train / {pipeline.example_count(d.eval)} eval examples; "
        f"{self.steps_per_epoch} steps per epoch; padding {d.train.batcher.padding_fraction(0):.1%} "
        f"({'packed' if self.config.data.packing else 'length buckets'})")
    log(f"optimizer: {self.config.optimizer.name}, effective learning rate {self.effective_lr:.3g}{lr_note}, "
        f"{self.total_steps} steps, batch {tc.global_batch_size} on mesh {dict(self.mesh.shape)}"
        + (f", resuming at step {step}" if step else ""))

  def _write_summary(self, step, epochs_completed, best, last_eval, stats, evaluator, train_step, done=False,
                     stopped_by=None) -> dict:
    seconds = max(stats["train_seconds"], 1e-9)
    if not hasattr(self, "_peak"):
      self._peak = flops.measure_matmul_peak()
    tokens_per_sec = stats["tokens"] / seconds
    # FLOPs per real token of this dataset (mean over the train set), times the measured token rate.
    lengths = self.data.train.batcher.lengths
    flops_per_token = flops.train_flops(self.model_cfg, lengths) / max(int(lengths.sum()), 1)
    summary = {
        "model": self.config.model.name_or_path,
        "family": self.model_cfg.family,
        "task": self.data.task,
        "num_train_examples": len(self.data.train.examples),
        "num_eval_examples": pipeline.example_count(self.data.eval),
        "global_batch_size": self.config.train.global_batch_size,
        "steps": step,
        "total_steps": self.total_steps,
        "epochs_completed": epochs_completed,
        "train_examples_per_sec": stats["examples"] / seconds,
        "train_tokens_per_sec": tokens_per_sec,
        "padding_fraction": 1.0 - stats["tokens"] / max(stats["slots"], 1),
        "mfu": tokens_per_sec * flops_per_token / self._peak,
        "mfu_method": "train FLOPs of real tokens (3x forward, attention within each example) / measured "
                      "f32 matmul peak of this machine",
        "matmul_peak_flops": self._peak,
        "num_compilations": train_step.num_compilations + evaluator.step.num_compilations,
        "compile_seconds": train_step.compile_seconds + evaluator.step.compile_seconds,
        "input_wait_fraction": stats["wait_seconds"] / seconds,
        "best": best,
        "final": _best_entry(last_eval["step"], last_eval) if last_eval else None,
        "wall_seconds": self.wall_before + time.time() - self.wall_start,
        "train_seconds": stats["train_seconds"],
        "finished": done and stopped_by is None and step >= self.total_steps,
        "stopped_by": stopped_by,
        "skipped_steps": stats.get("skipped_steps", 0),
    }
    if self.is_primary:
      run_log.write_summary(str(self.workdir), summary)
    return summary


def _eval_scalars(result: dict, regression: bool) -> dict:
  keys = ("loss", "mse", "pearson", "spearman") if regression else ("loss", "accuracy", "macro_f1", "micro_f1", "mcc")
  return {k: float(result[k]) for k in keys if k in result}


def _best_entry(step: int, scalars: dict) -> dict:
  entry = {"step": step, "eval_loss": scalars["loss"]}
  if "accuracy" in scalars:
    entry.update(eval_accuracy=scalars["accuracy"], eval_f1=scalars["macro_f1"])
  else:
    entry.update(eval_pearson=scalars.get("pearson"), eval_spearman=scalars.get("spearman"))
  return entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return Trainer(config, workdir).run()
