"""Dropout whose mask comes from a counter-based integer hash instead of threefry.

flax's `nn.Dropout` draws its mask with `jax.random.bernoulli`, i.e. threefry-2x32 (20 rounds per
pair of words) plus a float conversion. On CPU those random bits cost more than the matmuls of the
attention they drop (docs/performance.md). Here each element's 32 random bits are two rounds of the
`lowbias32` integer hash of its flat index mixed with two 32-bit words of the layer's dropout key,
which XLA fuses into the masking op itself: no mask is materialised, and the forward pass is several
times cheaper. The mask is a pure function of (key, flat index), so it does not depend on how the
array is sharded. Dropout needs independent-looking masks, not cryptographic ones; the tests check
the keep rate, the bit balance and that masks differ across keys and positions.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


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
  """uint32 bits of `shape`, one per element, from the key and the element's flat index (mod 2^32)."""
  words = _key_words(key)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
    stride *= shape[dim]
  return _lowbias32(_lowbias32(index * jnp.uint32(0x9E3779B1) + words[0]) ^ words[1])


class Dropout(nn.Module):
  """Inverted dropout: zero each element with probability `rate`, scale the rest by 1 / (1 - rate)."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep = hash_bits(self.make_rng("dropout"), x.shape) >= jnp.uint32(round(self.rate * 2**32))
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))
