"""Classification heads exactly as Hugging Face defines them, read at each example's first token."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bertjax.models.config import EncoderConfig
from bertjax.models.dropout import Dropout
from bertjax.models.encoder import Encoder, dense


class Head(nn.Module):
  """pooler: dense-tanh pooler, dropout, classifier (BERT, ALBERT).
  dense_tanh: dropout, dense, tanh, dropout, out (RoBERTa). dense_gelu: the same with gelu (ELECTRA)."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, first_BxSxH, deterministic: bool):
    cfg = self.cfg
    drop = lambda t: Dropout(cfg.classifier_dropout)(t, deterministic=deterministic)
    if cfg.head == "pooler":
      x = jnp.tanh(dense(cfg, cfg.hidden_size, "pooler")(first_BxSxH))
    else:
      act = jnp.tanh if cfg.head == "dense_tanh" else (lambda t: jax.nn.gelu(t, approximate=False))
      x = act(dense(cfg, cfg.hidden_size, "dense")(drop(first_BxSxH)))
    return dense(cfg, cfg.num_labels, "out")(drop(x))


class SequenceClassifier(nn.Module):
  """Encoder + head. Inputs follow the batch contract in `bertjax.data`; returns logits [B, S, C]."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, segment_ids, position_ids, cls_index, deterministic: bool = True):
    first_BxSxH = Encoder(self.cfg, name="encoder")(input_ids, token_type_ids, segment_ids, position_ids,
                                                    deterministic, read_BxS=cls_index)
    logits_BxSxC = Head(self.cfg, name="head")(first_BxSxH, deterministic)
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
