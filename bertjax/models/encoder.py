"""The one transformer encoder behind every family: embeddings, a stack of layers, the read-out.

The layers are BERT's post-LayerNorm layout (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, ALBERT, DistilBERT), the
same with DeBERTa's disentangled attention (models/deberta.py), or ModernBERT's pre-LayerNorm layer
(models/modernbert.py); `EncoderConfig` says which, and holds every other difference between families.

Attention is driven by segment ids, not a padding mask: a token attends only to tokens of its own
segment, so several examples can share a row (packing) and an unpacked row is the one-segment case.
Position ids restart at 0 in each segment, so positional terms (absolute embeddings, DeBERTa's relative
distances, ModernBERT's rotary positions and sliding window) see each example as if it were alone in its row.

A classifier reads the last layer at one token per example. Given those positions (`read_BxS`), the
encoder runs its last layer for them only: keys and values still come from every token, but the query
projection, attention output, feed-forward block and LayerNorms run on S tokens per row instead of L.
For MiniLM on SST-2 (13.3 tokens per example) that skips 12.9% of the model's forward and backward FLOPs.
(ModernBERT's mean pooling reads every token, so its classifier runs the whole last layer.)

The attention core is `cfg.attention` (docs/gpu.md, `layers.attend`): `einsum` materialises the [B, N, Q, L]
scores and is the only one with attention dropout; `xla` and `cudnn` are jax.nn.dot_product_attention's
implementations (cuDNN's flash attention on CUDA GPUs, bfloat16), given the same segment mask.
"""

import flax.linen as nn
import jax.numpy as jnp

from bertjax.models import deberta, modernbert
from bertjax.models.config import EncoderConfig
from bertjax.models.dropout import Dropout
from bertjax.models.layers import activation, attend, attention_mask, dense, gather_tokens, layer_norm


class Embeddings(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, ids_BxL, type_ids_BxL, positions_BxL, deterministic: bool):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    init = nn.initializers.normal(cfg.initializer_range)
    embed = lambda n, name: nn.Embed(n, cfg.emb_size, dtype=dtype, embedding_init=init, name=name)
    x_BxLxE = embed(cfg.vocab_size, "word")(ids_BxL)
    if cfg.absolute_positions:
      x_BxLxE += embed(cfg.max_position_embeddings, "position")(positions_BxL + cfg.position_offset)
    if cfg.type_vocab_size > 0:
      x_BxLxE += embed(cfg.type_vocab_size, "token_type")(type_ids_BxL)
    x_BxLxE = layer_norm(cfg, "norm")(x_BxLxE)
    x_BxLxE = Dropout(cfg.hidden_dropout)(x_BxLxE, deterministic=deterministic)
    if cfg.project_embeddings:
      return dense(cfg, cfg.hidden_size, "project")(x_BxLxE)
    return x_BxLxE


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
    ctx_BxQxNxD = attend(cfg, q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL, deterministic)
    return dense(cfg, h, "out")(ctx_BxQxNxD.reshape(b, q, h))


class Layer(nn.Module):
  """Attention + feed-forward, each followed by dropout, residual and LayerNorm (post-LN)."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxH, mask_Bx1xQxL, positions_BxL, deterministic: bool, read_BxQ=None, relative_WxH=None):
    """The layer's output at every token, or only at the tokens read_BxQ (keys still see all). DeBERTa's
    attention also takes the relative embeddings and the tokens' positions."""
    cfg = self.cfg
    drop = lambda t: Dropout(cfg.hidden_dropout)(t, deterministic=deterministic)
    q_BxQxH = x_BxLxH if read_BxQ is None else gather_tokens(x_BxLxH, read_BxQ)
    if cfg.architecture == "deberta":
      query_positions_BxQ = positions_BxL if read_BxQ is None else jnp.take_along_axis(positions_BxL, read_BxQ, 1)
      attn_BxQxH = deberta.DisentangledSelfAttention(cfg, name="attention")(
          q_BxQxH, x_BxLxH, mask_Bx1xQxL, deterministic, relative_WxH, query_positions_BxQ, positions_BxL)
    else:
      attn_BxQxH = SelfAttention(cfg, name="attention")(q_BxQxH, x_BxLxH, mask_Bx1xQxL, deterministic)
    if cfg.attention_out_dropout:
      attn_BxQxH = drop(attn_BxQxH)
    q_BxQxH = layer_norm(cfg, "attention_norm")(q_BxQxH + attn_BxQxH)
    y_BxQxF = activation(cfg.hidden_act)(dense(cfg, cfg.intermediate_size, "mlp_in")(q_BxQxH))
    y_BxQxH = dense(cfg, cfg.hidden_size, "mlp_out")(y_BxQxF)
    return layer_norm(cfg, "mlp_norm")(q_BxQxH + drop(y_BxQxH))


class Encoder(nn.Module):
  """Embeddings and the layer stack; ALBERT reuses its few layer parameter sets across depth, ModernBERT ends
  with a LayerNorm (its layers are pre-LN)."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, ids_BxL, type_ids_BxL, segment_ids_BxL, positions_BxL, deterministic: bool = True,
               read_BxS=None):
    """Hidden states of the last layer: [B, L, H] at every token, or [B, S, H] at the tokens read_BxS."""
    cfg = self.cfg
    x_BxLxH = Embeddings(cfg, name="embeddings")(ids_BxL, type_ids_BxL, positions_BxL, deterministic)
    extra = {}
    if cfg.architecture == "deberta":
      extra["relative_WxH"] = deberta.RelativeEmbeddings(cfg, name="relative")(ids_BxL.shape[1])
    if cfg.architecture == "modernbert":
      layers = [modernbert.Layer(cfg, k, name=f"layer_{k}") for k in range(cfg.param_layers)]
    else:
      layers = [Layer(cfg, name=f"layer_{k}") for k in range(cfg.param_layers)]
    masks = {}

    def mask(k: int, read_BxQ):
      """Layer k's mask for all queries or the read-out ones (one per window size and query set)."""
      window = cfg.layer_windows[k] if cfg.layer_windows else 0
      if (window, read_BxQ is None) not in masks:
        q_segments, q_positions = segment_ids_BxL, positions_BxL
        if read_BxQ is not None:
          q_segments = jnp.take_along_axis(segment_ids_BxL, read_BxQ, axis=1)
          q_positions = jnp.take_along_axis(positions_BxL, read_BxQ, axis=1)
        masks[window, read_BxQ is None] = attention_mask(q_segments, segment_ids_BxL, q_positions, positions_BxL,
                                                         window)
      return masks[window, read_BxQ is None]

    *schedule, last = cfg.layer_schedule()  # at least one layer (config.from_hf_config)
    for k in schedule:
      x_BxLxH = layers[k](x_BxLxH, mask(k, None), positions_BxL, deterministic, **extra)
    x_BxSxH = layers[last](x_BxLxH, mask(last, read_BxS), positions_BxL, deterministic, read_BxS, **extra)
    if cfg.architecture == "modernbert":
      x_BxSxH = layer_norm(cfg, "final_norm")(x_BxSxH)
    return x_BxSxH
