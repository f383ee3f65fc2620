"""A run built from its config (`Trainer`), and the training loop (`train`) that trains one run or a trial group.

  summary = train_and_evaluate(config, workdir)       # = Trainer(config, workdir).run()

`train(runs)` is one flat loop over steps, as in nanodo's and the flax examples' train_and_evaluate: dispatch
the step, then each periodic action where it is due (`_log`, `_eval`, `_checkpoint`, `_maybe_stop`). Its state
is one `LoopState`, which every checkpoint stores. It trains a `runs.Runs`: `runs.SingleRun` (a run alone) or
`trial_group.TrialGroup` (K runs stacked and stepped as one vmapped program).

Everything that can fail on bad input (config, model folder, data) is checked while the Trainer is built,
before the workdir is touched, so a failed start loses nothing.
"""

import copy
import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from bertjax import checkpoint as ckpt_lib
from bertjax import cli_setup, matmul_peak, optim, plot, resume, run_log, run_summary, sharding
from bertjax import step as step_lib
from bertjax import workdir as workdir_lib
from bertjax.config_base import check_values
from bertjax.data import pipeline
from bertjax.data.prefetch import Prefetch
from bertjax.data.tokenizer import Tokenizer, load_tokenizer
from bertjax.errors import UserError, WriteFailed, first_line
from bertjax.evaluate import Evaluator
from bertjax.loop_state import LoopState, RunRecord, Stats
from bertjax.metrics import is_better
from bertjax.models import hf_weights
from bertjax.models.config import from_hf_config, resolve_attention, resolve_attention_dropout, resolve_dtypes
from bertjax.models.heads import SequenceClassifier, start_at_mean
from bertjax.run_log import log
from bertjax.runs import Runs, SingleRun
from bertjax.step import (CompiledByShape, TrainState, auto_accumulation, class_weight_vector, make_train_step,
                          new_train_state)
from bertjax.stop_signal import StopSignal


def due(step: int, every: int) -> bool:
  """Whether an action done every `every` steps (0: never) is due after `step` steps."""
  return every > 0 and step % every == 0


# ----- one run, built from its config ----------------------------------------------------------


def grad_accum_setting(train_cfg) -> int | str:
  """train.grad_accum_steps: a positive integer, or "auto" (`step.auto_accumulation`)."""
  value = train_cfg.grad_accum_steps
  if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
    return value
  raise UserError(f"train.grad_accum_steps must be auto or a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RunInputs:
  """What a run reads before it trains: its device mesh, the model folder and its tokenizer, the data read,
  tokenized and batched for this process, and train.grad_accum_steps resolved. Runs that differ only in
  hyperparameters (a trial group's trials) share one."""
  mesh: Any
  folder: Path
  tokenizer: Tokenizer
  data: pipeline.TaskData
  grad_accum_steps: int


def build_inputs(config: ml_collections.ConfigDict, workdir: Path, cache_dir: Path | None) -> RunInputs:
  """A run's inputs, its data tokenized into cache_dir (None: no cache). Labels a resumed run saved in
  `workdir` keep their ids."""
  tc = config.train
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  accum = grad_accum_setting(tc)
  data_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if tc.global_batch_size < 1 or tc.global_batch_size % data_devices:
    raise UserError(f"train.global_batch_size={tc.global_batch_size} must be a positive multiple of the "
                    f"{data_devices} data-parallel devices")
  eval_batch = tc.eval_batch_size or tc.global_batch_size
  if not config.data.packing and eval_batch % data_devices:
    raise UserError(f"train.eval_batch_size={eval_batch} must be a multiple of the {data_devices} devices")
  folder = hf_weights.resolve_folder(config.model.name_or_path)
  base_cfg = from_hf_config(hf_weights.read_hf_config(folder), str(folder / "config.json"))
  tokenizer = load_tokenizer(folder)
  local_devices = sharding.local_rows_multiple(mesh)
  data = pipeline.build(
      config.data, tokenizer, base_cfg, cache_dir, global_batch_size=tc.global_batch_size,
      eval_batch_size=eval_batch, seed=tc.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), row_multiple=local_devices, label_names=resume.saved_label_names(workdir),
      gather=sharding.gather_from_processes)
  batcher = data.train.batcher
  rows = batcher.rows_per_step // data_devices  # each device's rows per step, split into the micro-batches
  if accum == "auto":
    accum = auto_accumulation(rows, batcher.row_length, base_cfg.hidden_size, jax.default_backend())
  elif rows % accum:
    raise UserError(f"train.grad_accum_steps={accum} must divide the {rows} rows each device gets per step "
                    f"(batch {tc.global_batch_size}{', packed' if config.data.packing else ''}); "
                    f"divisors: {', '.join(str(d) for d in range(1, rows + 1) if rows % d == 0)}")
  return RunInputs(mesh, folder, tokenizer, data, accum)


