"""Flax BERT-family models: one shared encoder, the per-family differences as configuration."""

from bertjax.models.config import EncoderConfig, from_hf_config
from bertjax.models.heads import SequenceClassifier, model_inputs
from bertjax.models.hf_weights import Loaded, init_params, load, save

__all__ = ["EncoderConfig", "from_hf_config", "SequenceClassifier", "model_inputs", "Loaded", "init_params",
           "load", "save"]
