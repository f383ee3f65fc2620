"""The pure steps: gradient accumulation, the evaluator over odd-sized sets, packing, device meshes."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from bertjax import config_base, models, sharding
from bertjax.data.batching import Batcher
from bertjax.data.tokenize import Tokenized
from bertjax.evaluate import Evaluator
from bertjax.step import make_train_step, new_train_state
from test_optim import make_optimizer

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(**kw):
  base = dict(family="bert", vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
              max_position_embeddings=64, num_labels=3, hidden_dropout=0.0, attention_dropout=0.0,
              classifier_dropout=0.0)
  base.update(kw)
  return models.EncoderConfig(**base)


def random_tokens(n, seed=0, max_len=20):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, max_len, n)
  ids = [np.r_[[2], rng.integers(5, 100, l - 2), [3]].astype(np.int32) for l in lengths]
  types = [np.zeros(l, np.int32) for l in lengths]
  return Tokenized.from_lists(ids, types, 0), rng.integers(0, 3, n).astype(np.int32)


def one_step(cfg, batch, accum):
  model = models.SequenceClassifier(cfg)
  params = models.init_params(cfg, seed=0)
  oc = config_base.base_config().optimizer
  tx, schedule, _ = make_optimizer(oc, params, 10, 32)
  state = new_train_state(params, tx, seed=0)
  step = jax.jit(make_train_step(model, tx, schedule, regression=False, grad_accum_steps=accum))
  return step(state, batch)


@pytest.mark.parametrize("packing", [pytest.param(False, marks=pytest.mark.slow), True])
def test_grad_accumulation_4x8_equals_32(packing):
  tokens, labels = random_tokens(32)
  batcher = Batcher(tokens, labels, global_batch_size=32, max_length=32, packing=packing, max_per_row=4,
                    shuffle=False, row_multiple=4)
  batch = next(batcher.iterate(0))
  cfg = tiny_cfg()
  full, m_full = one_step(cfg, batch, 1)
  accum, m_accum = one_step(cfg, batch, 4)
  assert float(m_full["examples"]) == float(m_accum["examples"]) == batch.fields()["example_mask"].sum() >= 28
  np.testing.assert_allclose(float(m_full["loss"]), float(m_accum["loss"]), rtol=1e-6)
  # Adam normalises updates, so compare the gradient-sensitive first moment as well as the params.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), full.params, accum.params)
  mu_full, mu_accum = optax.tree.get(full.opt_state, "mu"), optax.tree.get(accum.opt_state, "mu")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9), mu_full, mu_accum)


def test_partial_batch_loss_is_mean_over_real_examples():
  tokens, labels = random_tokens(5)
  batcher = Batcher(tokens, labels, global_batch_size=8, max_length=32, shuffle=False)
  batch = next(batcher.iterate(0))
  fields = batch.fields()
  assert fields["example_mask"].sum() == 5  # 3 empty rows
  cfg = tiny_cfg()
  _, metrics = one_step(cfg, batch, 1)
  params = models.init_params(cfg, seed=0)
  logits = jax.jit(models.SequenceClassifier(cfg).apply)({"params": params}, **models.model_inputs(fields))[:5, 0]
  want = -np.mean(jax.nn.log_softmax(logits)[np.arange(5), fields["labels"][:5, 0].astype(int)])
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)


def test_evaluator_counts_every_example_and_packing_keeps_logits():
  tokens, labels = random_tokens(37, seed=1)
  cfg = tiny_cfg()
  params = models.init_params(cfg, seed=1)
  model = models.SequenceClassifier(cfg)
  mesh = sharding.make_mesh()
  evaluator = Evaluator(model, mesh, sharding.replicated(mesh))
  # Each example alone in its row (right-padded, its own segment), all in one call.
  ids, types, real = (np.zeros((37, 20), np.int32) for _ in range(3))
  for i in range(37):
    n = len(tokens.ids(i))
    ids[i, :n], types[i, :n], real[i, :n] = tokens.ids(i), tokens.type_ids(i), 1
  alone = np.asarray(jax.jit(model.apply)({"params": params}, input_ids=ids, token_type_ids=types,
                                          segment_ids=real, position_ids=np.tile(np.arange(20, dtype=np.int32), (37, 1)),
                                          cls_index=np.zeros((37, 1), np.int32)))[:, 0]
  for packing in (False, True):
    batcher = Batcher(tokens, labels, global_batch_size=8, max_length=32, packing=packing, max_per_row=4,
                      shuffle=False)
    got = evaluator.logits(params, batcher, 37)
    np.testing.assert_allclose(got, alone, atol=1e-5)
  assert evaluator.step.num_compilations <= len(batcher.shapes()) + len(Batcher(
      tokens, labels, global_batch_size=8, max_length=32, shuffle=False).shapes())


@pytest.mark.slow
def test_eight_fake_devices_match_one_device():
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh
      import sys; sys.path.insert(0, "tests")
      from test_optim import make_optimizer
      from test_step import tiny_cfg, random_tokens
      from bertjax import config_base, models, sharding
      from bertjax.data.batching import Batcher
      from bertjax.step import make_train_step, new_train_state
      assert jax.device_count() == 8
      tokens, labels = random_tokens(64, seed=3)
      cfg = tiny_cfg(hidden_dropout=0.1, attention_dropout=0.1)
      model = models.SequenceClassifier(cfg)
      params = models.init_params(cfg)
      tx, schedule, _ = make_optimizer(config_base.base_config().optimizer, params, 10, 32)
      def run(mesh):
        state = new_train_state(params, tx, seed=0)
        shard = sharding.state_shardings(jax.eval_shape(lambda s: s, state), mesh)
        state = jax.device_put(state, shard)
        bs = sharding.batch_sharding(mesh)
        step = jax.jit(make_train_step(model, tx, schedule, False), in_shardings=(shard, bs),
                       out_shardings=(shard, None))
        losses = []
        for b in Batcher(tokens, labels, global_batch_size=32, max_length=32, shuffle=False).iterate(0):
          state, m = step(state, sharding.global_batch(b, bs))
          losses.append(float(m["loss"]))
        return losses, jax.device_get(state.params)
      one = run(Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.BATCH_AXES))
      eight = run(sharding.make_mesh(8, 1))
      fsdp = run(sharding.make_mesh(2, 4))
      for other in (eight, fsdp):
        np.testing.assert_allclose(one[0], other[0], rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), one[1], other[1])
      print("losses", one[0], eight[0], fsdp[0])
  """)
  env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "losses" in result.stdout


def test_mesh_errors():
  from bertjax.errors import UserError
  n = jax.device_count()
  with pytest.raises(UserError, match="must equal"):
    sharding.make_mesh(n + 1, 1)
  assert sharding.param_spec((30520, 384), 4) == jax.sharding.PartitionSpec("fsdp", None)
  assert sharding.param_spec((30522, 384), 4) == jax.sharding.PartitionSpec(None, "fsdp")  # 30522 % 4 != 0
  assert sharding.param_spec((384,), 4) == jax.sharding.PartitionSpec()
