"""The hashed dropout mask: its bits against a numpy reference, its rate and scaling, and its
randomness across keys and positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bertjax.errors import UserError
from bertjax.models.dropout import Dropout, hash_bits


def apply(rate, x, key, deterministic=False):
  return Dropout(rate).apply({}, x, deterministic, rngs={"dropout": key})


def np_lowbias32(x):
  x = x.astype(np.uint32)
  x ^= x >> np.uint32(16)
  x *= np.uint32(0x7FEB352D)
  x ^= x >> np.uint32(15)
  x *= np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def np_hash_bits(words, size):
  """The same bits written independently in numpy (uint32 arithmetic wraps, as in XLA)."""
  with np.errstate(over="ignore"):
    k0 = np_lowbias32(np.array([words[0]], np.uint32) + np.uint32(0x9E3779B9))
    k1 = np_lowbias32(np.array([words[1]], np.uint32) ^ k0)
    return np_lowbias32(np_lowbias32(np.arange(size, dtype=np.uint32) ^ k0) + k1)


@pytest.mark.parametrize("words", [(0, 0), (0, 7), (123456789, 0), (0xFFFFFFFF, 0xDEADBEEF)])
def test_bits_match_the_numpy_reference(words):
  got = np.asarray(hash_bits(jnp.array(words, jnp.uint32), (3, 5, 7)))
  np.testing.assert_array_equal(got.reshape(-1), np_hash_bits(words, 105))


def test_keep_rate_and_scaling():
  x = jnp.ones((64, 128, 128), jnp.float32)
  for rate in (0.1, 0.5):
    y = np.asarray(apply(rate, x, jax.random.PRNGKey(3)))
    kept = y != 0
    # 1M draws: the binomial standard deviation of the kept fraction is below 5e-4.
    assert abs(kept.mean() - (1 - rate)) < 2e-3
    np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)


def test_edge_rates_shapes_and_dtypes():
  x = jnp.arange(12.0).reshape(3, 4)
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(apply(0.3, x, key, deterministic=True), x)
  np.testing.assert_array_equal(apply(0.0, x, key), x)
  np.testing.assert_array_equal(apply(1.0, x, key), jnp.zeros_like(x))
  # A rate whose threshold rounds to 2^32 drops (almost) everything instead of overflowing.
  assert float(jnp.sum(apply(0.9999999999, jnp.ones((1000,)), key) != 0)) == 0
  assert apply(0.5, jnp.float32(2.0), key).shape == ()
  y = apply(0.5, jnp.ones((4, 8, 16, 2), jnp.bfloat16), key)
  assert y.dtype == jnp.bfloat16 and set(np.unique(np.asarray(y, np.float32))) == {0.0, 2.0}
  with pytest.raises(UserError, match="2\\^32 - 1 are supported; use fewer rows per step"):
    hash_bits(key, (1 << 16, 1 << 16))


def test_masks_depend_on_both_key_words_not_on_layout():
  key = jax.random.PRNGKey(7)
  bits = np.asarray(hash_bits(key, (8, 1000)))
  # The bits of a PRNGKey are those of its raw words (here [0, 7]), as the numpy reference computes them.
  np.testing.assert_array_equal(bits.reshape(-1), np_hash_bits(tuple(int(w) for w in np.asarray(key)), 8000))
  # The mask is a function of the flat index: the same elements under another shape get the same bits.
  np.testing.assert_array_equal(bits.reshape(-1), np.asarray(hash_bits(key, (8000,))))
  # A typed key and its raw data give the same bits.
  np.testing.assert_array_equal(np.asarray(hash_bits(jax.random.key(7), (8, 1000))), bits)
  base = np.asarray(hash_bits(jnp.array([5, 9], jnp.uint32), (8000,)))
  for other in ([6, 9], [5, 10], [9, 5]):  # either word changed, or the words swapped
    assert (np.asarray(hash_bits(jnp.array(other, jnp.uint32), (8000,))) == base).mean() < 1e-3
  # Neither is the other mask shifted by a few positions.
  shifted = np.asarray(hash_bits(jnp.array([6, 9], jnp.uint32), (8000,)))
  assert all((shifted[k:] == base[:8000 - k]).mean() < 1e-3 for k in range(1, 64))


@pytest.mark.parametrize("words", [(0, 1), (0xCAFE, 0xF00D)])
def test_bits_look_independent(words):
  bits = np.asarray(hash_bits(jnp.array(words, jnp.uint32), (1 << 20,)))
  ones = np.unpackbits(bits.view(np.uint8)).reshape(-1, 32)
  # Every one of the 32 bit positions is set half of the time (std 5e-4 over 1M draws).
  assert np.all(np.abs(ones.mean(0) - 0.5) < 3e-3)
  keep = (bits >= np.uint32(0.1 * 2**32)).astype(np.float64)
  # Neighbours, and elements a row of a [.., 128] or [.., 1024] view apart, are uncorrelated.
  for lag in (1, 2, 128, 1024):
    assert abs(np.corrcoef(keep[:-lag], keep[lag:])[0, 1]) < 5e-3


def test_gradient_is_the_mask_scaled():
  x = jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)
  key = jax.random.PRNGKey(5)
  y = apply(0.2, x, key)
  g = jax.grad(lambda t: jnp.sum(apply(0.2, t, key)))(x)
  np.testing.assert_allclose(np.asarray(g), np.where(np.asarray(y) != 0, 1 / 0.8, 0.0), rtol=1e-6)
