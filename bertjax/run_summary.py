"""What a run reports: its start lines and the fields of its summary.json (throughput, MFU, compilation,
best and final eval, how it ended)."""

from bertjax import flops, optim
from bertjax.data import pipeline
from bertjax.loop_state import RunRecord, Stats
from bertjax.matmul_peak import Peak
from bertjax.metrics import BEST_MODES


def eval_scalars(result: dict, regression: bool) -> dict:
  """An eval's scalars under the names metrics.jsonl, summary.json, TensorBoard, train.best_metric and sweeps
  share: eval_loss (the unweighted log loss, or the MSE), accuracy, macro_f1, micro_f1, mcc; mse, pearson, spearman."""
  keys = ("mse", "pearson", "spearman") if regression else ("accuracy", "macro_f1", "micro_f1", "mcc")
  return {"eval_loss": float(result["loss"]), **{k: float(result[k]) for k in keys if k in result}}


def examples_in_steps(batcher, steps: int) -> int:
  """Examples in the first `steps` training steps (with packing, a step's count varies around the batch size)."""
  total, epoch = 0, 0
  while steps > 0:
    sizes = batcher.examples_per_step(epoch)
    total += int(sizes[:steps].sum())
    steps -= len(sizes)
    epoch += 1
  return total


def best_entry(step: int, scalars: dict) -> dict:
  """summary.json's `best` and `final`: the eval's step and scalars."""
  return {"step": step, **scalars}


def early_stop_reason(metric: str, evals: int) -> str:
  return f"early stopping ({metric} did not improve for {evals} evals)"


def make_summary(trainer, run, record: RunRecord, step: int, stats: Stats, peak: Peak, done: bool,
                 stopped_by: str | None) -> dict:
  """`trainer`: the Trainer whose data and model every run shares; `run`: the Trainer of the run summarised (its
  config), `record` its evals and end; `stats`: the loop's, with its wall time and compilations up to date;
  `peak`: the matmul peak MFU divides by."""
  seconds = max(stats.train_seconds, 1e-9)
  tokens_per_sec = stats.tokens / seconds
  # FLOPs per real token of this dataset (mean over the train set), times the measured token rate.
  data = trainer.data
  lengths = data.train.batcher.lengths
  flops_per_token = flops.train_flops(trainer.model_cfg, lengths) / max(int(lengths.sum()), 1)
  config = run.config
  return {
      "model": config.model.name_or_path,
      "family": trainer.model_cfg.family,
      "task": data.task,
      "num_train_examples": len(data.train),
      "num_eval_examples": pipeline.example_count(data.eval),
      "global_batch_size": config.train.global_batch_size,
      "mean_examples_per_step": examples_in_steps(data.train.batcher, step) / max(step, 1),
      "steps": step,
      "total_steps": trainer.total_steps,
      "epochs_completed": trainer.epochs_at(step),
      "train_examples_per_sec": stats.examples / seconds,
      "train_tokens_per_sec": tokens_per_sec,
      "padding_fraction": 1.0 - stats.tokens / max(stats.slots, 1),
      "mfu": tokens_per_sec * flops_per_token / peak.flops,
      "mfu_method": "train FLOPs of real tokens (3x forward, attention within each example) / matmul peak "
                    f"of the run's devices ({trainer.matmul_dtype} operands, float32 sums; see mfu_peak_source)",
      "mfu_peak_source": peak.source,
      "matmul_dtype": trainer.matmul_dtype,
      "matmul_peak_flops": peak.flops,
      "num_compilations": stats.num_compilations,
      "compile_seconds": stats.compile_seconds,
      "input_wait_fraction": stats.wait_seconds / seconds,
      "best_metric": config.train.best_metric,
      "best": record.best,
      "final": record.last_eval,
      "wall_seconds": stats.wall_seconds,
      "train_seconds": stats.train_seconds,
      "finished": done and stopped_by is None and step >= trainer.total_steps,
      "stopped_by": stopped_by,
      "skipped_steps": record.skipped_steps,
  }


def _layout(batcher) -> str:
  if not batcher.packing:
    return "length buckets"
  empty = batcher.rows_per_step - batcher.plan_rows
  extra = f", {empty} of them empty so the devices split them evenly" if empty else ""
  return f"packed, {batcher.rows_per_step} rows of {batcher.row_length} tokens{extra}"


