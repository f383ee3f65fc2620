"""The training loop: build, (resume,) step, evaluate, checkpoint, log, summarise.

Everything that can fail on bad input (config, model folder, data) is checked before the workdir
is touched, so a failed start loses nothing.
"""

import copy
import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bertjax import checkpoint as ckpt_lib
from bertjax import cli_setup, matmul_peak, optim, plot, resume, run_log, run_summary, sharding
from bertjax import workdir as workdir_lib
from bertjax.config_base import check_values
from bertjax.data import pipeline
from bertjax.data.prefetch import Prefetch
from bertjax.errors import UserError, first_line
from bertjax.evaluate import Evaluator
from bertjax.metrics import is_better
from bertjax.models import hf_weights
from bertjax.models.config import from_hf_config, resolve_attention, resolve_attention_dropout, resolve_dtypes
from bertjax.models.heads import SequenceClassifier
from bertjax.step import CompiledByShape, TrainState, auto_accumulation, class_weight_vector, make_train_step
from bertjax.stop_signal import StopSignal


def grad_accum_setting(train_cfg) -> int | str:
  """train.grad_accum_steps: a positive integer, or "auto" (`step.auto_accumulation`)."""
  value = train_cfg.grad_accum_steps
  if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
    return value
  raise UserError(f"train.grad_accum_steps must be auto or a positive integer, got {value!r}")


def build_data(config: ml_collections.ConfigDict, workdir: Path, cache_dir: Path | None):
  """(mesh, model folder, tokenizer, TaskData, accumulation steps) of a run: the data read, tokenized
  (cached in cache_dir; None: no cache) and batched for this process, and train.grad_accum_steps resolved.
  Labels a resumed run saved in `workdir` keep their ids."""
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
  tokenizer = pipeline.load_tokenizer(folder)
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
  return mesh, folder, tokenizer, data, accum


class WriteFailed(Exception):
  """The workdir could not be written (disk full, permissions): reported in one line, exit code 1."""


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Member:
  """One run's own outputs and bookkeeping inside the training loop: a single run has one member,
  a trial group (bertjax.trial_group) one per trial."""
  run: "Trainer"  # its config, workdir and optimizer
  index: int
  label: str = ""  # prefix of its log lines
  checkpoints: ckpt_lib.Checkpoints | None = None
  runlog: run_log.RunLog | None = None
  best: dict | None = None
  evals_since_best: int = 0
  last_eval: dict | None = None
  skipped_steps: int = 0
  stopped_by: str | None = None  # set when it stops before the others (early stopping, non-finite loss)
  end_step: int | None = None
  error: str | None = None  # why it failed (the error a single run would raise); no summary.json then

  def meta(self) -> dict:
    return {"best": self.best, "evals_since_best": self.evals_since_best, "last_eval": self.last_eval,
            "skipped_steps": self.skipped_steps, "stopped_by": self.stopped_by, "end_step": self.end_step,
            "error": self.error}

  def load_meta(self, meta: dict) -> None:
    for key, value in meta.items():
      setattr(self, key, value)


