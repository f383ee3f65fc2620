"""The one transformer encoder behind all four families (post-LayerNorm BERT layout).

Attention is driven by segment ids, not a padding mask: a token attends only to tokens of its own
segment, so several examples can share a row (packing) and an unpacked row is the one-segment case.

A classifier reads the last layer at one token per example. Given those positions (`read_BxS`), the
encoder runs its last layer for them only: keys and values still come from every token, but the query
projection, attention output, feed-forward block and LayerNorms run on S tokens per row instead of L.
For MiniLM on SST-2 (13.3 tokens per example) that skips 12.9% of the model's forward and backward FLOPs.

The attention core is `cfg.attention` (docs/gpu.md): `einsum` materialises the [B, N, Q, L] scores and is
the only one with attention dropout; `xla` and `cudnn` are jax.nn.dot_product_attention's implementations
(cuDNN's flash attention on CUDA GPUs, bfloat16), given the same segment mask.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bertjax.errors import UserError
from bertjax.models.config import EncoderConfig
from bertjax.models.dropout import Dropout


def activation(name: str):
  """The Hugging Face activation of that name, as a jax function."""
  return {
      "gelu": functools.partial(jax.nn.gelu, approximate=False),
      "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
      "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
      "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
      "relu": jax.nn.relu,
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  }[name]


def attention_mask(query_segments_BxQ: jax.Array, key_segments_BxL: jax.Array) -> jax.Array:
  """True where query i may attend to key j: same segment and key not padding. [B, 1, Q, L]."""
  same_BxQxL = query_segments_BxQ[:, :, None] == key_segments_BxL[:, None, :]
  real_key_Bx1xL = (key_segments_BxL > 0)[:, None, :]
  return (same_BxQxL & real_key_Bx1xL)[:, None]


def gather_tokens(x_BxLxH: jax.Array, index_BxS: jax.Array) -> jax.Array:
  """The tokens at index_BxS of each row: [B, S, H]."""
  return jnp.take_along_axis(x_BxLxH, index_BxS[:, :, None], axis=1)


def _einsum_grad_specs(spec: str) -> tuple[str, str]:
  """For "A,B->C", the einsums giving A's and B's gradients from C's: "C,B->A" and "A,C->B"."""
  inputs, out = spec.split("->")
  a, b = inputs.split(",")
  return f"{out},{b}->{a}", f"{a},{out}->{b}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _cast_einsum(spec: str, a: jax.Array, b: jax.Array, operand_dtype, out_dtype) -> jax.Array:
  """einsum of float32 a and b cast to operand_dtype, summed in float32; the backward products likewise."""
  return _cast_einsum_fwd(spec, a, b, operand_dtype, out_dtype)[0]


def _cast_einsum_fwd(spec, a, b, operand_dtype, out_dtype):
  a_cast, b_cast = a.astype(operand_dtype), b.astype(operand_dtype)
  return jnp.einsum(spec, a_cast, b_cast, preferred_element_type=out_dtype), (a_cast, b_cast)


def _cast_einsum_bwd(spec, operand_dtype, out_dtype, residuals, g):
  a_cast, b_cast = residuals
  spec_a, spec_b = _einsum_grad_specs(spec)
  g_cast = g.astype(operand_dtype)  # so the backward products run at the operand dtype's rate too
  return (jnp.einsum(spec_a, g_cast, b_cast, preferred_element_type=jnp.float32),
          jnp.einsum(spec_b, a_cast, g_cast, preferred_element_type=jnp.float32))


_cast_einsum.defvjp(_cast_einsum_fwd, _cast_einsum_bwd)


def matmul(cfg: EncoderConfig, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum(spec, a, b) of two cfg.dtype arrays with operands in cfg.matmul_dtype, returned in cfg.dtype.

  When cfg.matmul_dtype is bfloat16 and cfg.dtype float32 (`model.matmul_dtype=auto` on a CPU with bf16 dot
  instructions), the forward product and both backward ones round their operands to bfloat16 (the incoming
  gradient too) and sum in float32, as a TPU's default precision does. Otherwise a plain einsum."""
  out_dtype = jnp.dtype(cfg.dtype)
  if not casts_products(cfg):
    return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)
  return _cast_einsum(spec, a, b, jnp.dtype(cfg.matmul_dtype), out_dtype)


