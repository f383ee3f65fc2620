"""The hashed dropout mask: its rate, its scaling, its randomness across keys and positions."""

import jax
import jax.numpy as jnp
import numpy as np

from bertjax.models.dropout import Dropout, hash_bits


def apply(rate, x, key, deterministic=False):
  return Dropout(rate).apply({}, x, deterministic, rngs={"dropout": key})


def test_keep_rate_and_scaling():
  x = jnp.ones((64, 128, 128), jnp.float32)
  for rate in (0.1, 0.5):
    y = np.asarray(apply(rate, x, jax.random.PRNGKey(3)))
    kept = y != 0
    # 1M draws: the binomial standard deviation of the kept fraction is below 5e-4.
    assert abs(kept.mean() - (1 - rate)) < 2e-3
    np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)


def test_identity_when_deterministic_or_zero_rate_and_zeros_at_rate_one():
  x = jnp.arange(12.0).reshape(3, 4)
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(apply(0.3, x, key, deterministic=True), x)
  np.testing.assert_array_equal(apply(0.0, x, key), x)
  np.testing.assert_array_equal(apply(1.0, x, key), jnp.zeros_like(x))


def test_masks_depend_on_key_not_on_layout():
  key = jax.random.PRNGKey(7)
  bits = np.asarray(hash_bits(key, (8, 1000)))
  np.testing.assert_array_equal(bits, np.asarray(hash_bits(key, (8, 1000))))
  # The mask is a function of the flat index: the same elements under another shape get the same bits.
  np.testing.assert_array_equal(bits.reshape(-1), np.asarray(hash_bits(key, (8000,))))
  other = np.asarray(hash_bits(jax.random.PRNGKey(8), (8, 1000)))
  assert (bits == other).mean() < 1e-3
  # A typed key and its raw data give the same bits.
  np.testing.assert_array_equal(np.asarray(hash_bits(jax.random.key(7), (8, 1000))), bits)


def test_bits_look_independent():
  bits = np.asarray(hash_bits(jax.random.PRNGKey(1), (1 << 20,)))
  ones = np.unpackbits(bits.view(np.uint8)).reshape(-1, 32)
  # Every one of the 32 bit positions is set half of the time (std 5e-4 over 1M draws).
  assert np.all(np.abs(ones.mean(0) - 0.5) < 3e-3)
  keep = (bits >= np.uint32(0.1 * 2**32)).astype(np.float64)
  # Neighbouring elements, rows of a [1024, 1024] view and the two keys' words are uncorrelated.
  for lag in (1, 2, 128, 1024):
    assert abs(np.corrcoef(keep[:-lag], keep[lag:])[0, 1]) < 5e-3
  swapped = np.asarray(hash_bits(jnp.array([1, 0], jnp.uint32), (1 << 20,)))
  same = np.asarray(hash_bits(jnp.array([0, 1], jnp.uint32), (1 << 20,)))
  assert (swapped == same).mean() < 1e-3


def test_gradient_is_the_mask_scaled():
  x = jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)
  key = jax.random.PRNGKey(5)
  y = apply(0.2, x, key)
  g = jax.grad(lambda t: jnp.sum(apply(0.2, t, key)))(x)
  np.testing.assert_allclose(np.asarray(g), np.where(np.asarray(y) != 0, 1 / 0.8, 0.0), rtol=1e-6)
