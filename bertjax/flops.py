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


def forward_flops(cfg: EncoderConfig, lengths: np.ndarray) -> float:
  """Forward FLOPs for examples of these real lengths (the head read once per example)."""
  lengths = np.asarray(lengths, np.float64)
  h, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.emb_size
  applied_layers = cfg.num_layers * cfg.inner_group_num
  tokens = lengths.sum()
  per_token = applied_layers * (4 * h * h + 2 * h * f) + (e * h if cfg.project_embeddings else 0)
  attention = applied_layers * 2 * h * (lengths ** 2).sum()  # QK^T and PV, each h MACs per pair
  head = len(lengths) * (h * h + h * cfg.num_labels)
  return 2.0 * (tokens * per_token + attention + head)


def train_flops(cfg: EncoderConfig, lengths: np.ndarray) -> float:
  return 3.0 * forward_flops(cfg, lengths)
