"""The one transformer encoder behind all four families (post-LayerNorm BERT layout).

Attention is driven by segment ids, not a padding mask: a token attends only to tokens of its own
segment, so several examples can share a row (packing) and an unpacked row is the one-segment case.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """True where query i may attend to key j: same segment and key not padding. [B, 1, L, L]."""
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  real_key_Bx1xL = (segment_ids_BxL > 0)[:, None, :]
  return (same_BxLxL & real_key_Bx1xL)[:, None]


def dense(cfg: EncoderConfig, features: int, name: str) -> nn.Dense:
  """nn.Dense with the Hugging Face initialiser (normal, std initializer_range)."""
  return nn.Dense(features, dtype=jnp.dtype(cfg.dtype), kernel_init=nn.initializers.normal(cfg.initializer_range),
                  name=name)


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


class SelfAttention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxH, mask_Bx1xLxL, deterministic: bool):
    cfg = self.cfg
    b, l, h = x_BxLxH.shape
    n, d = cfg.num_heads, h // cfg.num_heads
    split = lambda t: t.reshape(b, l, n, d)
    q_BxLxNxD = split(dense(cfg, h, "query")(x_BxLxH))
    k_BxLxNxD = split(dense(cfg, h, "key")(x_BxLxH))
    v_BxLxNxD = split(dense(cfg, h, "value")(x_BxLxH))
    q_BxLxNxD = q_BxLxNxD / jnp.sqrt(d).astype(q_BxLxNxD.dtype)
    # Scores and softmax in float32 even under bfloat16 compute: the sum over keys needs the range.
    scores_BxNxLxL = jnp.einsum("bqnd,bknd->bnqk", q_BxLxNxD, k_BxLxNxD, preferred_element_type=jnp.float32)
    scores_BxNxLxL = jnp.where(mask_Bx1xLxL, scores_BxNxLxL, jnp.finfo(jnp.float32).min)
    probs_BxNxLxL = jax.nn.softmax(scores_BxNxLxL, axis=-1).astype(x_BxLxH.dtype)
    probs_BxNxLxL = Dropout(cfg.attention_dropout)(probs_BxNxLxL, deterministic=deterministic)
    ctx_BxLxH = jnp.einsum("bnqk,bknd->bqnd", probs_BxNxLxL, v_BxLxNxD).reshape(b, l, h)
    return dense(cfg, h, "out")(ctx_BxLxH)


class Layer(nn.Module):
  """Attention + feed-forward, each followed by dropout, residual and LayerNorm (post-LN)."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxH, mask_Bx1xLxL, deterministic: bool):
    cfg = self.cfg
    drop = lambda t: Dropout(cfg.hidden_dropout)(t, deterministic=deterministic)
    attn_BxLxH = SelfAttention(cfg, name="attention")(x_BxLxH, mask_Bx1xLxL, deterministic)
    x_BxLxH = layer_norm(cfg, "attention_norm")(x_BxLxH + drop(attn_BxLxH))
    y_BxLxF = activation(cfg.hidden_act)(dense(cfg, cfg.intermediate_size, "mlp_in")(x_BxLxH))
    y_BxLxH = dense(cfg, cfg.hidden_size, "mlp_out")(y_BxLxF)
    return layer_norm(cfg, "mlp_norm")(x_BxLxH + drop(y_BxLxH))


class Encoder(nn.Module):
  """Embeddings and the layer stack; ALBERT reuses its few layer parameter sets across depth."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, ids_BxL, type_ids_BxL, segment_ids_BxL, positions_BxL, deterministic: bool = True):
    cfg = self.cfg
    x_BxLxH = Embeddings(cfg, name="embeddings")(ids_BxL, type_ids_BxL, positions_BxL, deterministic)
    mask_Bx1xLxL = attention_mask(segment_ids_BxL)
    layers = [Layer(cfg, name=f"layer_{k}") for k in range(cfg.param_layers)]
    for k in cfg.layer_schedule():
      x_BxLxH = layers[k](x_BxLxH, mask_Bx1xLxL, deterministic)
    return x_BxLxH
