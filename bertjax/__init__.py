"""bertjax: fine-tune BERT-family encoders for text classification with JAX/Flax."""

__version__ = "0.1.0"