def _derived(trainer) -> str:
  """What optimizer.lr_scaling changed for the batch size, e.g. "(lr_scaling auto for batch 1024 = 32 x the
  recipe's 32: learning_rate 5e-05 -> 0.000283, b2 0.999 -> 0.968)"."""
  opt, derived = trainer.config.optimizer, trainer.opt_plan.derived
  if not derived:
    return ""
  ratio = trainer.config.train.global_batch_size / opt.base_batch_size
  changes = ", ".join(f"{key} {old:g} -> {new:.3g}" if isinstance(old, float) else f"{key} {old} -> {new}"
                      for key, (old, new) in derived.items())
  return (f" (lr_scaling {opt.lr_scaling} for batch {trainer.config.train.global_batch_size} = {ratio:g} x the "
          f"recipe's {opt.base_batch_size}: {changes})")


def _accumulation(trainer) -> str:
  steps, batcher = trainer.grad_accum_steps, trainer.data.train.batcher
  how = " (auto)" if trainer.config.train.grad_accum_steps == "auto" else ""
  if steps == 1:
    return f", no gradient accumulation{how}"
  devices = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
  return (f", {steps} accumulated micro-batches of {batcher.rows_per_step // devices // steps} rows per device"
          f"{how}")


def _selection(trainer) -> str:
  """How the best checkpoint is chosen and the loss weighted, e.g. "selection: best checkpoint by macro_f1
  (highest); loss weights balanced: neg 0.625, pos 2.5"."""
  tc = trainer.config.train
  if trainer.data.eval is None:
    line = "selection: no eval split, so no evals and no best checkpoint (add --config.data.eval=PATH)"
  else:
    direction = "lowest" if BEST_MODES[tc.best_metric] == "min" else "highest"
    line = (f"selection: best checkpoint by {tc.best_metric} ({direction})"
            + (f", early stopping after {tc.early_stopping_patience} evals without a better one"
               if tc.early_stopping_patience else ""))
  if trainer.class_weights is not None:
    weights = ", ".join(f"{name} {w:.4g}" for name, w in zip(trainer.data.label_names, trainer.class_weights))
    line += f"; loss weights {'balanced' if tc.class_weights == 'balanced' else 'given'}: {weights}"
  return line


def start_lines(trainer, step: int) -> list[str]:
  """The lines a run logs before its first step: model, data, optimizer, and how the steps compute."""
  tc, d, opt = trainer.config.train, trainer.data, trainer.config.optimizer
  att, (deterministic, why) = trainer.attention, trainer.deterministic
  shards = d.train.batcher.num_shards
  own = (f", {shards} shards, {len(d.train.examples)} train examples read by this host"
         if len(d.train.examples) < len(d.train) else (f", {shards} shards" if shards > 1 else ""))
  return [
      f"model: {trainer.model_cfg.family} {trainer.config.model.name_or_path} ({trainer.model_cfg.num_layers} "
      f"layers, hidden {trainer.model_cfg.hidden_size}, {d.num_labels} labels, {trainer.dtype}"
      f"{' (auto)' if trainer.config.model.dtype == 'auto' else ''}, matmuls {trainer.matmul_dtype}"
      f"{' (auto)' if trainer.config.model.matmul_dtype == 'auto' else ''})",
      f"data: {len(d.train)} train / {pipeline.example_count(d.eval)} eval examples; "
      f"{trainer.steps_per_epoch} steps per epoch, {len(d.train) / trainer.steps_per_epoch:.1f} examples per step; "
      f"padding {d.train.batcher.padding_fraction(0):.1%} ({_layout(d.train.batcher)}{own})",
      f"optimizer: {trainer.opt_plan.name}, peak learning rate {trainer.opt_plan.hparams['learning_rate']:.3g}"
      f"{_derived(trainer)}, "
      f"{trainer.total_steps} steps ({trainer.opt_plan.hparams['warmup_steps']} warmup), batch {tc.global_batch_size} "
      f"on mesh {dict(trainer.mesh.shape)}"
      + _accumulation(trainer)
      + (f", resuming at step {step}" if step else ""),
      f"attention: train {att.train} ({att.train_why}), eval {att.eval} ({att.eval_why}); deterministic ops "
      f"{'on' if deterministic else 'off'} ({why})",
      _selection(trainer)] + _short_run(trainer)


def _short_run(trainer) -> list[str]:
  """optim.short_run_advice for this run's steps and examples, as a line if it has one."""
  tc = trainer.config.train
  examples = trainer.total_steps * len(trainer.data.train) / trainer.steps_per_epoch
  advice = optim.short_run_advice(trainer.total_steps, examples, tc.global_batch_size,
                                  trainer.config.optimizer.base_batch_size, bool(tc.max_steps))
  return [advice] if advice else []
