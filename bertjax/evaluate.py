"""The jitted evaluator, and a command line that evaluates runs alone and as an ensemble.

  python -m bertjax.evaluate --workdir DIR [--workdir DIR2 ...] [--checkpoint best|latest|STEP ...]
      [--data PATH_OR_TFDS] [--vote soft|hard|weighted] [--weights W1,W2 | --heldout PATH]
      [--json OUT.json] [--confusion_png PREFIX]

`--checkpoint` is given once (for every workdir) or once per `--workdir`, paired in order, so two
checkpoints of one run are `--workdir D --checkpoint best --workdir D --checkpoint latest`.
`--data` defaults to the first run's data.eval and is read with its data options; each model
tokenizes it with its own tokenizer, max_length and truncation. `weighted` is a soft vote with
`--weights`, or with the weights that minimise the log loss on `--heldout` (a labelled split).
"""

import dataclasses
import functools
import json
import sys
from pathlib import Path

import numpy as np
import jax
from absl import flags

from bertjax import ensemble
from bertjax import metrics as metrics_lib
from bertjax import sharding
from bertjax.data.batching import Batcher
from bertjax.data.prefetch import Prefetch
from bertjax.errors import UserError, exit_on_user_error
from bertjax.models.layers import cast_kernels
from bertjax.models.heads import SequenceClassifier
from bertjax.step import CompiledByShape, make_eval_step

VOTES = ("soft", "hard", "weighted")


class Evaluator:
  """Compiles one eval step per batch shape and assembles logits in dataset order."""

  def __init__(self, model: SequenceClassifier, mesh, param_shardings):
    self.mesh = mesh
    self.batch_sharding = sharding.batch_sharding(mesh)
    # The weights in the products' operand dtype, cast once per pass (bf16 under float32 compute).
    self.cast = jax.jit(functools.partial(cast_kernels, model.cfg), out_shardings=param_shardings)
    self.step = CompiledByShape(jax.jit(make_eval_step(model), in_shardings=(param_shardings, self.batch_sharding),
                                        out_shardings=(self.batch_sharding, self.batch_sharding)), "eval step")

  def logits(self, params, batcher: Batcher, num_examples: int) -> np.ndarray:
    """[num_examples, C] float32 logits, row i for example i."""
    params = self.cast(params)
    out = None
    seen = np.zeros(num_examples, bool)
    pending = None

    def collect(item):
      nonlocal out
      logits, ids = sharding.host_array(item[0], "eval logits"), sharding.host_array(item[1], "eval logits")
      if out is None:
        out = np.zeros((num_examples, logits.shape[-1]), np.float32)
      real = ids >= 0
      out[ids[real]] = logits[real]
      seen[ids[real]] = True

    batches = Prefetch(batcher.iterate(0), lambda chunk: sharding.global_batches(chunk, self.batch_sharding))
    try:
      for batch in batches:
        current = self.step(params, batch)
        if pending is not None:
          collect(pending)  # read the previous batch while this one runs
        pending = current
      if pending is not None:
        collect(pending)
    finally:
      batches.close()
    if not seen.all():
      raise RuntimeError(f"evaluation missed {int((~seen).sum())} of {num_examples} examples")
    return out

  def evaluate(self, params, batcher: Batcher, labels: np.ndarray, task: str,
               label_names: list[str] | None = None) -> dict:
    logits = self.logits(params, batcher, len(labels))
    return compute_metrics(logits, labels, task, label_names)


def compute_metrics(logits: np.ndarray, labels: np.ndarray, task: str, label_names=None) -> dict:
  if task == "regression":
    return metrics_lib.regression_metrics(logits[:, 0], labels)
  return metrics_lib.classification_metrics(logits, labels, label_names)


# ----- restoring runs and computing their logits -------------------------------------------


