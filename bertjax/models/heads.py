"""Classification heads exactly as Hugging Face defines them, read at each example's first token or over all of
its tokens (ModernBERT's `classifier_pooling: mean`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bertjax.models.config import EncoderConfig
from bertjax.models.dropout import Dropout
from bertjax.models.encoder import Encoder
from bertjax.models.layers import activation, dense, layer_norm


class Head(nn.Module):
  """pooler: dense `pooler`, act, dropout, classifier (BERT, ALBERT: tanh; DistilBERT: relu).
  dense: dropout (pooler_dropout), dense, act, dropout, out (RoBERTa, XLM-R, CamemBERT: tanh; ELECTRA,
  DeBERTa: gelu). dense_norm: dense, act, LayerNorm, dropout, out (ModernBERT)."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, pooled_BxSxH, deterministic: bool):
    cfg = self.cfg
    act = activation(cfg.head_act)
    if cfg.head == "pooler":
      x = act(dense(cfg, cfg.hidden_size, "pooler")(pooled_BxSxH))
    else:
      if cfg.head == "dense":
        pooled_BxSxH = Dropout(cfg.pooler_dropout)(pooled_BxSxH, deterministic=deterministic)
      x = act(dense(cfg, cfg.hidden_size, "dense", cfg.head_bias)(pooled_BxSxH))
      if cfg.head == "dense_norm":
        x = layer_norm(cfg, "norm")(x)
    x = Dropout(cfg.classifier_dropout)(x, deterministic=deterministic)
    return dense(cfg, cfg.num_labels, "out")(x)


def start_at_mean(params: dict, labels: np.ndarray) -> str:
  """Sets a fresh regression head's output bias to the training labels' mean (in `params`), so that its first
  steps learn the order of the scores, not their offset: STS-B at batch 1024 (18 steps) reached dev Pearson 0.78
  from this start and -0.04 from a zero bias (docs/large_batch.md). Returns the note for the start lines."""
  finite = np.asarray(labels, np.float64)
  finite = finite[np.isfinite(finite)]  # a non-finite label is the loss's to meet (train.skip_nonfinite_steps)
  mean = float(finite.mean()) if finite.size else 0.0
  bias = params["head"]["out"]["bias"]
  params["head"]["out"]["bias"] = np.full(bias.shape, mean, bias.dtype)
  return f"the new regression head starts at the training labels' mean, {mean:.4g}"


def mean_over_segments(x_BxLxH: jax.Array, segment_ids_BxL: jax.Array, cls_index_BxS: jax.Array) -> jax.Array:
  """The mean of each example's tokens: example s of a row is the segment its first token (cls_index) is in.
  An empty slot (cls_index 0 of a row whose first segment is taken) averages that segment again or padding;
  the loss masks it. [B, S, H]."""
  segments_BxS = jnp.take_along_axis(segment_ids_BxL, cls_index_BxS, axis=1)
  member_BxSxL = segments_BxS[:, :, None] == segment_ids_BxL[:, None, :]
  counts_BxSx1 = jnp.maximum(member_BxSxL.sum(axis=-1, keepdims=True), 1).astype(jnp.float32)
  sums_BxSxH = jnp.einsum("bsl,blh->bsh", member_BxSxL.astype(x_BxLxH.dtype), x_BxLxH,
                          preferred_element_type=jnp.float32)
  return (sums_BxSxH / counts_BxSx1).astype(x_BxLxH.dtype)


class SequenceClassifier(nn.Module):
  """Encoder + head. Inputs follow the batch contract in `bertjax.data`; returns logits [B, S, C]."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, segment_ids, position_ids, cls_index, deterministic: bool = True):
    encoder = Encoder(self.cfg, name="encoder")
    if self.cfg.pooling == "mean":
      hidden_BxLxH = encoder(input_ids, token_type_ids, segment_ids, position_ids, deterministic)
      pooled_BxSxH = mean_over_segments(hidden_BxLxH, segment_ids, cls_index)
    else:
      pooled_BxSxH = encoder(input_ids, token_type_ids, segment_ids, position_ids, deterministic, read_BxS=cls_index)
    logits_BxSxC = Head(self.cfg, name="head")(pooled_BxSxH, deterministic)
    return logits_BxSxC.astype(jnp.float32)


def model_inputs(batch) -> dict:
  """The model's keyword arguments from a batch dict (labels and masks stay with the loss)."""
  keys = ("input_ids", "token_type_ids", "segment_ids", "position_ids", "cls_index")
  return {k: batch[k] for k in keys}


def random_params(cfg: EncoderConfig, key: jax.Array) -> dict:
  """A classifier's freshly initialised params, from a dummy batch: traceable, so jit it to compute them or
  `jax.eval_shape` it for their shapes alone."""
  ones = jnp.ones((1, 4), jnp.int32)
  return dict(SequenceClassifier(cfg).init(key, ones, 0 * ones, ones, 0 * ones, jnp.zeros((1, 1), jnp.int32))["params"])


class _HeadAlone(nn.Module):
  """The head at the path it has in SequenceClassifier ("head"), with no encoder before it."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, pooled_BxSxH):
    return Head(self.cfg, name="head")(pooled_BxSxH, deterministic=True)


def random_head_params(cfg: EncoderConfig, key: jax.Array) -> dict:
  """`random_params(cfg, key)["head"]` without initialising the encoder: flax draws a parameter's initial
  value from the key and the parameter's path, which are the same here."""
  return dict(_HeadAlone(cfg).init(key, jnp.ones((1, 1, cfg.hidden_size), jnp.float32))["params"]["head"])
