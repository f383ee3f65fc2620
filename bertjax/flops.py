"""Model FLOPs of real tokens, for MFU.

MFU = (training FLOPs of the real tokens processed) / (wall time x peak), where the peak is the matmul
peak of the run's devices (bertjax.matmul_peak: the vendor's figure or a measured one). Training FLOPs are 3x the
forward pass (forward + 2x backward); the forward pass counts 2 FLOPs per multiply-add of every
matmul applied to real tokens, attention scores and weighted sums over each example's own tokens.
These are the model's FLOPs: the encoder's last layer runs only at the read-out tokens (see
`bertjax.models.encoder`), and the work it skips there is still counted, as it is for a peer that does it.
"""

import numpy as np

from bertjax.models.config import EncoderConfig


def attended_pairs(lengths: np.ndarray, window: int) -> np.ndarray:
  """Query-key pairs per example of these lengths: all n^2, or those at most `window` apart (ModernBERT's
  sliding layers): n^2 - (n - w - 1)(n - w) when n > w + 1."""
  if not window:
    return lengths ** 2
  beyond = np.maximum(lengths - window - 1, 0)
  return lengths ** 2 - beyond * (beyond + 1)


def forward_flops(cfg: EncoderConfig, lengths: np.ndarray) -> float:
  """Forward FLOPs for examples of these real lengths (the head read once per example). DeBERTa's c2p and
  p2c terms count like two more score products (each pair's score needs one position row per term); ModernBERT
  has a fused GeGLU (3 h f per token) and pairs within the window in its sliding layers."""
  lengths = np.asarray(lengths, np.float64)
  h, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.emb_size
  applied_layers = cfg.num_layers * cfg.inner_group_num
  tokens = lengths.sum()
  mlp = 3 * h * f if cfg.architecture == "modernbert" else 2 * h * f
  per_token = applied_layers * (4 * h * h + mlp) + (e * h if cfg.project_embeddings else 0)
  windows = cfg.layer_windows or (0,) * applied_layers
  score_products = 2 + len(cfg.relative_attention)  # QK^T and PV (and c2p, p2c), each h MACs per pair
  attention = score_products * h * sum(attended_pairs(lengths, w).sum() for w in windows)
  head = len(lengths) * (h * h + h * cfg.num_labels)
  return 2.0 * (tokens * per_token + attention + head)


def train_flops(cfg: EncoderConfig, lengths: np.ndarray) -> float:
  return 3.0 * forward_flops(cfg, lengths)
