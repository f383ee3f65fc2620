"""The model's frozen configuration, built once from a Hugging Face `config.json`."""

import dataclasses
from typing import Any

from bertjax.errors import UserError

FAMILIES = ("bert", "roberta", "electra", "albert")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Everything the Flax modules need; the per-family differences live here, not in code copies."""

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  embedding_size: int = 0  # 0 = hidden_size
  project_embeddings: bool = False  # ELECTRA when embedding_size != hidden_size; always for ALBERT
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float = 0.1
  position_offset: int = 0  # RoBERTa numbers positions from pad_token_id + 1
  num_param_layers: int = 0  # distinct layer parameter sets (ALBERT shares them); 0 = num_layers
  inner_group_num: int = 1  # ALBERT: layers run per shared group
  head: str = "pooler"  # pooler (BERT/ALBERT) | dense_tanh (RoBERTa) | dense_gelu (ELECTRA)
  num_labels: int = 2
  pad_token_id: int = 0
  initializer_range: float = 0.02
  dtype: str = "float32"  # computation dtype; parameters stay float32
  matmul_dtype: str = ""  # operand dtype of the dense layers' products, summed in float32; "" = dtype
  attention: str = "einsum"  # einsum | xla | cudnn (see resolve_attention)

  @property
  def emb_size(self) -> int:
    return self.embedding_size or self.hidden_size

  @property
  def param_layers(self) -> int:
    return self.num_param_layers or self.num_layers

  def layer_schedule(self) -> list[int]:
    """Which parameter set each applied layer uses (ALBERT maps many layers onto few groups)."""
    groups = self.param_layers // self.inner_group_num
    order = []
    for i in range(self.num_layers):
      g = int(i / (self.num_layers / groups))
      order.extend(g * self.inner_group_num + j for j in range(self.inner_group_num))
    return order

  def replace(self, **kwargs) -> "EncoderConfig":
    return dataclasses.replace(self, **kwargs)


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> EncoderConfig:
  """Translates a Hugging Face config dict (bert/roberta/electra/albert) into an EncoderConfig."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise UserError(f"{source}: unsupported model_type {family!r}; bertjax supports {', '.join(FAMILIES)}")
  act = hf.get("hidden_act", "gelu")
  if act not in ACTIVATIONS:
    raise UserError(f"{source}: unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
  pos_type = hf.get("position_embedding_type", "absolute")
  if pos_type != "absolute":
    raise UserError(f"{source}: position_embedding_type {pos_type!r} is not supported (only 'absolute')")
  try:
    hidden = int(hf["hidden_size"])
    num_layers = int(hf["num_hidden_layers"])
    common = dict(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=int(hf["num_attention_heads"]),
        intermediate_size=int(hf["intermediate_size"]),
        hidden_act=act,
        max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
        pad_token_id=int(hf.get("pad_token_id") or 0),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        num_labels=num_labels_of(hf),
    )
  except KeyError as e:
    raise UserError(f"{source}: missing key {e.args[0]!r} for model_type {family!r}") from None
  if num_layers < 1:
    raise UserError(f"{source}: num_hidden_layers={num_layers}; a classifier needs at least one layer")
  clf_dropout = hf.get("classifier_dropout")
  common["classifier_dropout"] = float(common["hidden_dropout"] if clf_dropout is None else clf_dropout)
  if family == "bert":
    return EncoderConfig(**common, head="pooler")
  if family == "roberta":
    return EncoderConfig(**common, head="dense_tanh", position_offset=common["pad_token_id"] + 1)
  if family == "electra":
    emb = int(hf.get("embedding_size", hidden))
    return EncoderConfig(**common, head="dense_gelu", embedding_size=emb, project_embeddings=emb != hidden)
  # albert
  groups = int(hf.get("num_hidden_groups", 1))
  inner = int(hf.get("inner_group_num", 1))
  if num_layers % groups:
    raise UserError(f"{source}: num_hidden_layers={num_layers} is not a multiple of num_hidden_groups={groups}")
  common["classifier_dropout"] = float(hf.get("classifier_dropout_prob", 0.1))
  return EncoderConfig(**common, head="pooler", embedding_size=int(hf.get("embedding_size", 128)),
                       project_embeddings=True, num_param_layers=groups * inner, inner_group_num=inner)


def num_labels_of(hf: dict[str, Any]) -> int:
  if "id2label" in hf:
    return len(hf["id2label"])
  return int(hf.get("num_labels", 2))


DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(name: str, backend: str | None = None) -> str:
  """The compute dtype for `model.dtype`: `auto` is float32 on CPU, where bf16 activations are slower
  (measured in docs/performance.md), and bfloat16 on GPU/TPU, whose matrix units run bf16 at several
  times the f32 rate."""
  if name not in DTYPES:
    raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
  if name != "auto":
    return name
  if backend is None:
    import jax
    backend = jax.default_backend()
  return "float32" if backend == "cpu" else "bfloat16"


# x86 CPU flags of bf16 dot-product instructions: AMX-BF16 tiles (Intel Sapphire Rapids and later) and
# AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later).
BF16_DOT_FLAGS = ("amx_bf16", "avx512_bf16")


def cpuinfo_value(key: str, cpuinfo: str = "/proc/cpuinfo") -> str | None:
  """The value of the first `key : value` line of /proc/cpuinfo (Linux), None without one."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
          return value.strip()
  except OSError:
    pass
  return None


def cpu_has_bf16_dot(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """True on x86 CPUs with bf16 dot-product instructions (BF16_DOT_FLAGS), where XLA's products with bf16
  operands and float32 sums ran faster than float32 ones: 3.5-4.5x with AMX-BF16, 1.8-2.1x with
  AVX512-BF16 alone (docs/performance.md)."""
  flags = cpuinfo_value("flags", cpuinfo)
  return flags is not None and not set(BF16_DOT_FLAGS).isdisjoint(flags.split())


def resolve_matmul_dtype(name: str, dtype: str, backend: str | None = None) -> str:
  """The operand dtype of the matrix products for `model.matmul_dtype`, given the resolved compute dtype.

  `auto` is the compute dtype, except float32 compute on a CPU with bf16 dot instructions, where it is
  bfloat16: products round their operands to bf16 and sum in float32 (a TPU's default precision)."""
  if name not in DTYPES:
    raise UserError(f"model.matmul_dtype must be one of {', '.join(DTYPES)}, got {name!r}")
  if name == "auto":
    if backend is None:
      import jax
      backend = jax.default_backend()
    name = "bfloat16" if dtype == "float32" and backend == "cpu" and cpu_has_bf16_dot() else dtype
  if name != dtype and dtype != "float32":
    raise UserError(f"model.matmul_dtype={name} needs model.dtype float32 (or the same dtype), got {dtype}")
  return name


def resolve_dtypes(model) -> tuple[str, str]:
  """(compute dtype, matmul operand dtype) of a `model` config group (a ConfigDict or a saved dict; a run
  saved before a key existed had float32 compute and the matmul default)."""
  dtype = resolve_dtype(model.get("dtype", "float32"))
  return dtype, resolve_matmul_dtype(model.get("matmul_dtype", "auto"), dtype)


ATTENTIONS = ("auto", "einsum", "xla", "cudnn")
# What model.attention=auto runs where cuDNN does not: einsum, which xla did not beat side by side on the CPU
# for MiniLM's shapes (xla / einsum 0.86-1.07 for the train step and 0.93-1.77 for eval in three runs on a
# shared machine; docs/performance.md). It is also the path with attention dropout.
CPU_ATTENTION = "einsum"
CPU_ATTENTION_WHY = "auto: xla measured no faster on CPU"


@dataclasses.dataclass(frozen=True)
class Attention:
  """The attention implementations of a run's train and eval steps, and why each (for the start line)."""
  train: str
  eval: str
  train_why: str
  eval_why: str


def resolve_attention_dropout(value: float, checkpoint: float) -> float:
  """`model.attention_dropout`: -1 keeps the checkpoint's attention_probs_dropout_prob."""
  if value == -1.0:
    return checkpoint
  if not 0.0 <= value < 1.0:
    raise UserError(f"model.attention_dropout must be -1 (the checkpoint's) or in [0, 1), got {value}")
  return float(value)


def cudnn_available(backend: str | None = None) -> bool:
  """Whether jax can run cuDNN's fused attention here: only on a CUDA GPU (the jax CUDA plugin brings cuDNN)."""
  import jax
  backend = backend or jax.default_backend()
  if backend != "gpu":
    return False
  from jax.extend.backend import get_backend
  return "cuda" in get_backend().platform_version.lower()


def cudnn_unfit(cfg: EncoderConfig) -> str | None:
  """Why cuDNN's fused attention (jax 0.10's checks) cannot run this model, or None."""
  head_dim = cfg.hidden_size // cfg.num_heads
  if cfg.dtype != "bfloat16":
    return f"it takes bfloat16 (or float16) inputs, and model.dtype is {cfg.dtype}"
  if head_dim % 8 or head_dim > 128:
    return f"its head size must be a multiple of 8 and at most 128, got {head_dim}"
  return None


def resolve_attention(name: str, cfg: EncoderConfig, backend: str | None = None) -> Attention:
  """The implementations of `model.attention` for the train and the eval step of the model `cfg` (dtype and
  attention_dropout resolved). `einsum` applies attention dropout; jax's fused `xla` and `cudnn` paths take
  none, so a train step that needs it cannot use them. `auto` never fails: cudnn on a CUDA GPU where it
  fits the model, otherwise CPU_ATTENTION, and einsum for a train step with attention dropout."""
  if name not in ATTENTIONS:
    raise UserError(f"model.attention must be one of {', '.join(ATTENTIONS)}, got {name!r}")
  dropout = cfg.attention_dropout
  cudnn_ok = cudnn_available(backend)
  unfit = cudnn_unfit(cfg)
  if name == "cudnn" and not cudnn_ok:
    raise UserError("model.attention=cudnn needs a CUDA GPU (jax runs cuDNN's fused attention only there); "
                    "use model.attention=auto or xla")
  if name == "cudnn" and unfit:
    raise UserError(f"model.attention=cudnn cannot run this model: {unfit}; use model.attention=auto or xla")
  if name in ("xla", "cudnn") and dropout > 0:
    raise UserError(f"model.attention={name} has no attention dropout, and the model's is {dropout}: set "
                    f"model.attention_dropout=0.0, or model.attention=einsum (or auto) to keep it")
  if name != "auto":
    return Attention(name, name, f"model.attention={name}", f"model.attention={name}")
  if cudnn_ok and not unfit:
    fused, fused_why = "cudnn", "auto: cuDNN's fused attention on this GPU"
  else:
    fused, fused_why = CPU_ATTENTION, CPU_ATTENTION_WHY + (f"; not cudnn: {unfit}" if cudnn_ok else "")
  if dropout > 0:
    return Attention("einsum", fused, f"auto: attention dropout {dropout:g} needs it", fused_why)
  return Attention(fused, fused, fused_why, fused_why)
