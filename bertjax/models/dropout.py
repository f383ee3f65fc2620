"""Dropout whose mask comes from a counter-based integer hash instead of threefry.

flax's `nn.Dropout` draws its mask with `jax.random.bernoulli`, i.e. threefry-2x32 (20 rounds per
pair of words) plus a float conversion. On CPU those random bits cost more than the matmuls of the
attention they drop (docs/performance.md). Here each element's 32 random bits are two rounds of the
`lowbias32` integer hash of its flat index mixed with the two (hashed) 32-bit words of the layer's
dropout key, which XLA fuses into the masking op itself: no mask is materialised, and the forward
pass is several times cheaper. The mask is a pure function of (key, flat index), so it does not
depend on how the array is sharded. Dropout needs independent-looking masks, not cryptographic ones;
the tests check the keep rate, the bit balance and that masks differ across keys and positions.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bertjax.errors import UserError


def _lowbias32(x: jax.Array) -> jax.Array:
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _key_words(key: jax.Array) -> jax.Array:
  """Two uint32 words of a raw (uint32[2]) or typed PRNG key."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return key.reshape(-1)[:2].astype(jnp.uint32)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 bits of `shape`, one per element, from the key and the element's flat index.

  Both key words go through the hash before they meet the index, so nearby keys give unrelated
  masks. Arrays of 2^32 elements or more are refused: their flat index would wrap and repeat the
  mask."""
  size = math.prod(shape)
  if size >= 2**32:
    raise UserError(f"dropout over an array of {size} elements (shape {shape}): at most 2^32 - 1 "
                    "are supported; use fewer rows per step (train.global_batch_size, train.grad_accum_steps) "
                    "or a shorter data.max_length")
  words = _key_words(key)
  k0 = _lowbias32(words[0] + jnp.uint32(0x9E3779B9))
  k1 = _lowbias32(words[1] ^ k0)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride)
    stride *= shape[dim]
  return _lowbias32(_lowbias32(index ^ k0) + k1)


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """True where an element survives dropout at `rate` (0 <= rate < 1): P(bits < threshold) = rate."""
  threshold = min(round(rate * 2**32), 2**32 - 1)
  return hash_bits(key, shape) >= jnp.uint32(threshold)


class Dropout(nn.Module):
  """Inverted dropout: zero each element with probability `rate`, scale the rest by 1 / (1 - rate)."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep = keep_mask(self.make_rng("dropout"), x.shape, self.rate)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))