class Trainer:
  """One run's parts, built and checked from its config: data, model, optimizer, step count. `run()` trains it.

  `inputs`: the mesh, model folder, tokenizer and data, when another run already built them from the same
  data and model settings (`build_inputs`); else they are built here, the data tokenized into `cache_dir`
  (default: the workdir's cache folder; `token_cache=False`: no cache, so that nothing is written)."""

  # The run's inputs, read where they live (`self.inputs`).
  mesh = property(lambda self: self.inputs.mesh)
  folder = property(lambda self: self.inputs.folder)
  tokenizer = property(lambda self: self.inputs.tokenizer)
  data = property(lambda self: self.inputs.data)
  grad_accum_steps = property(lambda self: self.inputs.grad_accum_steps)

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, inputs: RunInputs | None = None,
               cache_dir: Path | None = None, token_cache: bool = True):
    workdir_existed = Path(workdir).exists()
    try:
      self._build(config, workdir, inputs, cache_dir, token_cache)
    except UserError:
      if not workdir_existed:  # a fresh workdir holds only the token cache written on the way: leave nothing
        shutil.rmtree(workdir, ignore_errors=True)
      raise

  def _build(self, config, workdir, inputs, cache_dir, token_cache) -> None:
    config = self.config = copy.deepcopy(config)  # resolved keys below are written here, not in the caller's
    self.workdir = Path(workdir)
    self.is_primary = jax.process_index() == 0
    self.wall_start = time.time()
    tc = config.train
    self.dtype, self.matmul_dtype = resolve_dtypes(config.model)
    self.deterministic = cli_setup.deterministic_ops(tc.deterministic, jax.default_backend())
    check_values(config)
    if not config.data.num_shards:  # one shard per process, recorded so a resume reads the same shards
      config.data.num_shards = jax.process_count()
    if (self.workdir / "checkpoints").exists():
      resume.check_resume_compatible(self.workdir, config)
    self.config_changes = resume.changed_settings(self.workdir, config)  # refused unless allowed

    # Model folder, tokenizer, data: all validated before anything is written.
    # The attention settings first, before the data is tokenized into the workdir's cache: they need only
    # the model's config.json.
    folder = inputs.folder if inputs else hf_weights.resolve_folder(config.model.name_or_path)
    self._resolve_attention(from_hf_config(hf_weights.read_hf_config(folder), str(folder / "config.json")))
    self.inputs = inputs or build_inputs(config, self.workdir,
                                         (cache_dir or self.workdir / "cache") if token_cache else None)
    self.loaded = hf_weights.load(str(self.folder), num_labels=self.data.num_labels, dtype=self.dtype,
                                  seed=tc.seed, reinit_head=config.model.reinit_head)
    if self.data.task == "regression" and self.loaded.fresh_head:
      self.loaded.notes.append(start_at_mean(self.loaded.params, self.data.train.labels))
    if not ckpt_lib.steps_on_disk(self.workdir / "checkpoints"):  # else the head comes from the checkpoint
      for note in self.loaded.notes:
        log(f"model: {note}")
    self.model_cfg = self.loaded.cfg.replace(
        dtype=self.dtype, matmul_dtype=self.matmul_dtype, attention_dropout=self.attention_dropout,
        attention=self.attention.train)
    self.model = SequenceClassifier(self.model_cfg)
    self.eval_model = SequenceClassifier(self.model_cfg.replace(attention=self.attention.eval))
    self.regression = self.data.task == "regression"
    self.class_weights = class_weight_vector(tc.class_weights, self.data.train.labels, self.data.num_labels)

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
    self.opt_plan = optim.plan_optimizer(config.optimizer, self.total_steps, tc.global_batch_size)
    self.tx, self.schedule = optim.build_optimizer(self.opt_plan, self.opt_plan.hparams, self.loaded.params)

  def _resolve_attention(self, checkpoint_cfg) -> None:
    """model.attention_dropout (-1: the checkpoint's) and the attention implementations for this checkpoint."""
    model = self.config.model
    self.attention_dropout = resolve_attention_dropout(model.attention_dropout, checkpoint_cfg.attention_dropout)
    self.attention = resolve_attention(model.attention, checkpoint_cfg.replace(
        dtype=self.dtype, attention_dropout=self.attention_dropout))

  def abstract_state(self) -> TrainState:
    """The run's train state as shapes, dtypes and shardings (nothing computed or allocated)."""
    abstract = jax.eval_shape(self._new_state, self.loaded.params)
    shardings = sharding.state_shardings(abstract, self.mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  def init_state(self) -> TrainState:
    """The run's first train state, built on the devices in its shardings."""
    shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state())
    params = jax.device_put(self.loaded.params, shardings.params)
    return jax.jit(self._new_state, in_shardings=(shardings.params,), out_shardings=shardings)(params)

  def _new_state(self, params) -> TrainState:
    return new_train_state(params, self.tx, self.config.train.seed)

  def train_step_fn(self):
    """The run's pure train step, (state, batch) -> (state, metrics)."""
    return make_train_step(self.model, self.tx, self.schedule, self.regression, self.grad_accum_steps,
                           self.config.train.skip_nonfinite_steps, self.class_weights)

  def jit_train_step(self, state_shardings):
    """The train step as the loop runs it: jitted with explicit in/out shardings, the state donated."""
    return step_lib.jit_train_step(self.train_step_fn(), state_shardings, self.mesh)

  def write_run_files(self) -> None:
    """Config, labels and the model folder (HF config + tokenizer) that evaluate/predict/export read."""
    if not self.is_primary:
      return
    hf = hf_weights.hf_config_for(self.model_cfg, self.loaded.hf_config, self.data.label_names, self.regression)
    try:
      workdir_lib.write_run_files(self.workdir, self.config_record(), self.data.task, self.data.label_names, hf,
                                  self.tokenizer)
    except OSError as e:
      raise WriteFailed(f"cannot write the run files in {self.workdir}: {e.strerror or e}") from None

  def config_record(self) -> dict:
    """config.json: the config, and what optimizer.lr_scaling and grad_accum_steps=auto chose for this batch
    size and machine."""
    return {**resume.config_snapshot(self.config),
            "derived": {"optimizer": {k: new for k, (_, new) in self.opt_plan.derived.items()},
                        "grad_accum_steps": self.grad_accum_steps}}

  def epochs_at(self, step: int) -> float:
    """Epochs completed after `step` steps."""
    batcher, epoch = self.data.train.batcher, 0
    while step >= batcher.steps_in_epoch(epoch):
      step -= batcher.steps_in_epoch(epoch)
      epoch += 1
    return epoch + step / batcher.steps_in_epoch(epoch)

  def run(self) -> dict:
    """Trains to the end (or a stop) and returns the summary; a non-finite loss raises (with its step)."""
    summary = train(SingleRun(self))[0]
    if "error" in summary:
      raise UserError(summary["error"])
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return Trainer(config, workdir).run()


