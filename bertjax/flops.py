"""Model FLOPs of real tokens and the measured matmul peak, for MFU.

MFU = (training FLOPs of the real tokens processed) / (wall time x peak), where the peak is a
large float32 matmul measured on the same machine, in the same run. Training FLOPs are 3x the
forward pass (forward + 2x backward); the forward pass counts 2 FLOPs per multiply-add of every
matmul applied to real tokens, attention scores and weighted sums over each example's own tokens.
These are the model's FLOPs: the encoder's last layer runs only at the read-out tokens (see
`bertjax.models.encoder`), and the work it skips there is still counted, as it is for a peer that does it.
"""

import functools
import time

import jax
import jax.numpy as jnp
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


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype="float32") -> float:
  """Best FLOP/s of an n^3 matmul with operands of `dtype` summed in float32, as the model's products
  are: one device's, times the device count on accelerators (fake CPU devices share the same cores, so
  a CPU's peak is one device's)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  devices = 1 if jax.default_backend() == "cpu" else jax.device_count()
  return 2.0 * n ** 3 / best * devices
