"""DeBERTa's disentangled attention (the DeBERTa-v3 layout of `deberta-v2` checkpoints).

Each score adds to the content-content product q_i . k_j a content-to-position term q_i . Pk[d(i, j)] (c2p) and
a position-to-content term k_j . Pq[d(i, j)] (p2c), where d(i, j) is the bucketed relative distance of query i to
key j and Pq, Pk are the shared relative embeddings (LayerNorm'd) projected by the layer's own query and key
layers (`share_att_key`). All three are divided by sqrt(head_dim * 3).

Distances come from `position_ids`, which restart at 0 for each packed example, so an example sees exactly the
distances it would see alone in its row (other examples' tokens are masked anyway). A row of L tokens has
distances in [-(L-1), L-1] only, so only the relative embeddings those reach are projected (`relative_rows`),
not the whole table (2 x 256 rows for DeBERTa-v3).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bertjax.models.config import EncoderConfig
from bertjax.models.dropout import Dropout
from bertjax.models.layers import dense, einsum_attention, layer_norm


def log_buckets(distance: np.ndarray, buckets: int, max_position: int) -> np.ndarray:
  """Hugging Face's `make_log_bucket_position`: distances below buckets / 2 stay exact, longer ones share
  logarithmically wider buckets up to max_position. Computed in float32, as the PyTorch model does."""
  mid = buckets // 2
  sign = np.sign(distance)
  near = (distance < mid) & (distance > -mid)
  absolute = np.where(near, mid - 1, np.abs(distance)).astype(np.float32)
  log_ratio = np.log(absolute / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
  far = np.ceil(log_ratio * np.float32(mid - 1)) + np.float32(mid)
  return np.where(absolute <= mid, distance, far * sign).astype(np.int64)


@functools.lru_cache(maxsize=None)
def relative_rows(cfg: EncoderConfig, length: int) -> tuple[int, np.ndarray]:
  """For rows of `length` tokens: the first relative-embedding row any distance reaches, and for each distance
  d in [-(length-1), length-1] (at index d + length - 1) its row counted from that first one."""
  distance = np.arange(-(length - 1), length)
  if cfg.position_buckets > 0:
    distance = log_buckets(distance, cfg.position_buckets, cfg.max_relative_positions)
  span = cfg.relative_span
  rows = np.clip(distance + span, 0, 2 * span - 1)
  return int(rows.min()), (rows - rows.min()).astype(np.int32)


class RelativeEmbeddings(nn.Module):
  """The relative position embeddings shared by every layer, after their LayerNorm (`norm_rel_ebd`): the rows
  that rows of `length` tokens reach. [W, H]."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    cfg = self.cfg
    table = self.param("embedding", nn.initializers.normal(cfg.initializer_range),
                       (2 * cfg.relative_span, cfg.hidden_size))
    first, index = relative_rows(cfg, length)
    rows_WxH = jax.lax.slice_in_dim(table, first, first + int(index.max()) + 1).astype(jnp.dtype(cfg.dtype))
    return layer_norm(cfg, "norm")(rows_WxH)


def relative_index(cfg: EncoderConfig, query_positions_BxQ, key_positions_BxL, length: int) -> jax.Array:
  """Row of the relative embeddings (as returned for rows of `length` tokens) for each query-key pair. [B, Q, L]."""
  _, index = relative_rows(cfg, length)
  distance_BxQxL = query_positions_BxQ[:, :, None] - key_positions_BxL[:, None, :]
  return jnp.asarray(index)[distance_BxQxL + length - 1]


class DisentangledSelfAttention(nn.Module):
  """SelfAttention's projections (query, key, value, out) with c2p and p2c position terms in the scores; always
  the einsum core (the terms are a bias on the materialised scores)."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, queries_BxQxH, x_BxLxH, mask_Bx1xQxL, deterministic: bool, relative_WxH,
               query_positions_BxQ, key_positions_BxL):
    cfg = self.cfg
    (b, l, h), q = x_BxLxH.shape, queries_BxQxH.shape[1]
    n, d = cfg.num_heads, h // cfg.num_heads
    query, key = dense(cfg, h, "query"), dense(cfg, h, "key")
    q_BxQxNxD = query(queries_BxQxH).reshape(b, q, n, d)
    k_BxLxNxD = key(x_BxLxH).reshape(b, l, n, d)
    v_BxLxNxD = dense(cfg, h, "value")(x_BxLxH).reshape(b, l, n, d)
    relative_WxH = Dropout(cfg.hidden_dropout)(relative_WxH, deterministic=deterministic)
    w = relative_WxH.shape[0]
    scale = float(np.sqrt(d * (1 + len(cfg.relative_attention))))  # the content term and each position term
    q_BxQxNxD = q_BxQxNxD / scale
    index_BxNxQxL = jnp.broadcast_to(relative_index(cfg, query_positions_BxQ, key_positions_BxL, l)[:, None],
                                     (b, n, q, l))
    terms = []
    if "c2p" in cfg.relative_attention:
      pos_key_WxNxD = key(relative_WxH).reshape(w, n, d)
      c2p_BxNxQxW = jnp.einsum("bqnd,wnd->bnqw", q_BxQxNxD, pos_key_WxNxD, preferred_element_type=jnp.float32)
      terms.append(jnp.take_along_axis(c2p_BxNxQxW, index_BxNxQxL, axis=-1))
    if "p2c" in cfg.relative_attention:
      pos_query_WxNxD = query(relative_WxH).reshape(w, n, d) / scale
      p2c_BxNxLxW = jnp.einsum("bknd,wnd->bnkw", k_BxLxNxD, pos_query_WxNxD, preferred_element_type=jnp.float32)
      # Key j's term for query i sits at row d(i, j) of key j's scores.
      p2c_BxNxLxQ = jnp.take_along_axis(p2c_BxNxLxW, jnp.swapaxes(index_BxNxQxL, 2, 3), axis=-1)
      terms.append(jnp.swapaxes(p2c_BxNxLxQ, 2, 3))
    dropout = lambda p: Dropout(cfg.attention_dropout)(p, deterministic=deterministic)
    ctx_BxQxNxD = einsum_attention(q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xQxL, dropout, sum(terms))
    return dense(cfg, h, "out")(ctx_BxQxNxD.reshape(b, q, h))