# ----- the loop ------------------------------------------------------------------------------


@dataclasses.dataclass
class Window:
  """The steps since the last train log line: their metrics (on the devices until `_log` reads them) and their
  examples, tokens and time."""
  pending: list = dataclasses.field(default_factory=list)  # (step, device metrics)
  examples: int = 0
  tokens: int = 0
  seconds: float = 0.0
  started: float = 0.0  # time.perf_counter() when its clock last started
  compile_mark: float = 0.0  # the train step's compile seconds then: compiling is not training

  def restart(self, train_step: CompiledByShape) -> None:
    self.started, self.compile_mark = time.perf_counter(), train_step.compile_seconds


@dataclasses.dataclass
class Session:
  """What this process's loop works with while it runs (opened by `_open`, closed at the end; not checkpointed:
  the LoopState is)."""
  runs: Runs
  checkpoints: list[ckpt_lib.Checkpoints]  # one per run
  logs: list[run_log.RunLog]  # one per run
  train_step: CompiledByShape
  evaluator: Evaluator
  batches: Prefetch
  progress: run_log.Progress
  stop: StopSignal
  peak: matmul_peak.Peak  # what MFU divides by: the vendor's figure, or this machine's cached measurement
  earlier: Stats  # the stats of the run's earlier sessions, to which this one's wall time and compilations add
  window: Window