class Predictor:
  """Batches tokenized examples for one mesh and keeps one Evaluator per architecture."""

  def __init__(self):
    self.mesh = sharding.make_mesh(-1, 1)
    self.replicated = sharding.replicated(self.mesh)
    self._evaluators: dict = {}

  def evaluator(self, model_cfg) -> Evaluator:
    if model_cfg not in self._evaluators:  # same architecture -> same executables
      self._evaluators[model_cfg] = Evaluator(SequenceClassifier(model_cfg), self.mesh, self.replicated)
    return self._evaluators[model_cfg]

  @property
  def num_compilations(self) -> int:
    return sum(e.step.num_compilations for e in self._evaluators.values())

  @property
  def compile_seconds(self) -> float:
    return sum(e.step.compile_seconds for e in self._evaluators.values())

  def batcher(self, tokens, batch_size: int, packing: bool, max_length: int, max_per_row: int) -> Batcher:
    devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    batch_size = -(-max(batch_size, 1) // devices) * devices  # unpacked rows split evenly over devices
    return Batcher(tokens, None, global_batch_size=batch_size, max_length=max_length, packing=packing,
                   max_per_row=max_per_row, shuffle=False, process_index=jax.process_index(),
                   process_count=jax.process_count(), row_multiple=sharding.local_rows_multiple(self.mesh))

  def logits(self, model_cfg, params, tokens, **batching) -> np.ndarray:
    params = jax.device_put(params, self.replicated)
    return self.evaluator(model_cfg).logits(params, self.batcher(tokens, **batching), len(tokens))


def parse_members(workdirs: list[str], checkpoints: list[str]) -> list[tuple[str, str]]:
  """(workdir, checkpoint) pairs: one --checkpoint for all, or one per --workdir in order."""
  if not workdirs:
    raise UserError("give at least one --workdir")
  if not checkpoints:
    checkpoints = ["best"]
  if len(checkpoints) == 1:
    checkpoints = checkpoints * len(workdirs)
  if len(checkpoints) != len(workdirs):
    raise UserError(f"{len(checkpoints)} --checkpoint values for {len(workdirs)} --workdir values; give one "
                    "for all or one per --workdir (paired in order)")
  return list(zip(workdirs, checkpoints))


def check_agreement(workdirs: list[str]) -> None:
  """All members must solve the same task with the same label ids; names the first pair that differs.

  Read from each labels.json, so a mismatch fails before any checkpoint is restored.
  """
  def mapping(workdir):
    path = Path(workdir) / "labels.json"
    if not path.is_file():
      raise UserError(f"{path}: missing (is {workdir} a bertjax training workdir?)")
    labels = json.loads(path.read_text())
    return labels["task"], labels["label_names"]

  first = mapping(workdirs[0])
  for workdir in workdirs[1:]:
    other = mapping(workdir)
    if other != first:
      raise UserError(f"label mappings differ: {workdirs[0]} has {first[0]} labels {first[1]} but "
                      f"{workdir} has {other[0]} labels {other[1]}")


def run_logits(predictor: Predictor, run, examples, batch_size: int = 0) -> np.ndarray:
  """A restored run's logits [N, C] on examples, tokenized with its own tokenizer and data options."""
  from bertjax.data.tokenize import tokenize
  from bertjax.data.tokenizer import load_tokenizer
  d, tc = run.config.data, run.config.train
  tokenizer = load_tokenizer(run.workdir / "model")
  tokens = tokenize(tokenizer, examples, d.max_length, d.truncation, run.model_cfg.type_vocab_size > 1)
  return predictor.logits(run.model_cfg, run.params, tokens,
                          batch_size=batch_size or tc.eval_batch_size or tc.global_batch_size,
                          packing=d.packing, max_length=d.max_length, max_per_row=d.max_per_row)


def read_labelled(run, path: str):
  """Examples and label ids of a labelled split, read with the run's data options."""
  from bertjax.data import pipeline, sources
  examples = pipeline.read(run.config.data, path)
  return examples, sources.encode_labels(examples, run.label_names or [], run.task)


# ----- the ensemble ------------------------------------------------------------------------


def vote(logits_list: list[np.ndarray], labels: np.ndarray, task: str, how: str, weights=None,
         label_names=None) -> tuple[np.ndarray, dict]:
  """The ensemble's output (probabilities [N, C], predicted ids [N] or scores [N]) and its metrics."""
  if how not in VOTES:
    raise UserError(f"--vote must be one of {', '.join(VOTES)}, got {how!r}")
  if task == "regression":
    if how == "hard":
      raise UserError("hard voting needs classes; use --vote soft or weighted for a regression task")
    scores = ensemble.regression_average([l[:, 0] for l in logits_list], weights)
    return scores, metrics_lib.regression_metrics(scores, labels)
  if how == "hard":
    preds = ensemble.hard_vote(logits_list, weights)
    one_hot = np.eye(logits_list[0].shape[1])[preds]
    out = metrics_lib.classification_metrics(one_hot, labels, label_names)
    out["loss"] = None  # a vote has no probabilities
    return preds, out
  probs = ensemble.soft_vote(logits_list, weights)
  # log(probs) as logits: its softmax gives back probs, so the log loss is the mixture's.
  return probs, metrics_lib.classification_metrics(np.log(np.maximum(probs, 1e-300)), labels, label_names)


@dataclasses.dataclass
class Report:
  members: list[dict]  # workdir, checkpoint, checkpoint_step, metrics
  member_logits: list[np.ndarray]
  labels: np.ndarray
  label_names: list[str] | None
  ensemble: dict | None  # vote, weights, metrics (None for a single model)
  ensemble_output: np.ndarray | None
  num_compilations: int

  def to_json(self) -> dict:
    return {"models": self.members, "ensemble": self.ensemble, "num_compilations": self.num_compilations}


def evaluate_members(pairs: list[tuple[str, str]], data: str = "", how: str = "soft", weights=None,
                     heldout: str = "", batch_size: int = 0, predictor: Predictor | None = None) -> Report:
  """Restores each (workdir, checkpoint), evaluates it on `data` and combines them by `how`.

  A `predictor` passed in keeps its compiled steps for later calls.
  """
  from bertjax.workdir import load_run
  if how != "weighted" and (weights or heldout):
    raise UserError("--weights and --heldout go with --vote weighted")
  if how == "weighted" and bool(weights) == bool(heldout):
    raise UserError("--vote weighted needs either --weights or --heldout (not both)")
  if weights and len(weights) != len(pairs):
    raise UserError(f"{len(weights)} --weights for {len(pairs)} models")
  check_agreement([workdir for workdir, _ in pairs])
  runs = [load_run(workdir, which) for workdir, which in pairs]
  first = runs[0]
  data = data or first.config.data.eval
  if not data:
    raise UserError(f"{first.workdir} has no data.eval; give --data")
  examples, labels = read_labelled(first, data)
  predictor = predictor or Predictor()
  member_logits = [run_logits(predictor, run, examples, batch_size) for run in runs]
  members = [{"workdir": str(run.workdir), "checkpoint": which, "checkpoint_step": run.step,
              "metrics": compute_metrics(logits, labels, run.task, run.label_names)}
             for run, (_, which), logits in zip(runs, pairs, member_logits)]
  ens, output = None, None
  if len(runs) > 1:
    if heldout:
      if first.task == "regression":
        raise UserError("--heldout fits classification vote weights; give --weights for a regression task")
      held_examples, held_labels = read_labelled(first, heldout)
      weights = ensemble.fit_vote_weights([run_logits(predictor, run, held_examples, batch_size) for run in runs],
                                          held_labels)
    output, ens_metrics = vote(member_logits, labels, first.task, how, weights, first.label_names)
    used = None if weights is None else [float(w) for w in np.asarray(weights) / np.sum(weights)]
    ens = {"vote": how, "weights": used, "metrics": ens_metrics}
  return Report(members, member_logits, labels, first.label_names, ens, output, predictor.num_compilations)


# ----- printing ----------------------------------------------------------------------------


def format_metrics(metrics: dict) -> str:
  """Scalars on one line, then (classification) per-class precision/recall/F1 and the confusion matrix."""
  keys = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "mcc", "loss", "mse", "pearson", "spearman")
  head = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if metrics.get(k) is not None)
  lines = [f"{head}  ({metrics['num_examples']} examples)"]
  if "confusion_matrix" in metrics:
    names = metrics.get("label_names") or [str(i) for i in range(len(metrics["f1"]))]
    width = max(len("class"), *(len(n) for n in names))
    lines.append(f"{'class'.ljust(width)}  precision  recall      f1  support")
    for i, name in enumerate(names):
      lines.append(f"{name.ljust(width)}  {metrics['precision'][i]:9.4f}  {metrics['recall'][i]:6.4f}  "
                   f"{metrics['f1'][i]:6.4f}  {metrics['support'][i]:7d}")
    lines.append(metrics_lib.format_confusion_table(metrics["confusion_matrix"], names))
  return "\n".join(lines)