class Dense(nn.Module):
  """nn.Dense's parameters (kernel [in, out], bias) and Hugging Face's initialiser, through `matmul`."""

  cfg: EncoderConfig
  features: int

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = self.param("kernel", nn.initializers.normal(cfg.initializer_range), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    dtype = jnp.dtype(cfg.dtype)
    if not casts_products(cfg):  # else `matmul` casts it (a no-op for a kernel from `cast_kernels`)
      kernel = kernel.astype(dtype)
    return matmul(cfg, "...i,io->...o", x.astype(dtype), kernel) + bias.astype(dtype)


def dense(cfg: EncoderConfig, features: int, name: str) -> Dense:
  return Dense(cfg, features, name=name)


def casts_products(cfg: EncoderConfig) -> bool:
  """Whether the products' operands have another dtype than the compute dtype (bf16 under float32)."""
  return cfg.matmul_dtype not in ("", cfg.dtype)


def cast_kernels(cfg: EncoderConfig, params):
  """`params` with every Dense kernel in the products' operand dtype, for forward passes only: a pass
  over the weights then casts them once, not at every batch. Unchanged when the products do not cast."""
  if not casts_products(cfg):
    return params
  operand = jnp.dtype(cfg.matmul_dtype)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(operand) if getattr(path[-1], "key", None) == "kernel" else x, params)


def layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype), name=name)


class Embeddings(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, ids_BxL, type_ids_BxL, positions_BxL, deterministic: bool):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    init = nn.initializers.normal(cfg.initializer_range)
    embed = lambda n, name: nn.Embed(n, cfg.emb_size, dtype=dtype, embedding_init=init, name=name)
    x_BxLxE = embed(cfg.vocab_size, "word")(ids_BxL)
    x_BxLxE += embed(cfg.max_position_embeddings, "position")(positions_BxL + cfg.position_offset)
    x_BxLxE += embed(cfg.type_vocab_size, "token_type")(type_ids_BxL)
    x_BxLxE = layer_norm(cfg, "norm")(x_BxLxE)
    x_BxLxE = Dropout(cfg.hidden_dropout)(x_BxLxE, deterministic=deterministic)
    if cfg.project_embeddings:
      return dense(cfg, cfg.hidden_size, "project")(x_BxLxE)
    return x_BxLxE


def einsum_attention(q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL, dropout) -> jax.Array:
  """Softmax attention over a materialised [B, N, Q, L] score tensor; `dropout` acts on the probabilities."""
  # Scores and softmax in float32 even under bfloat16 compute: the sum over keys needs the range.
  scores_BxNxQxL = jnp.einsum("bqnd,bknd->bnqk", q_BxQxNxD, k_BxLxNxD, preferred_element_type=jnp.float32)
  scores_BxNxQxL = jnp.where(mask_Bx1xQxL, scores_BxNxQxL, jnp.finfo(jnp.float32).min)
  probs_BxNxQxL = dropout(jax.nn.softmax(scores_BxNxQxL, axis=-1).astype(v_BxLxNxD.dtype))
  return jnp.einsum("bnqk,bknd->bqnd", probs_BxNxQxL, v_BxLxNxD)


def fused_attention(implementation: str, q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL) -> jax.Array:
  """jax.nn.dot_product_attention (`xla` or `cudnn`) of queries already scaled by 1/sqrt(D); no dropout."""
  q, l = q_BxQxNxD.shape[1], k_BxLxNxD.shape[1]
  if implementation == "cudnn" and (q % 2 or l % 2):
    # cuDNN's kernel takes the mask as a bias, and with a bias it trains only on even query and key
    # counts (the read-out layer of unpacked rows has one query per row): pad with one masked query/key.
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n % 2)] + [(0, 0)] * (x.ndim - 2))
    q_BxQxNxD, k_BxLxNxD, v_BxLxNxD = pad(q_BxQxNxD, q), pad(k_BxLxNxD, l), pad(v_BxLxNxD, l)
    mask_Bx1xQxL = jnp.pad(mask_Bx1xQxL, [(0, 0), (0, 0), (0, q % 2), (0, l % 2)])
  out_BxQxNxD = jax.nn.dot_product_attention(q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask=mask_Bx1xQxL, scale=1.0,
                                             implementation=implementation)
  return out_BxQxNxD[:, :q]