def train(runs: Runs) -> list[dict]:
  """Trains `runs` to the last step, or until a signal (or every run) stops them; returns each run's summary."""
  lead, tc = runs.lead, runs.lead.config.train
  s, state, loop = _open(runs)
  has_eval = lead.data.eval is not None
  stopping = None
  try:
    stopping = _maybe_stop(s, loop, may_exchange=True)  # a resumed run may be over (early stopping)
    for step in range(loop.step + 1, lead.total_steps + 1):
      if stopping:
        break
      batch = next(s.batches)
      state, metrics = s.train_step(state, batch)
      epoch_end = _advance(s, loop, batch)
      s.window.pending.append((step, metrics))
      last = step == lead.total_steps
      evaluate = has_eval and (last or (due(step, tc.eval_every_steps) if tc.eval_every_steps else epoch_end))
      save = last or evaluate or due(step, tc.checkpoint_every_steps)
      log_now = save or due(step, tc.log_every_steps)  # a saved step ends a log window: a resume logs the same lines
      if log_now and not save and tc.checkpoint_every_minutes:  # a clock's decision: only at log steps
        save = _minutes_due(s, loop, tc.checkpoint_every_minutes)
      if log_now:
        _log(s, loop)
      if evaluate:
        _eval(s, loop, state)
      if save:
        _checkpoint(s, loop, state)
      if log_now:
        s.window.restart(s.train_step)  # evaluating and saving are not training
      stopping = _maybe_stop(s, loop, may_exchange=log_now)  # all processes log the same steps
    _log(s, loop)  # a stop between two log steps: its last steps are logged and saved (else these do nothing)
    _checkpoint(s, loop, state)
    if has_eval and any(loop.runs[k].last_eval is None or loop.runs[k].last_eval["step"] != loop.step
                        for k in loop.training()):
      _eval(s, loop, state)  # every summary ends with an eval of the run's last step
    for checkpoints in s.checkpoints:
      try:
        checkpoints.wait()
      except ckpt_lib.CheckpointError as e:
        raise WriteFailed(f"writing the final checkpoint failed ({first_line(e)}); the previous "
                          f"checkpoint (step {checkpoints.latest_step()}) is intact") from None
    summaries = _summarize(s, loop, done=True, stopping=stopping)
  finally:
    _close(s)
  for run, record, label, checkpoints in zip(runs.trainers, loop.runs, runs.labels, s.checkpoints):
    if record.error is None:  # a failed run raises (alone) or reports its error in its summary (in a group)
      if lead.is_primary:
        plot.plot_metrics(run.workdir)
      log(f"{label}done: {record.stopped_by or stopping or 'finished'} at step {record.end_step or loop.step}; "
          f"checkpoints in {run.workdir}/checkpoints (latest {checkpoints.latest_step()}, best "
          f"{checkpoints.best_step()}), TensorBoard logs in {run.workdir}/tensorboard, summary in "
          f"{run.workdir}/summary.json")
  return summaries


def _open(runs: Runs) -> tuple[Session, TrainState, LoopState]:
  """The session, and the state and loop state to start from: a run's latest checkpoint, or fresh (its run
  files written first)."""
  lead = runs.lead
  checkpoints = [ckpt_lib.Checkpoints(str(run.workdir / "checkpoints"), keep_best=True, async_save=True,
                                      is_primary=lead.is_primary, sync_name=f"run{k}",
                                      best_metric=run.config.train.best_metric)
                 for k, run in enumerate(runs.trainers)]
  state, loop = runs.start(checkpoints)
  if loop is None:
    loop = LoopState(runs=[RunRecord() for _ in runs.trainers])
    for run in runs.trainers:
      run.write_run_files()
  if loop.last_save_wall_seconds is None:  # fresh (0), or a checkpoint saved before the field existed
    loop.last_save_wall_seconds = loop.stats.wall_seconds
  loop.mesh = dict(lead.mesh.shape)  # what its checkpoints record from now on
  logs = [run_log.RunLog(str(run.workdir), lead.is_primary) for run in runs.trainers]
  for run, runlog in zip(runs.trainers, logs):
    runlog.truncate_after(loop.step)
    resume.record_changes(run, runlog, loop.step)
  for line in runs.start_lines(loop.step):
    log(line)
  batcher, batch_sharding = lead.data.train.batcher, sharding.batch_sharding(lead.mesh)
  batches = Prefetch(batcher.stream(loop.epoch, loop.step_in_epoch, lead.total_steps - loop.step),
                     lambda chunk: sharding.global_batches(chunk, batch_sharding))
  s = Session(runs, checkpoints, logs, CompiledByShape(runs.jit_train_step(), "train step", log),
              Evaluator(lead.eval_model, lead.mesh, runs.param_shardings), batches,
              run_log.Progress(lead.total_steps, is_primary=lead.is_primary,
                               every_steps=lead.config.train.log_every_steps),
              StopSignal(), matmul_peak.run_peak(lead.matmul_dtype), dataclasses.replace(loop.stats), Window())
  s.window.restart(s.train_step)
  return s, state, loop