def print_report(report: Report, out=sys.stdout) -> None:
  for i, m in enumerate(report.members):
    print(f"== model {i}: {m['workdir']} ({m['checkpoint']}, step {m['checkpoint_step']})", file=out)
    print(format_metrics(m["metrics"]), file=out)
  if report.ensemble is not None:
    weights = report.ensemble["weights"]
    note = "" if weights is None else " weights " + ", ".join(f"{w:.3f}" for w in weights)
    print(f"== ensemble of {len(report.members)}: {report.ensemble['vote']} vote{note}", file=out)
    print(format_metrics(report.ensemble["metrics"]), file=out)


def save_confusion_pngs(report: Report, prefix: str) -> list[str]:
  """<prefix>_model<i>.png per model and <prefix>_ensemble.png (classification only)."""
  named = [(f"{prefix}_model{i}.png", m["metrics"]) for i, m in enumerate(report.members)]
  if report.ensemble is not None:
    named.append((f"{prefix}_ensemble.png", report.ensemble["metrics"]))
  paths = []
  for path, metrics in named:
    if "confusion_matrix" in metrics:
      names = metrics.get("label_names") or [str(i) for i in range(len(metrics["f1"]))]
      metrics_lib.save_confusion_png(metrics["confusion_matrix"], names, path)
      paths.append(path)
  return paths


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  try:
    weights = [float(w) for w in f.weights] if f.weights else None
  except ValueError:
    raise UserError(f"--weights must be numbers, got {','.join(f.weights)}") from None
  report = evaluate_members(parse_members(f.workdir or [], f.checkpoint or []), f.data, f.vote, weights,
                            f.heldout, f.batch_size)
  print_report(report)
  if jax.process_index() != 0:
    return
  prefix = f.confusion_png or (str(Path(f.json).with_suffix("")) + "_confusion" if f.json else "")
  for path in save_confusion_pngs(report, prefix) if prefix else []:
    print(f"wrote {path}", file=sys.stderr)
  if f.json:
    Path(f.json).parent.mkdir(parents=True, exist_ok=True)
    Path(f.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    print(f"wrote {f.json}", file=sys.stderr)


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module (the trainer does) defines none."""
  flags.DEFINE_multi_string("workdir", None, "Training workdir (repeat for an ensemble).")
  flags.DEFINE_multi_string("checkpoint", None, "best | latest | STEP: once for all, or once per --workdir.")
  flags.DEFINE_string("data", "", "Labelled split (.tsv/.csv/.jsonl or tfds:NAME:SPLIT); default the run's data.eval.")
  flags.DEFINE_enum("vote", "soft", VOTES, "How an ensemble combines its members.")
  flags.DEFINE_list("weights", None, "Member weights for --vote weighted (one per --workdir).")
  flags.DEFINE_string("heldout", "", "Labelled split to fit --vote weighted weights on.")
  flags.DEFINE_string("json", "", "Write the metrics here as JSON.")
  flags.DEFINE_string("confusion_png", "", "PNG path prefix for confusion matrices (default: next to --json).")
  flags.DEFINE_integer("batch_size", 0, "Examples per batch; 0 = each run's eval batch size.")


if __name__ == "__main__":
  from absl import logging
  from bertjax.cli_setup import run_cli
  from bertjax.host_memory import keep_freed_memory
  keep_freed_memory()  # before jax creates its CPU client
  _define_flags()
  logging.set_verbosity(logging.WARNING)
  run_cli(main)
