"""ModernBERT's layer: pre-LayerNorm, rotary positions, GeGLU, full or sliding-window attention.

Rotary positions come from `position_ids`, which restart at 0 for each packed example, and the sliding window
(`cfg.layer_windows`, applied in the mask the encoder builds) compares those positions too: an example packed
with others sees exactly what it would see alone in its row, which is ModernBERT's unpadding.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bertjax.models.config import EncoderConfig
from bertjax.models.dropout import Dropout
from bertjax.models.layers import activation, attend, dense, gather_tokens, layer_norm


def rotary(x_BxTxNxD: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """x rotated by its positions (RoPE, with the two halves of each head as the rotated pairs), in float32."""
  d = x_BxTxNxD.shape[-1]
  inv_freq_D2 = 1.0 / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
  angles_BxTxD2 = positions_BxT[:, :, None].astype(jnp.float32) * inv_freq_D2
  angles_BxTx1xD = jnp.concatenate([angles_BxTxD2, angles_BxTxD2], axis=-1)[:, :, None, :]
  x = x_BxTxNxD.astype(jnp.float32)
  half = d // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * jnp.cos(angles_BxTx1xD) + rotated * jnp.sin(angles_BxTx1xD)).astype(x_BxTxNxD.dtype)


class Attention(nn.Module):
  """Fused query-key-value projection, rotary positions on queries and keys, attention by cfg.attention (so
  also jax's fused xla / cudnn kernels), output."""

  cfg: EncoderConfig
  theta: float

  @nn.compact
  def __call__(self, x_BxLxH, mask_Bx1xQxL, positions_BxL, deterministic: bool, read_BxQ=None):
    cfg = self.cfg
    b, l, h = x_BxLxH.shape
    n, d = cfg.num_heads, h // cfg.num_heads
    qkv_BxLx3xNxD = dense(cfg, 3 * h, "qkv", cfg.attention_bias)(x_BxLxH).reshape(b, l, 3, n, d)
    q_BxQxNxD, k_BxLxNxD, v_BxLxNxD = (qkv_BxLx3xNxD[:, :, i] for i in range(3))
    query_positions_BxQ = positions_BxL
    if read_BxQ is not None:
      q_BxQxNxD = jnp.take_along_axis(q_BxQxNxD, read_BxQ[:, :, None, None], axis=1)
      query_positions_BxQ = jnp.take_along_axis(positions_BxL, read_BxQ, axis=1)
    q_BxQxNxD = rotary(q_BxQxNxD, query_positions_BxQ, self.theta) * d ** -0.5
    k_BxLxNxD = rotary(k_BxLxNxD, positions_BxL, self.theta)
    ctx_BxQxNxD = attend(cfg, q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL, deterministic)
    out_BxQxH = dense(cfg, h, "out", cfg.attention_bias)(ctx_BxQxNxD.reshape(ctx_BxQxNxD.shape[:2] + (h,)))
    return Dropout(cfg.attention_dropout)(out_BxQxH, deterministic=deterministic)


class Layer(nn.Module):
  """x + attention(norm(x)), then + GeGLU(norm(.)); the first layer has no norm before its attention (its
  input is the embeddings' LayerNorm)."""

  cfg: EncoderConfig
  index: int

  @nn.compact
  def __call__(self, x_BxLxH, mask_Bx1xQxL, positions_BxL, deterministic: bool, read_BxQ=None):
    """The layer's output at every token, or only at the tokens read_BxQ (keys still see all)."""
    cfg = self.cfg
    h_BxLxH = x_BxLxH if self.index == 0 else layer_norm(cfg, "attention_norm")(x_BxLxH)
    attn_BxQxH = Attention(cfg, cfg.rope_thetas[self.index], name="attention")(
        h_BxLxH, mask_Bx1xQxL, positions_BxL, deterministic, read_BxQ)
    x_BxQxH = (x_BxLxH if read_BxQ is None else gather_tokens(x_BxLxH, read_BxQ)) + attn_BxQxH
    y_BxQx2F = dense(cfg, 2 * cfg.intermediate_size, "mlp_in", cfg.mlp_bias)(layer_norm(cfg, "mlp_norm")(x_BxQxH))
    input_BxQxF, gate_BxQxF = jnp.split(y_BxQx2F, 2, axis=-1)
    y_BxQxF = Dropout(cfg.mlp_dropout)(activation(cfg.hidden_act)(input_BxQxF) * gate_BxQxF,
                                       deterministic=deterministic)
    return x_BxQxH + dense(cfg, cfg.hidden_size, "mlp_out", cfg.mlp_bias)(y_BxQxF)
