"""The model's frozen configuration, built once from a Hugging Face `config.json`."""

import dataclasses
from typing import Any

from bertjax.errors import UserError

FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "distilbert", "deberta-v2",
            "modernbert")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "quick_gelu", "tanh")
ARCHITECTURES = ("bert", "deberta", "modernbert")


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
  type_vocab_size: int = 2  # 0 = no token type embeddings (DistilBERT, DeBERTa-v3, ModernBERT)
  embedding_size: int = 0  # 0 = hidden_size
  project_embeddings: bool = False  # ELECTRA when embedding_size != hidden_size; always for ALBERT
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1  # embeddings and layer outputs (ModernBERT: embedding_dropout)
  attention_dropout: float = 0.1
  classifier_dropout: float = 0.1
  position_offset: int = 0  # RoBERTa numbers positions from pad_token_id + 1
  num_param_layers: int = 0  # distinct layer parameter sets (ALBERT shares them); 0 = num_layers
  inner_group_num: int = 1  # ALBERT: layers run per shared group
  # bert: post-LayerNorm layers (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, ALBERT, DistilBERT); deberta: the same
  # layers with disentangled attention (models/deberta.py); modernbert: its pre-LayerNorm layer (models/modernbert.py)
  architecture: str = "bert"
  absolute_positions: bool = True  # learned position embeddings added to the input (not DeBERTa-v3, ModernBERT)
  norm_bias: bool = True  # LayerNorms with a bias (ModernBERT's norm_bias)
  attention_out_dropout: bool = True  # dropout on the attention output before its residual (not DistilBERT)
  position_buckets: int = 0  # DeBERTa: relative distances in log buckets beyond position_buckets / 2; 0 = exact
  max_relative_positions: int = 0  # DeBERTa: the longest distance the buckets tell apart
  relative_attention: tuple[str, ...] = ()  # DeBERTa: c2p (content to position), p2c (position to content)
  layer_windows: tuple[int, ...] = ()  # ModernBERT, per layer: 0 = full attention, w = |i - j| <= w only
  rope_thetas: tuple[float, ...] = ()  # ModernBERT, per layer: the rotary embedding's base
  attention_bias: bool = True  # ModernBERT's Wqkv/Wo biases
  mlp_bias: bool = True  # ModernBERT's Wi/Wo biases
  mlp_dropout: float = 0.0  # ModernBERT: dropout inside the GeGLU block
  # pooler: dense, act, dropout, out (BERT, ALBERT, DistilBERT); dense: dropout (pooler_dropout), dense, act,
  # dropout, out (RoBERTa, XLM-R, CamemBERT, ELECTRA, DeBERTa); dense_norm: dense, act, LayerNorm, dropout, out
  # (ModernBERT)
  head: str = "pooler"
  head_act: str = "tanh"
  head_bias: bool = True  # the head's dense layer (ModernBERT's classifier_bias)
  pooler_dropout: float = 0.1  # the `dense` head's first dropout
  pooling: str = "cls"  # cls: the example's first token; mean: the mean of its tokens (ModernBERT's option)
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

  @property
  def relative_span(self) -> int:
    """DeBERTa: relative distances are clipped to [-span, span); the embedding table has 2 * span rows."""
    return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

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
  """Translates a Hugging Face config dict (any of FAMILIES) into an EncoderConfig; an option bertjax does not
  implement is a one-line UserError, never silently ignored."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise UserError(f"{source}: unsupported model_type {family!r}; bertjax supports {', '.join(FAMILIES)}")
  translate = {"distilbert": _distilbert, "deberta-v2": _deberta, "modernbert": _modernbert}.get(family, _bert_like)
  try:
    cfg = translate(hf, family, source)
  except KeyError as e:
    raise UserError(f"{source}: missing key {e.args[0]!r} for model_type {family!r}") from None
  if cfg.num_layers < 1:
    raise UserError(f"{source}: num_hidden_layers={cfg.num_layers}; a classifier needs at least one layer")
  if cfg.hidden_size % cfg.num_heads:
    raise UserError(f"{source}: hidden size {cfg.hidden_size} is not a multiple of the {cfg.num_heads} heads")
  for what, act in (("hidden activation", cfg.hidden_act), ("classifier activation", cfg.head_act)):
    if act not in ACTIVATIONS:
      raise UserError(f"{source}: unsupported {what} {act!r}; supported: {', '.join(ACTIVATIONS)}")
  return cfg


def _common(hf: dict[str, Any], family: str) -> dict[str, Any]:
  """The keys BERT-style configs share (DeBERTa's too)."""
  dropout = float(hf.get("hidden_dropout_prob", 0.1))
  return dict(
      family=family,
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=int(hf["num_attention_heads"]),
      intermediate_size=int(hf["intermediate_size"]),
      hidden_act=hf.get("hidden_act", "gelu"),
      max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
      type_vocab_size=int(hf.get("type_vocab_size", 2)),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
      hidden_dropout=dropout,
      attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
      classifier_dropout=dropout if hf.get("classifier_dropout") is None else float(hf["classifier_dropout"]),
      pad_token_id=int(hf.get("pad_token_id") or 0),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      num_labels=num_labels_of(hf),
  )


def _bert_like(hf: dict[str, Any], family: str, source: str) -> EncoderConfig:
  """BERT, RoBERTa (and XLM-R, CamemBERT: its layout under other names), ELECTRA, ALBERT."""
  pos_type = hf.get("position_embedding_type", "absolute")
  if pos_type != "absolute":
    raise UserError(f"{source}: position_embedding_type {pos_type!r} is not supported (only 'absolute')")
  common = _common(hf, family)
  if family == "bert":
    return EncoderConfig(**common, head="pooler")
  if family in ("roberta", "xlm-roberta", "camembert"):
    return EncoderConfig(**common, head="dense", pooler_dropout=common["classifier_dropout"],
                         position_offset=common["pad_token_id"] + 1)
  if family == "electra":
    emb = int(hf.get("embedding_size", common["hidden_size"]))
    return EncoderConfig(**common, head="dense", head_act="gelu", pooler_dropout=common["classifier_dropout"],
                         embedding_size=emb, project_embeddings=emb != common["hidden_size"])
  # albert
  groups = int(hf.get("num_hidden_groups", 1))
  inner = int(hf.get("inner_group_num", 1))
  if common["num_layers"] % groups:
    raise UserError(f"{source}: num_hidden_layers={common['num_layers']} is not a multiple of "
                    f"num_hidden_groups={groups}")
  common["classifier_dropout"] = float(hf.get("classifier_dropout_prob", 0.1))
  return EncoderConfig(**common, head="pooler", embedding_size=int(hf.get("embedding_size", 128)),
                       project_embeddings=True, num_param_layers=groups * inner, inner_group_num=inner)


def _distilbert(hf: dict[str, Any], family: str, source: str) -> EncoderConfig:
  """DistilBERT: BERT's post-LN layers under other names, no token types, no dropout on the attention output,
  and a pre-classifier with ReLU as its pooler."""
  return EncoderConfig(
      family=family, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["dim"]), num_layers=int(hf["n_layers"]),
      num_heads=int(hf["n_heads"]), intermediate_size=int(hf["hidden_dim"]), hidden_act=hf.get("activation", "gelu"),
      max_position_embeddings=int(hf.get("max_position_embeddings", 512)), type_vocab_size=0,
      hidden_dropout=float(hf.get("dropout", 0.1)), attention_dropout=float(hf.get("attention_dropout", 0.1)),
      classifier_dropout=float(hf.get("seq_classif_dropout", 0.2)), pad_token_id=int(hf.get("pad_token_id") or 0),
      initializer_range=float(hf.get("initializer_range", 0.02)), num_labels=num_labels_of(hf),
      attention_out_dropout=False, head="pooler", head_act="relu")