def _close(s: Session) -> None:
  s.stop.restore()
  s.batches.close()
  for checkpoints, runlog in zip(s.checkpoints, s.logs):
    checkpoints.close()
    runlog.close()
  s.runs.close()


def _advance(s: Session, loop: LoopState, batch) -> bool:
  """Counts the step just dispatched (its examples, real tokens and token slots) and moves the loop's position
  past it; whether it ended an epoch."""
  batcher = s.runs.lead.data.train.batcher
  examples = int(batcher.examples_per_step(loop.epoch)[loop.step_in_epoch])
  tokens = int(batcher.global_real_tokens(loop.epoch)[loop.step_in_epoch])
  loop.stats.examples += examples
  loop.stats.tokens += tokens
  loop.stats.slots += batch.shape[0] * batch.length
  s.window.examples += examples
  s.window.tokens += tokens
  loop.step, loop.step_in_epoch = loop.step + 1, loop.step_in_epoch + 1
  if loop.step_in_epoch < batcher.steps_in_epoch(loop.epoch):
    return False
  loop.epoch, loop.step_in_epoch = loop.epoch + 1, 0
  return True


def _log(s: Session, loop: LoopState) -> None:
  """Reads the window's step metrics from the devices (one transfer) and writes each training run's train line
  and the progress line. A non-finite loss stops its run (with train.skip_nonfinite_steps the step skipped the
  update instead, and is counted)."""
  w = s.window
  if not w.pending:
    return
  jax.block_until_ready(w.pending[-1][1])
  elapsed = time.perf_counter() - w.started - (s.train_step.compile_seconds - w.compile_mark)
  loop.stats.train_seconds += elapsed
  w.seconds += elapsed
  loop.stats.wait_seconds += s.batches.wait_seconds
  s.batches.wait_seconds = 0.0
  fetched = [s.runs.split(m) for m in jax.device_get([m for _, m in w.pending])]
  for k in loop.training():
    record, label, mine = loop.runs[k], s.runs.labels[k], [f[k] for f in fetched]
    for (step, _), m in zip(w.pending, mine):
      record.skipped_steps += int(m["skipped"])
      if m["skipped"]:
        log(f"{label}step {step}: non-finite loss or gradients ({m['loss']}); update skipped "
            f"({record.skipped_steps} so far)")
      elif not np.isfinite(m["loss"]):
        record.stopped_by, record.end_step = f"non-finite loss ({m['loss']}) at step {step}", step
        record.error = (f"{record.stopped_by}; stopped. The last good checkpoint (step "
                        f"{s.checkpoints[k].latest_step()}) is kept in {s.runs.trainers[k].workdir}/checkpoints")
        log(f"{label}step {step}: non-finite loss ({m['loss']}); this run stops")
        break
    if record.stopped_by is None:
      n = max(sum(float(m["examples"]) for m in mine), 1)
      s.logs[k].write(w.pending[-1][0], {
          "loss": sum(float(m["loss"]) * float(m["examples"]) for m in mine) / n,
          "accuracy": sum(float(m["accuracy"]) * float(m["examples"]) for m in mine) / n,
          "learning_rate": float(mine[-1]["learning_rate"]), "grad_norm": float(mine[-1]["grad_norm"]),
          "examples_per_sec": w.examples / max(w.seconds, 1e-9),
          "tokens_per_sec": w.tokens / max(w.seconds, 1e-9)}, "train")
  if loop.training():
    s.progress.update(w.pending[-1][0], fetched[-1][loop.training()[0]]["loss"])
  w.pending, w.examples, w.tokens, w.seconds = [], 0, 0, 0.0