class SelfAttention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, queries_BxQxH, x_BxLxH, mask_Bx1xQxL, deterministic: bool):
    """Attention of the query tokens over all tokens x (queries is x itself, or a subset of it), computed
    by cfg.attention: `einsum` (with attention dropout) or jax's fused `xla` / `cudnn` (without)."""
    cfg = self.cfg
    (b, l, h), q = x_BxLxH.shape, queries_BxQxH.shape[1]
    n, d = cfg.num_heads, h // cfg.num_heads
    q_BxQxNxD = dense(cfg, h, "query")(queries_BxQxH).reshape(b, q, n, d)
    k_BxLxNxD = dense(cfg, h, "key")(x_BxLxH).reshape(b, l, n, d)
    v_BxLxNxD = dense(cfg, h, "value")(x_BxLxH).reshape(b, l, n, d)
    q_BxQxNxD = q_BxQxNxD / jnp.sqrt(d).astype(q_BxQxNxD.dtype)
    if cfg.attention == "einsum":
      dropout = lambda p: Dropout(cfg.attention_dropout)(p, deterministic=deterministic)
      ctx_BxQxNxD = einsum_attention(q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL, dropout)
    elif deterministic or cfg.attention_dropout == 0.0:
      ctx_BxQxNxD = fused_attention(cfg.attention, q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL)
    else:  # config.resolve_attention never picks this; a hand-built config must not drop dropout silently
      raise UserError(f"attention {cfg.attention!r} cannot apply attention dropout ({cfg.attention_dropout}); "
                      "use attention 'einsum' or attention dropout 0")
    return dense(cfg, h, "out")(ctx_BxQxNxD.reshape(b, q, h))


class Layer(nn.Module):
  """Attention + feed-forward, each followed by dropout, residual and LayerNorm (post-LN)."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxH, mask_Bx1xQxL, deterministic: bool, read_BxQ=None):
    """The layer's output at every token, or only at the tokens read_BxQ (keys still see all)."""
    cfg = self.cfg
    drop = lambda t: Dropout(cfg.hidden_dropout)(t, deterministic=deterministic)
    q_BxQxH = x_BxLxH if read_BxQ is None else gather_tokens(x_BxLxH, read_BxQ)
    attn_BxQxH = SelfAttention(cfg, name="attention")(q_BxQxH, x_BxLxH, mask_Bx1xQxL, deterministic)
    q_BxQxH = layer_norm(cfg, "attention_norm")(q_BxQxH + drop(attn_BxQxH))
    y_BxQxF = activation(cfg.hidden_act)(dense(cfg, cfg.intermediate_size, "mlp_in")(q_BxQxH))
    y_BxQxH = dense(cfg, cfg.hidden_size, "mlp_out")(y_BxQxF)
    return layer_norm(cfg, "mlp_norm")(q_BxQxH + drop(y_BxQxH))


class Encoder(nn.Module):
  """Embeddings and the layer stack; ALBERT reuses its few layer parameter sets across depth."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, ids_BxL, type_ids_BxL, segment_ids_BxL, positions_BxL, deterministic: bool = True,
               read_BxS=None):
    """Hidden states of the last layer: [B, L, H] at every token, or [B, S, H] at the tokens read_BxS."""
    cfg = self.cfg
    x_BxLxH = Embeddings(cfg, name="embeddings")(ids_BxL, type_ids_BxL, positions_BxL, deterministic)
    mask_Bx1xLxL = attention_mask(segment_ids_BxL, segment_ids_BxL)
    layers = [Layer(cfg, name=f"layer_{k}") for k in range(cfg.param_layers)]
    *schedule, last = cfg.layer_schedule()  # at least one layer (config.from_hf_config)
    for k in schedule:
      x_BxLxH = layers[k](x_BxLxH, mask_Bx1xLxL, deterministic)
    if read_BxS is None:
      return layers[last](x_BxLxH, mask_Bx1xLxL, deterministic)
    read_segments_BxS = jnp.take_along_axis(segment_ids_BxL, read_BxS, axis=1)
    mask_Bx1xSxL = attention_mask(read_segments_BxS, segment_ids_BxL)
    return layers[last](x_BxLxH, mask_Bx1xSxL, deterministic, read_BxS)