class Trainer:
  """Owns the run's objects; `run()` trains to the end (or a stop) and returns the summary.

  `like`: another Trainer (same data and model, e.g. the first trial of a group) whose data, mesh
  and tokenizer are shared instead of built again; `cache_dir`: the tokenization cache folder
  (default: the workdir's); `token_cache=False` tokenizes without one, so that nothing is written."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, like: "Trainer | None" = None,
               cache_dir: Path | None = None, token_cache: bool = True):
    workdir_existed = Path(workdir).exists()
    try:
      self._build(config, workdir, like, cache_dir, token_cache)
    except UserError:
      if not workdir_existed:  # a fresh workdir holds only the token cache written on the way: leave nothing
        shutil.rmtree(workdir, ignore_errors=True)
      raise

  def _build(self, config, workdir, like, cache_dir, token_cache) -> None:
    config = self.config = copy.deepcopy(config)  # resolved keys below are written here, not in the caller's
    self.workdir = Path(workdir)
    self.is_primary = jax.process_index() == 0
    t0 = time.perf_counter()
    self.wall_start = time.time()
    tc = config.train
    self.dtype, self.matmul_dtype = resolve_dtypes(config.model)
    self.deterministic = cli_setup.deterministic_ops(tc.deterministic, jax.default_backend())
    if config.data.task not in ("classification", "regression"):
      raise UserError(f"data.task must be classification or regression, got {config.data.task!r}")
    check_values(config)
    if not config.data.num_shards:  # one shard per process, recorded so a resume reads the same shards
      config.data.num_shards = jax.process_count()
    if (self.workdir / "checkpoints").exists():
      resume.check_resume_compatible(self.workdir, config)
    self.config_changes = resume.changed_settings(self.workdir, config)  # refused unless allowed

    # Model folder, tokenizer, data: all validated before anything is written.
    if like is not None:
      self.mesh, self.folder, self.tokenizer, self.data = like.mesh, like.folder, like.tokenizer, like.data
      self.grad_accum_steps = like.grad_accum_steps
      self._resolve_attention(like.loaded.cfg)
    else:
      # Before the data is tokenized into the workdir's cache: the attention settings need only config.json.
      folder = hf_weights.resolve_folder(config.model.name_or_path)
      self._resolve_attention(from_hf_config(hf_weights.read_hf_config(folder), str(folder / "config.json")))
      self.mesh, self.folder, self.tokenizer, self.data, self.grad_accum_steps = build_data(
          config, self.workdir, (cache_dir or self.workdir / "cache") if token_cache else None)
    if like is not None and like.config.train.seed == tc.seed:
      self.loaded = like.loaded
    else:
      self.loaded = hf_weights.load(str(self.folder), num_labels=self.data.num_labels, dtype=self.dtype,
                                    seed=tc.seed, reinit_head=config.model.reinit_head)
      for note in self.loaded.notes:
        log(f"model: {note}")
    self.model_cfg = self.loaded.cfg.replace(  # `like` may differ in these
        dtype=self.dtype, matmul_dtype=self.matmul_dtype, attention_dropout=self.attention_dropout,
        attention=self.attention.train)
    self.model = SequenceClassifier(self.model_cfg)
    self.eval_model = SequenceClassifier(self.model_cfg.replace(attention=self.attention.eval))
    self.regression = self.data.task == "regression"
    self.class_weights = class_weight_vector(tc.class_weights, self.data.train.labels, self.data.num_labels)

    # Packed epochs differ by a step or so (each epoch packs its own shuffle), so count them one by one.
    batcher = self.data.train.batcher
    self.steps_per_epoch = batcher.steps_in_epoch(0)
    if like is not None:
      self.total_steps = like.total_steps
    elif tc.max_steps:
      self.total_steps = tc.max_steps
    else:
      full = int(tc.num_epochs)
      self.total_steps = sum(batcher.steps_in_epoch(e) for e in range(full))
      self.total_steps += int(math.ceil((tc.num_epochs - full) * batcher.steps_in_epoch(full)))
    if self.total_steps < 1:
      raise UserError(f"train.num_epochs={tc.num_epochs} gives no training step")
    self.opt_plan = optim.plan_optimizer(config.optimizer, self.total_steps, tc.global_batch_size)
    self.tx, self.schedule = optim.build_optimizer(self.opt_plan, self.opt_plan.hparams, self.loaded.params)
    self.effective_lr = self.opt_plan.hparams["learning_rate"]
    self.setup_seconds = time.perf_counter() - t0

  def _resolve_attention(self, checkpoint_cfg) -> None:
    """model.attention_dropout (-1: the checkpoint's) and the attention implementations for this checkpoint."""
    model = self.config.model
    self.attention_dropout = resolve_attention_dropout(model.attention_dropout, checkpoint_cfg.attention_dropout)
    self.attention = resolve_attention(model.attention, checkpoint_cfg.replace(
        dtype=self.dtype, attention_dropout=self.attention_dropout))

  # ----- state (a trial group overrides these) ----------------------------------------------

  def abstract_state(self):
    """The single-run train state's shapes, dtypes and shardings (without building it)."""
    abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                   opt_state=self.tx.init(p), rng=jax.random.PRNGKey(0)),
                              self.loaded.params)
    shardings = sharding.state_shardings(abstract, self.mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  def _init_state(self):
    abstract = self.abstract_state()
    shardings = self.state_shardings = self.member_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    params = jax.device_put(self.loaded.params, shardings.params)
    init = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p),
                                        rng=jax.random.PRNGKey(self.config.train.seed)),
                   in_shardings=(shardings.params,), out_shardings=shardings)
    return init(params), abstract

  def _members(self) -> list[Member]:
    return [Member(self, 0)]

  def _resume(self, abstract):
    """(state, loop meta) from the latest checkpoint, or None for a fresh start."""
    return self._restore_member(self.members[0], abstract)

  def _restore_member(self, member: Member, abstract):
    """(state, loop meta with this one member) from the member's latest checkpoint, or None."""
    latest = member.checkpoints.latest_step()
    if latest is None:
      return None
    state, meta = member.checkpoints.restore(latest, abstract)
    log(f"{member.label}resumed from {member.run.workdir}/checkpoints/{latest} (epoch {meta['epoch']}, "
        f"step {meta['step_in_epoch']} of {self.data.train.batcher.steps_in_epoch(meta['epoch'])})"
        + resume.mesh_note(meta.get("mesh"), dict(self.mesh.shape), self.config.train.global_batch_size))
    saved = {"best": meta["best"], "evals_since_best": meta["evals_since_best"],
             "last_eval": meta.get("last_eval"), "skipped_steps": meta["stats"].get("skipped_steps", 0)}
    return state, {"epoch": meta["epoch"], "step_in_epoch": meta["step_in_epoch"], "stats": meta["stats"],
                   "members": [saved]}

  def _save_shared(self, step: int, state, loop_meta: dict) -> None:
    """A trial group saves its stacked state here, before the members' checkpoints."""

  def _member_state(self, state, index: int):
    return state

  def _member_params(self, state, index: int):
    return state.params

  def _split_metrics(self, metrics: dict) -> list[dict]:
    return [metrics]

  def _make_step_fn(self):
    tc = self.config.train
    return make_train_step(self.model, self.tx, self.schedule, self.regression, self.grad_accum_steps,
                           tc.skip_nonfinite_steps, self.class_weights)

  def jit_train_step(self, state_shardings):
    """The train step as the loop runs it: jitted with explicit in/out shardings, the state donated."""
    return jax.jit(self._make_step_fn(), in_shardings=(state_shardings, sharding.batch_sharding(self.mesh)),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))

  stops_members_alone = False  # on a non-finite loss: a single run raises; a trial group stops that trial

  def _summary_extra(self, member: Member) -> dict:
    return {}

  def _close(self) -> None:
    """Releases what a subclass opened besides the members' checkpoints and logs."""

  def _write_run_files(self) -> None:
    """Config, labels and the model folder (HF config + tokenizer) that evaluate/predict/export read."""
    if self.is_primary:
      hf = hf_weights.hf_config_for(self.model_cfg, self.loaded.hf_config, self.data.label_names, self.regression)
      workdir_lib.write_run_files(self.workdir, self.config_record(), self.data.task, self.data.label_names, hf,
                                  self.tokenizer)

  def config_record(self) -> dict:
    """config.json: the config, and what optimizer.lr_scaling and grad_accum_steps=auto chose for this batch
    size and machine."""
    return {**resume.config_snapshot(self.config),
            "derived": {"optimizer": {k: new for k, (_, new) in self.opt_plan.derived.items()},
                        "grad_accum_steps": self.grad_accum_steps}}

  def _epochs_at(self, step: int) -> float:
    """Epochs completed after `step` steps."""
    batcher, epoch = self.data.train.batcher, 0
    while step >= batcher.steps_in_epoch(epoch):
      step -= batcher.steps_in_epoch(epoch)
      epoch += 1
    return epoch + step / batcher.steps_in_epoch(epoch)

  def _save_member(self, member: Member, step: int, state, loop_meta: dict, eval_scalars: dict | None) -> None:
    """The member's checkpoint at `step` (a no-op if it has one), in the single-run format."""
    if member.checkpoints.latest_step() == step:
      return
    meta = {"epoch": loop_meta["epoch"], "step_in_epoch": loop_meta["step_in_epoch"], "best": member.best,
            "last_eval": member.last_eval, "evals_since_best": member.evals_since_best,
            "stats": {**loop_meta["stats"], "skipped_steps": member.skipped_steps},
            "label_names": self.data.label_names, "mesh": dict(self.mesh.shape)}
    metrics = eval_scalars or None
    try:
      member.checkpoints.save(step, self._member_state(state, member.index), meta, metrics=metrics)
    except ckpt_lib.CheckpointError as e:
      raise WriteFailed(f"saving the checkpoint of step {step} failed ({first_line(e)}); the previous "
                        f"checkpoint (step {member.checkpoints.latest_step()}) is intact") from None

  # ----- the loop ------------------------------------------------------------------------

  def run(self) -> dict:
    return self.run_members()[0]

  def run_members(self) -> list[dict]:
    """Trains every member to the end (or a stop); returns their summaries."""
    tc = self.config.train
    state, abstract = self._init_state()
    members = self.members = self._members()
    for m in members:
      m.checkpoints = ckpt_lib.Checkpoints(str(m.run.workdir / "checkpoints"), keep_best=True, async_save=True,
                                           is_primary=self.is_primary, sync_name=f"member{m.index}",
                                           best_metric=m.run.config.train.best_metric)
    loop = {"epoch": 0, "step_in_epoch": 0, "stats": {}}
    resumed = self._resume(abstract)
    if resumed is not None:
      state, loop = resumed
      for m, meta in zip(members, loop.pop("members")):
        m.load_meta(meta)
    else:
      for m in members:
        try:
          m.run._write_run_files()
        except OSError as e:
          raise WriteFailed(f"cannot write the run files in {m.run.workdir}: {e.strerror or e}") from None
    step = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])  # a group stacks equal steps
    for m in members:
      m.runlog = run_log.RunLog(str(m.run.workdir), self.is_primary)
      m.runlog.truncate_after(step)
      resume.record_changes(m.run, m.runlog, step)
      if tc.early_stopping_patience and m.stopped_by is None and m.evals_since_best >= tc.early_stopping_patience:
        m.stopped_by = run_summary.early_stop_reason(m.run.config.train.best_metric, m.evals_since_best)
    for line in self._start_lines(step):
      log(line)

    batch_sharding = sharding.batch_sharding(self.mesh)
    train_step = CompiledByShape(self.jit_train_step(self.state_shardings), "train step", log)
    evaluator = Evaluator(self.eval_model, self.mesh, self.member_shardings.params)
    progress = run_log.Progress(self.total_steps, is_primary=self.is_primary, every_steps=tc.log_every_steps)
    stop = StopSignal()
    stats = {"train_seconds": 0.0, "examples": 0, "tokens": 0, "slots": 0, "wait_seconds": 0.0,
             "wall_seconds": 0.0, **loop["stats"]}
    stats.pop("skipped_steps", None)  # per member
    self.wall_before = stats["wall_seconds"]
    # Compilations of earlier sessions of this run (a resume compiles again; the summary counts all).
    self.compiled_before = (stats.pop("num_compilations", 0), stats.pop("compile_seconds", 0.0))
    epoch, step_in_epoch = loop["epoch"], loop["step_in_epoch"]
    pending: list[tuple[int, dict]] = []  # device metrics not yet read (read after the next dispatch)
    window = {"examples": 0, "tokens": 0, "seconds": 0.0}  # since the last train log line
    signalled = None
    active = lambda: [m for m in members if m.stopped_by is None]

    def flush(upto_log: bool):
      """Reads pending step metrics; a non-finite loss stops its member (a single run: with an error)."""
      nonlocal pending
      if not pending:
        return
      fetched = [self._split_metrics(m) for m in jax.device_get([m for _, m in pending])]
      for m in active():
        mine = [f[m.index] for f in fetched]
        for (s, _), f in zip(pending, mine):
          m.skipped_steps += int(f["skipped"])
          if f["skipped"]:
            log(f"{m.label}step {s}: non-finite loss or gradients ({f['loss']}); update skipped "
                f"({m.skipped_steps} so far)")
          elif not np.isfinite(f["loss"]):
            error = (f"non-finite loss ({f['loss']}) at step {s}; stopped. The last good checkpoint "
                     f"(step {m.checkpoints.latest_step()}) is kept in {m.run.workdir}/checkpoints")
            if not self.stops_members_alone:
              raise UserError(error)
            m.stopped_by, m.end_step, m.error = f"non-finite loss ({f['loss']}) at step {s}", s, error
            log(f"{m.label}error: {error}")
            break
        if upto_log and m.stopped_by is None:
          n = sum(float(f["examples"]) for f in mine)
          m.runlog.write(pending[-1][0], {
              "loss": sum(float(f["loss"]) * float(f["examples"]) for f in mine) / max(n, 1),
              "accuracy": sum(float(f["accuracy"]) * float(f["examples"]) for f in mine) / max(n, 1),
              "learning_rate": float(mine[-1]["learning_rate"]), "grad_norm": float(mine[-1]["grad_norm"]),
              "examples_per_sec": window["examples"] / max(window["seconds"], 1e-9),
              "tokens_per_sec": window["tokens"] / max(window["seconds"], 1e-9)}, "train")
      if upto_log:
        window.update(examples=0, tokens=0, seconds=0.0)
        if active():
          progress.update(pending[-1][0], fetched[-1][active()[0].index]["loss"])
      pending = []

    def do_eval() -> dict[int, dict]:
      if self.data.eval is None:
        return {}
      out = {}
      for m in active():
        result = evaluator.evaluate(self._member_params(state, m.index), self.data.eval.batcher,
                                    self.data.eval.labels, self.data.task, self.data.label_names)
        scalars = out[m.index] = run_summary.eval_scalars(result, self.regression)
        m.runlog.write(step, scalars, "eval")
        m.last_eval = {"step": step, **scalars}
        log(f"{m.label}eval @ step {step}: " + "  ".join(
            f"{k} {v:.4f}" for k, v in scalars.items()
            if k in ("eval_loss", "accuracy", "macro_f1", "mcc", "pearson", "spearman")))
        if is_better(scalars, m.best, m.run.config.train.best_metric):
          m.best = run_summary.best_entry(step, scalars)
          m.evals_since_best = 0
        else:
          m.evals_since_best += 1
      return out

    def save(evals: dict[int, dict]):
      if all(m.checkpoints.latest_step() == step for m in active()):
        return
      stats["wall_seconds"] = self.wall_before + time.time() - self.wall_start
      compiled = self._compiled(train_step, evaluator)
      loop_meta = {"epoch": epoch, "step_in_epoch": step_in_epoch,
                   "stats": {**stats, "num_compilations": compiled[0], "compile_seconds": compiled[1]}}
      self._save_shared(step, state, {**loop_meta, "members": [m.meta() for m in members]})
      for m in active():
        self._save_member(m, step, state, loop_meta, evals.get(m.index))

    def summarize(done: bool = False):
      for m in members if done else active():
        end = m.end_step if m.end_step is not None else step
        epochs = epoch + step_in_epoch / self.data.train.batcher.steps_in_epoch(epoch) if end == step \
            else self._epochs_at(end)
        m.summary = self._write_summary(m, end, epochs, stats, evaluator, train_step, done=done,
                                        stopped_by=m.stopped_by or (signalled if done else None))

    try:
      while step < self.total_steps and signalled is None and active():
        batcher = self.data.train.batcher
        real_tokens = batcher.global_real_tokens(epoch)
        plan_sizes = batcher.examples_per_step(epoch).tolist()
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
            stats["slots"] += batch.shape[0] * batch.length
            step += 1
            step_in_epoch += 1
            epoch_end = step_in_epoch == epoch_len
            if epoch_end:
              epoch, step_in_epoch = epoch + 1, 0
            pending.append((step, metrics))
            eval_due = (step % tc.eval_every_steps == 0) if tc.eval_every_steps else epoch_end
            eval_due = eval_due or step == self.total_steps
            stopping = stop.agreed(step % tc.log_every_steps == 0)
            boundary = (eval_due or step == self.total_steps or
                        (tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0) or stopping)
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
              evals = do_eval() if eval_due else {}
              if evals or step == self.total_steps or stopping or (
                  tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0):
                save(evals)
              if not stopping and stop.agreed(True):  # a signal during the eval or save: stop at this step
                stopping = True
                save(evals)  # nothing to do if this step was just saved
              if evals:
                summarize()
              for m in active():
                if tc.early_stopping_patience and m.evals_since_best >= tc.early_stopping_patience:
                  m.stopped_by = run_summary.early_stop_reason(m.run.config.train.best_metric, m.evals_since_best)
                  m.end_step = step
              if stopping:
                signalled = f"signal {stop.received or 'to another process'}"
              t_segment, compile_mark = time.perf_counter(), train_step.compile_seconds
            if step >= self.total_steps or signalled is not None or not active():
              break
          stats["wait_seconds"] += batches.wait_seconds
        finally:
          batches.close()
      flush(upto_log=True)
      if self.data.eval is not None and any(m.last_eval is None or m.last_eval["step"] != step for m in active()):
        save(do_eval())
      for m in members:
        try:
          m.checkpoints.wait()
        except ckpt_lib.CheckpointError as e:
          raise WriteFailed(f"writing the final checkpoint failed ({first_line(e)}); the previous "
                            f"checkpoint (step {m.checkpoints.latest_step()}) is intact") from None
      summarize(done=True)
    finally:
      stop.restore()
      for m in members:
        m.checkpoints.close()
        if m.runlog is not None:
          m.runlog.close()
      self._close()
    for m in members:
      if self.is_primary:
        plot.plot_metrics(m.run.workdir)
      log(f"{m.label}done: {m.stopped_by or signalled or 'finished'} at step {m.summary['steps']}; checkpoints in "
          f"{m.run.workdir}/checkpoints (latest {m.checkpoints.latest_step()}, best {m.checkpoints.best_step()}), "
          f"TensorBoard logs in {m.run.workdir}/tensorboard, summary in {m.run.workdir}/summary.json")
    return [m.summary for m in members]

  # ----- reporting -----------------------------------------------------------------------

  def _start_lines(self, step: int) -> list[str]:
    return run_summary.start_lines(self, step)

  def _compiled(self, train_step, evaluator) -> tuple[int, float]:
    """(compilations, seconds compiling) of the whole run, earlier sessions included."""
    return (self.compiled_before[0] + train_step.num_compilations + evaluator.step.num_compilations,
            self.compiled_before[1] + train_step.compile_seconds + evaluator.step.compile_seconds)

  def _write_summary(self, member: Member, step, epochs_completed, stats, evaluator, train_step, done=False,
                     stopped_by=None) -> dict:
    """Writes the member's summary.json (not for a failed member, as a run that raised writes none)."""
    compiled, peak = self._compiled(train_step, evaluator), matmul_peak.run_peak(self.matmul_dtype)
    summary = {**run_summary.make_summary(self, member, step, epochs_completed, stats, peak, compiled, done,
                                          stopped_by), **self._summary_extra(member)}
    if member.error:
      summary["error"] = member.error
    elif self.is_primary:
      run_log.write_summary(str(member.run.workdir), summary)
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return Trainer(config, workdir).run()