def _eval(s: Session, loop: LoopState, state: TrainState) -> None:
  """Evaluates each training run: its eval line, best eval (by train.best_metric) and count of evals since, and
  its summary.json."""
  data = s.runs.lead.data
  for k in loop.training():
    record = loop.runs[k]
    result = s.evaluator.evaluate(s.runs.params(state, k), data.eval.batcher, data.eval.labels, data.task,
                                  data.label_names)
    scalars = run_summary.eval_scalars(result, s.runs.lead.regression)
    s.logs[k].write(loop.step, scalars, "eval")
    record.last_eval = {"step": loop.step, **scalars}
    log(f"{s.runs.labels[k]}eval @ step {loop.step}: " + "  ".join(
        f"{key} {v:.4f}" for key, v in scalars.items()
        if key in ("eval_loss", "accuracy", "macro_f1", "mcc", "pearson", "spearman")))
    if is_better(scalars, record.best, s.runs.trainers[k].config.train.best_metric):
      record.best, record.evals_since_best = run_summary.best_entry(loop.step, scalars), 0
    else:
      record.evals_since_best += 1
  _summarize(s, loop, done=False)


def _checkpoint(s: Session, loop: LoopState, state: TrainState) -> None:
  """Starts saving the checkpoint of this step of each training run that has none (ranked by its eval when it was
  just evaluated); a trial group first saves its stacked state."""
  which = [k for k in loop.training() if s.checkpoints[k].latest_step() != loop.step]
  if which:
    _clock(s, loop)
    loop.last_save_wall_seconds = loop.stats.wall_seconds  # before the save, which stores it
    s.runs.save(state, loop, s.checkpoints, which)


def _minutes_due(s: Session, loop: LoopState, minutes: float) -> bool:
  """Whether train.checkpoint_every_minutes makes this step a save step: at least `minutes` of the run's wall
  time (over every session) since the last checkpoint, by process 0's clock. Collective with several processes:
  call it only where all of them do (log steps)."""
  mine = _wall_seconds(s) - loop.last_save_wall_seconds >= 60 * minutes
  return bool(sharding.from_process_zero(np.array([mine], np.int32))[0])


def _wall_seconds(s: Session) -> float:
  """The run's wall time: its earlier sessions' and this one's so far."""
  return s.earlier.wall_seconds + time.time() - s.runs.lead.wall_start


def _maybe_stop(s: Session, loop: LoopState, may_exchange: bool) -> str | None:
  """Why the loop stops after this step, or None. Early stopping ends each run whose train.best_metric has not
  improved for train.early_stopping_patience evals. A SIGTERM/SIGINT stops the loop; several processes must stop at the
  same step (saving is collective), so they exchange their signals only where every one passes
  `may_exchange=True` (log steps, which they all reach together). With no run left, the loop stops too."""
  patience = s.runs.lead.config.train.early_stopping_patience
  for k in loop.training():
    record = loop.runs[k]
    if patience and record.evals_since_best >= patience:
      record.stopped_by = run_summary.early_stop_reason(s.runs.trainers[k].config.train.best_metric,
                                                        record.evals_since_best)
      record.end_step = loop.step
  if s.stop.agreed(may_exchange):
    return f"signal {s.stop.received or 'to another process'}"
  return None if loop.training() else "every run stopped"


def _clock(s: Session, loop: LoopState) -> None:
  """The stats' wall time and compilations: the earlier sessions' and this one's."""
  compiled = (s.train_step, s.evaluator.step)
  loop.stats.wall_seconds = _wall_seconds(s)
  loop.stats.num_compilations = s.earlier.num_compilations + sum(c.num_compilations for c in compiled)
  loop.stats.compile_seconds = s.earlier.compile_seconds + sum(c.compile_seconds for c in compiled)


def _summarize(s: Session, loop: LoopState, done: bool, stopping: str | None = None) -> list[dict]:
  """Each run's summary (while training, of the runs still training), written to its summary.json unless the
  run failed, as a run alone that raises writes none."""
  _clock(s, loop)
  lead = s.runs.lead
  out = []
  for k, (run, record) in enumerate(zip(s.runs.trainers, loop.runs)):
    if record.stopped_by and not done:
      continue
    end = loop.step if record.end_step is None else record.end_step
    summary = {**run_summary.make_summary(lead, run, record, end, loop.stats, s.peak, done,
                                          record.stopped_by or (stopping if done else None)),
               **s.runs.summary_extra(k)}
    if record.error:
      summary["error"] = record.error
    elif lead.is_primary:
      run_log.write_summary(str(run.workdir), summary)
    out.append(summary)
  return out