def _deberta(hf: dict[str, Any], family: str, source: str) -> EncoderConfig:
  """DeBERTa-v2 checkpoints in the DeBERTa-v3 layout: relative attention only (no absolute positions), shared
  attention keys for positions, log position buckets, LayerNorm on the relative embeddings, context pooler."""
  pos_att = hf.get("pos_att_type") or []
  pos_att = [x.strip() for x in pos_att.lower().split("|")] if isinstance(pos_att, str) else list(pos_att)
  common = _common(hf, family)
  hidden, emb = common["hidden_size"], int(hf.get("embedding_size") or common["hidden_size"])
  needs = [("relative_attention", hf.get("relative_attention", False), True),
           ("position_biased_input", hf.get("position_biased_input", True), False),
           ("share_att_key", hf.get("share_att_key", False), True),
           ("norm_rel_ebd", str(hf.get("norm_rel_ebd", "none")).lower().replace(" ", ""), "layer_norm"),
           ("conv_kernel_size", int(hf.get("conv_kernel_size") or 0), 0),
           ("embedding_size", emb, hidden),
           ("attention_head_size", int(hf.get("attention_head_size") or hidden // common["num_heads"]),
            hidden // common["num_heads"]),
           ("pooler_hidden_size", int(hf.get("pooler_hidden_size") or hidden), hidden)]
  for key, value, want in needs:
    if value != want:
      raise UserError(f"{source}: {key}={value!r} is not supported for deberta-v2; bertjax implements the "
                      f"DeBERTa-v3 layout ({key}={want!r})")
  if not pos_att or not set(pos_att) <= {"c2p", "p2c"}:
    raise UserError(f"{source}: pos_att_type={hf.get('pos_att_type')!r} is not supported; bertjax implements "
                    "c2p and p2c (DeBERTa-v3: p2c|c2p)")
  max_relative = int(hf.get("max_relative_positions", -1))
  common["classifier_dropout"] = float(hf.get("cls_dropout") if hf.get("cls_dropout") is not None
                                       else common["hidden_dropout"])
  common["layer_norm_eps"] = float(hf.get("layer_norm_eps", 1e-7))
  common["type_vocab_size"] = int(hf.get("type_vocab_size", 0))
  return EncoderConfig(
      **common, architecture="deberta", absolute_positions=False,
      position_buckets=max(int(hf.get("position_buckets", -1)), 0),
      max_relative_positions=max_relative if max_relative >= 1 else common["max_position_embeddings"],
      relative_attention=tuple(x for x in ("c2p", "p2c") if x in pos_att),
      head="dense", head_act=hf.get("pooler_hidden_act", "gelu"), pooler_dropout=float(hf.get("pooler_dropout", 0.0)))


def _modernbert(hf: dict[str, Any], family: str, source: str) -> EncoderConfig:
  """ModernBERT: pre-LayerNorm layers with rotary positions (a base per layer type), GeGLU, full or sliding-window
  attention per layer, a final LayerNorm and a dense-act-norm head over the first token or the mean."""
  num_layers = int(hf["num_hidden_layers"])
  every = int(hf.get("global_attn_every_n_layers", 3))
  layer_types = hf.get("layer_types") or ["sliding_attention" if i % every else "full_attention"
                                          for i in range(num_layers)]
  if len(layer_types) != num_layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
    raise UserError(f"{source}: layer_types must list full_attention or sliding_attention for each of the "
                    f"{num_layers} layers, got {layer_types!r}")
  local = int(hf.get("local_attention", 128))
  if local < 2 and "sliding_attention" in layer_types:
    raise UserError(f"{source}: local_attention={local}; a sliding window needs at least 2 tokens")
  rope = hf.get("rope_parameters") or {}
  if hf.get("rope_scaling"):
    raise UserError(f"{source}: rope_scaling={hf['rope_scaling']!r} is not supported (only the default RoPE)")
  defaults = {"full_attention": float(hf.get("global_rope_theta", 160000.0)),
              "sliding_attention": float(hf.get("local_rope_theta", 10000.0))}
  thetas = {}
  for kind, default in defaults.items():
    params = rope.get(kind) or {}
    if params.get("rope_type", "default") != "default":
      raise UserError(f"{source}: rope_parameters.{kind}.rope_type={params['rope_type']!r} is not supported "
                      "(only 'default')")
    thetas[kind] = float(params.get("rope_theta", default))
  pooling = hf.get("classifier_pooling", "cls")
  if pooling not in ("cls", "mean"):
    raise UserError(f"{source}: classifier_pooling={pooling!r} is not supported (cls or mean)")
  return EncoderConfig(
      family=family, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]), num_layers=num_layers,
      num_heads=int(hf["num_attention_heads"]), intermediate_size=int(hf["intermediate_size"]),
      hidden_act=hf.get("hidden_activation", "gelu"), max_position_embeddings=int(hf.get("max_position_embeddings",
                                                                                           8192)),
      type_vocab_size=0, layer_norm_eps=float(hf.get("norm_eps", 1e-5)),
      hidden_dropout=float(hf.get("embedding_dropout", 0.0)), attention_dropout=float(hf.get("attention_dropout", 0.0)),
      classifier_dropout=float(hf.get("classifier_dropout", 0.0)), pad_token_id=int(hf.get("pad_token_id") or 0),
      initializer_range=float(hf.get("initializer_range", 0.02)), num_labels=num_labels_of(hf),
      architecture="modernbert", absolute_positions=False, norm_bias=bool(hf.get("norm_bias", False)),
      layer_windows=tuple(0 if t == "full_attention" else local // 2 for t in layer_types),
      rope_thetas=tuple(thetas[t] for t in layer_types), attention_bias=bool(hf.get("attention_bias", False)),
      mlp_bias=bool(hf.get("mlp_bias", False)), mlp_dropout=float(hf.get("mlp_dropout", 0.0)),
      head="dense_norm", head_act=hf.get("classifier_activation", "gelu"),
      head_bias=bool(hf.get("classifier_bias", False)), pooling=pooling)


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


def cpu_bf16_products_faster() -> bool:
  """Whether this machine's bf16 matmul peak beats its float32 one (bertjax.matmul_peak's measurement, made once
  per machine and cached). Not every CPU with bf16 dot instructions gains: an Intel Xeon with AVX512-BF16 and no
  AMX measured 179 against 283 GFLOP/s on 2026-12-07 (docs/performance.md)."""
  from bertjax import matmul_peak  # pylint: disable=import-outside-toplevel
  return matmul_peak.cached_measurement("bfloat16")[0] > matmul_peak.cached_measurement("float32")[0]


def resolve_matmul_dtype(name: str, dtype: str, backend: str | None = None) -> str:
  """The operand dtype of the matrix products for `model.matmul_dtype`, given the resolved compute dtype.

  `auto` is the compute dtype, except float32 compute on a CPU with bf16 dot instructions whose measured bf16
  peak beats its float32 one, where it is bfloat16: products round their operands to bf16 and sum in float32
  (a TPU's default precision)."""
  if name not in DTYPES:
    raise UserError(f"model.matmul_dtype must be one of {', '.join(DTYPES)}, got {name!r}")
  if name == "auto":
    if backend is None:
      import jax
      backend = jax.default_backend()
    bf16 = dtype == "float32" and backend == "cpu" and cpu_has_bf16_dot() and cpu_bf16_products_faster()
    name = "bfloat16" if bf16 else dtype
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
  if cfg.architecture == "deberta":  # its position terms are a bias on the scores, which only einsum adds
    if name in ("xla", "cudnn"):
      raise UserError(f"model.attention={name} is not implemented for DeBERTa's disentangled attention; use "
                      "model.attention=auto or einsum")
    return Attention("einsum", "einsum", "DeBERTa: einsum only", "DeBERTa: einsum only")
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
