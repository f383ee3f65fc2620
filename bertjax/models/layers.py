"""Building blocks every family's modules share: activations, dense layers whose products may round their
operands to bfloat16, LayerNorm, the segment attention mask and the attention cores (einsum or jax's fused)."""

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
      "tanh": jnp.tanh,
  }[name]


def attention_mask(query_segments_BxQ: jax.Array, key_segments_BxL: jax.Array, query_positions_BxQ=None,
                   key_positions_BxL=None, window: int = 0) -> jax.Array:
  """True where query i may attend to key j: same segment and key not padding, and with a `window` (ModernBERT's
  sliding layers) at most `window` positions apart within the example. [B, 1, Q, L]."""
  same_BxQxL = query_segments_BxQ[:, :, None] == key_segments_BxL[:, None, :]
  real_key_Bx1xL = (key_segments_BxL > 0)[:, None, :]
  mask_BxQxL = same_BxQxL & real_key_Bx1xL
  if window:
    distance_BxQxL = jnp.abs(query_positions_BxQ[:, :, None] - key_positions_BxL[:, None, :])
    mask_BxQxL &= distance_BxQxL <= window
  return mask_BxQxL[:, None]


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
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = self.param("kernel", nn.initializers.normal(cfg.initializer_range), (x.shape[-1], self.features))
    dtype = jnp.dtype(cfg.dtype)
    if not casts_products(cfg):  # else `matmul` casts it (a no-op for a kernel from `cast_kernels`)
      kernel = kernel.astype(dtype)
    y = matmul(cfg, "...i,io->...o", x.astype(dtype), kernel)
    if not self.use_bias:
      return y
    return y + self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(dtype)


def dense(cfg: EncoderConfig, features: int, name: str, use_bias: bool = True) -> Dense:
  return Dense(cfg, features, use_bias, name=name)


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
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype), use_bias=cfg.norm_bias, name=name)


def einsum_attention(q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL, dropout, bias_BxNxQxL=None) -> jax.Array:
  """Softmax attention over a materialised [B, N, Q, L] score tensor (plus `bias`, DeBERTa's position terms);
  `dropout` acts on the probabilities."""
  # Scores and softmax in float32 even under bfloat16 compute: the sum over keys needs the range.
  scores_BxNxQxL = jnp.einsum("bqnd,bknd->bnqk", q_BxQxNxD, k_BxLxNxD, preferred_element_type=jnp.float32)
  if bias_BxNxQxL is not None:
    scores_BxNxQxL += bias_BxNxQxL
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


def attend(cfg: EncoderConfig, q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL, deterministic: bool) -> jax.Array:
  """Attention of queries already scaled by 1/sqrt(D) by cfg.attention (SelfAttention's, ModernBERT's):
  `einsum` with attention dropout, or jax's fused `xla` / `cudnn`, which have none. [B, Q, N, D]."""
  if cfg.attention == "einsum":
    dropout = lambda p: Dropout(cfg.attention_dropout)(p, deterministic=deterministic)
    return einsum_attention(q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL, dropout)
  if deterministic or cfg.attention_dropout == 0.0:
    return fused_attention(cfg.attention, q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL)
  # config.resolve_attention never picks this; a hand-built config must not drop dropout silently
  raise UserError(f"attention {cfg.attention!r} cannot apply attention dropout ({cfg.attention_dropout}); "
                  "use attention 'einsum' or attention dropout 0")
