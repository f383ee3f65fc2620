"""Tests for bertjax.optim: weight-decay mask, layer-wise LR, schedules, LR scaling, AdamW maths."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bertjax import optim
from bertjax.errors import UserError


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(
      name="adamw", learning_rate=1e-2, weight_decay=0.0, eps=1e-6, b1=0.9, b2=0.999,
      schedule="constant", warmup_fraction=0.0, layerwise_lr_decay=1.0, clip_norm=0.0,
      lr_scaling="none", base_batch_size=32,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def make_optimizer(cfg, params, total_steps: int, global_batch_size: int):
  """(chain, schedule, peak learning rate) as the trainer builds them."""
  plan = optim.plan_optimizer(cfg, total_steps, global_batch_size)
  return (*optim.build_optimizer(plan, plan.hparams, params), plan.hparams["learning_rate"])


def toy_params(seed: int = 0) -> dict:
  """Two-layer encoder tree shaped like the real one, with random values."""
  rng = np.random.default_rng(seed)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  def norm():
    return {"scale": arr(4), "bias": arr(4)}

  def layer():
    return {
        "attention": {"kernel": arr(4, 4), "bias": arr(4)},
        "attention_norm": norm(),
        "mlp": {"kernel": arr(4, 4), "bias": arr(4)},
        "mlp_norm": norm(),
    }

  return {
      "encoder": {
          "embeddings": {"word": arr(6, 4), "position": arr(5, 4), "norm": norm()},
          "layer_0": layer(),
          "layer_1": layer(),
      },
      "head": {"dense": {"kernel": arr(4, 3), "bias": arr(3)}},
  }


def path_str(path) -> str:
  return "/".join(p.key for p in path)


DECAYED = {
    "encoder/embeddings/word", "encoder/embeddings/position",
    "encoder/layer_0/attention/kernel", "encoder/layer_0/mlp/kernel",
    "encoder/layer_1/attention/kernel", "encoder/layer_1/mlp/kernel",
    "head/dense/kernel",
}


def one_update(cfg, params, grads):
  tx, _, _ = make_optimizer(cfg, params, total_steps=10, global_batch_size=32)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return updates


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_weight_decay_skips_bias_and_norm(name):
  params = toy_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = one_update(make_cfg(name=name, weight_decay=0.1), params, zeros)
  moved = {path_str(p) for p, u in jax.tree_util.tree_leaves_with_path(updates)
           if np.any(np.asarray(u) != 0)}
  assert moved == DECAYED


def test_weight_decay_is_lr_times_wd_times_param():
  params = toy_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = one_update(make_cfg(weight_decay=0.1, learning_rate=0.01), params, zeros)
  kernel, update = params["head"]["dense"]["kernel"], updates["head"]["dense"]["kernel"]
  np.testing.assert_allclose(update, -0.01 * 0.1 * np.asarray(kernel), rtol=1e-6)


def test_layerwise_multipliers_on_toy_tree():
  mult = optim.layerwise_multipliers(toy_params(), 0.5)
  # n = 2 layers: embeddings depth 0, layer_k depth k+1, head depth 3.
  assert mult["encoder"]["embeddings"]["word"] == pytest.approx(0.125)
  assert mult["encoder"]["embeddings"]["norm"]["scale"] == pytest.approx(0.125)
  assert mult["encoder"]["layer_0"]["mlp"]["bias"] == pytest.approx(0.25)
  assert mult["encoder"]["layer_1"]["attention"]["kernel"] == pytest.approx(0.5)
  assert mult["head"]["dense"]["kernel"] == pytest.approx(1.0)


def test_layerwise_decay_scales_each_layers_step():
  params = toy_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = one_update(make_cfg(weight_decay=0.1, layerwise_lr_decay=0.5), params, zeros)
  for path, mult in [(("encoder", "embeddings", "word"), 0.125),
                     (("encoder", "layer_0", "mlp", "kernel"), 0.25),
                     (("encoder", "layer_1", "attention", "kernel"), 0.5),
                     (("head", "dense", "kernel"), 1.0)]:
    p, u = params, updates
    for key in path:
      p, u = p[key], u[key]
    np.testing.assert_allclose(u, -0.01 * 0.1 * mult * np.asarray(p), rtol=1e-6, err_msg=str(path))


def test_layerwise_decay_needs_encoder_layers():
  with pytest.raises(UserError, match="encoder"):
    make_optimizer(make_cfg(layerwise_lr_decay=0.9), {"head": {"kernel": jnp.ones(2)}},
                         total_steps=10, global_batch_size=32)


SCHEDULE_POINTS = {
    # total 100, warmup 20 (0 -> 1 linearly), then 80 decay steps.
    "linear": {0: 0.0, 10: 0.5, 20: 1.0, 40: 0.75, 60: 0.5, 100: 0.0, 150: 0.0},
    "cosine": {0: 0.0, 10: 0.5, 20: 1.0, 40: 0.5 * (1 + math.cos(math.pi / 4)), 60: 0.5,
               100: 0.0},
    "constant": {0: 0.0, 10: 0.5, 20: 1.0, 60: 1.0, 100: 1.0},
    # drops at 20 + 80/3 = 46.7 and 20 + 160/3 = 73.3.
    "step": {10: 0.5, 20: 1.0, 46: 1.0, 47: 0.1, 73: 0.1, 74: 0.01, 100: 0.01},
}


@pytest.mark.parametrize("kind", optim.SCHEDULES)
def test_schedule_values(kind):
  cfg = make_cfg(schedule=kind, learning_rate=1.0, warmup_fraction=0.2)
  _, schedule_fn, _ = make_optimizer(cfg, toy_params(), total_steps=100,
                                           global_batch_size=32)
  for step, want in SCHEDULE_POINTS[kind].items():
    assert float(schedule_fn(step)) == pytest.approx(want, abs=1e-6), f"{kind} at step {step}"


def test_no_warmup_starts_at_peak():
  _, schedule_fn, _ = make_optimizer(make_cfg(schedule="linear", learning_rate=2.0),
                                           toy_params(), total_steps=10, global_batch_size=32)
  assert float(schedule_fn(0)) == pytest.approx(2.0)
  assert float(schedule_fn(5)) == pytest.approx(1.0)


@pytest.mark.parametrize("scaling,want", [("none", 1e-3), ("linear", 4e-3), ("sqrt", 2e-3)])
def test_lr_scaling(scaling, want):
  cfg = make_cfg(learning_rate=1e-3, lr_scaling=scaling, base_batch_size=32)
  _, schedule_fn, lr = make_optimizer(cfg, toy_params(), total_steps=10,
                                            global_batch_size=128)
  assert lr == pytest.approx(want)
  assert float(schedule_fn(3)) == pytest.approx(want)


@pytest.mark.parametrize("key,value", [("name", "sgd"), ("schedule", "poly"),
                                       ("lr_scaling", "log")])
def test_unknown_names_list_valid_ones(key, value):
  valid = {"name": optim.OPTIMIZERS, "schedule": optim.SCHEDULES,
           "lr_scaling": optim.LR_SCALINGS}[key]
  with pytest.raises(UserError, match=", ".join(valid)):
    make_optimizer(make_cfg(**{key: value}), toy_params(), 10, 32)


@pytest.mark.parametrize("key,value", [("learning_rate", 0.0), ("warmup_fraction", 1.5),
                                       ("layerwise_lr_decay", 0.0), ("clip_norm", -1.0)])
def test_bad_numbers_raise(key, value):
  with pytest.raises(UserError, match=key):
    make_optimizer(make_cfg(**{key: value}), toy_params(), 10, 32)


def numpy_adamw(params, grads_seq, lr, wd, b1, b2, eps, clip_norm, mults):
  """torch.optim.AdamW semantics, with one param group (lr * mult) per leaf."""
  flat = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in flat.items()}
  v = {k: np.zeros_like(x) for k, x in flat.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    if clip_norm > 0:
      norm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
      g = {k: x * min(1.0, clip_norm / norm) for k, x in g.items()}
    for k in flat:
      step_lr = lr * mults[k]
      if not k.endswith("bias"):
        flat[k] = flat[k] - step_lr * wd * flat[k]
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      flat[k] = flat[k] - step_lr * m_hat / (np.sqrt(v_hat) + eps)
  return flat


def run_adamw(clip_norm, layer_decay):
  rng = np.random.default_rng(3)
  params = {
      "encoder": {"embeddings": {"word": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
                  "layer_0": {"dense": {"kernel": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),
                                        "bias": jnp.asarray(rng.normal(size=2), jnp.float32)}}},
      "head": {"kernel": jnp.asarray(rng.normal(size=(2, 1)), jnp.float32)},
  }
  # Gradients of very different sizes so clipping changes their relative weight across steps.
  grads_seq = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32),
                            params) for scale in (5.0, 0.3, 2.0)]
  cfg = make_cfg(learning_rate=0.05, weight_decay=0.1, b1=0.8, b2=0.95, eps=1e-6,
                 clip_norm=clip_norm, layerwise_lr_decay=layer_decay)
  tx, _, _ = make_optimizer(cfg, params, total_steps=3, global_batch_size=32)
  state, got = tx.init(params), params
  update = jax.jit(tx.update)
  for grads in grads_seq:
    updates, state = update(grads, state, got)
    got = optax.apply_updates(got, updates)

  def flatten(tree):
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}

  mults = {"encoder/embeddings/word": layer_decay**2, "encoder/layer_0/dense/kernel": layer_decay,
           "encoder/layer_0/dense/bias": layer_decay, "head/kernel": 1.0}
  want = numpy_adamw(flatten(params), [flatten(g) for g in grads_seq], lr=0.05, wd=0.1,
                     b1=0.8, b2=0.95, eps=1e-6, clip_norm=clip_norm, mults=mults)
  return flatten(got), want


@pytest.mark.parametrize("clip_norm,layer_decay", [(0.0, 1.0), (1.0, 1.0), (1.0, 0.7)])
def test_adamw_matches_numpy_reference(clip_norm, layer_decay):
  got, want = run_adamw(clip_norm, layer_decay)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)


def test_clipping_changes_the_result():
  # Guards the reference test above: without this, a no-op clip would pass it trivially.
  clipped, _ = run_adamw(1.0, 1.0)
  unclipped, _ = run_adamw(0.0, 1.0)
  assert max(float(np.max(np.abs(clipped[k] - unclipped[k]))) for k in clipped) > 1e-3


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_reduces_a_quadratic(name):
  params = toy_params(seed=1)
  target = toy_params(seed=2)

  def loss_fn(p):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

  cfg = make_cfg(name=name, learning_rate=0.05, weight_decay=0.01, schedule="linear",
                 warmup_fraction=0.1, layerwise_lr_decay=0.9, clip_norm=1.0)
  tx, _, _ = make_optimizer(cfg, params, total_steps=200, global_batch_size=32)

  @jax.jit
  def step(p, state):
    grads = jax.grad(loss_fn)(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  state, start = tx.init(params), float(loss_fn(params))
  for _ in range(200):
    params, state = step(params, state)
  assert float(loss_fn(params)) < 1e-2 * start


def test_lamb_trust_ratio_scales_the_matrices_and_not_biases_or_layer_norms():
  """LAMB's layer adaptation (||param|| / ||update||) applies to kernels and embeddings only; biases and
  LayerNorm parameters take AdamW's step, as in the LAMB paper and TF Model Garden."""
  params = toy_params()
  grads = jax.tree.map(lambda p: 0.5 * p + 0.1, params)
  lamb, _, _ = make_optimizer(make_cfg(name="lamb"), params, total_steps=10, global_batch_size=32)
  adam, _, _ = make_optimizer(make_cfg(name="adamw"), params, total_steps=10, global_batch_size=32)
  lamb_up, _ = lamb.update(grads, lamb.init(params), params)
  adam_up, _ = adam.update(grads, adam.init(params), params)
  masks = optim.decay_mask(params)
  checked = {True: 0, False: 0}

  def check(path, lu, au, p, decays):
    if decays:  # trust ratio: the update's norm becomes lr * ||param||
      np.testing.assert_allclose(float(jnp.linalg.norm(lu)), 1e-2 * float(jnp.linalg.norm(p)), rtol=1e-5)
      assert not np.allclose(lu, au)
    else:
      np.testing.assert_allclose(lu, au, rtol=1e-6)
    checked[bool(decays)] += 1

  jax.tree_util.tree_map_with_path(check, lamb_up, adam_up, params, masks)
  assert checked[True] >= 2 and checked[False] >= 4


@pytest.mark.parametrize("scaling, batch, want", [
    ("auto", 32, {}),
    # 32x: LAMB at 14.14 x the sqrt-scaled rate; b2 = 1 - 32 * 0.001 = 0.968 floored at 1 - 1/50
    ("auto", 1024, {"learning_rate": (2e-5, 2e-5 * 32 ** 0.5 * 14.14), "name": ("adamw", "lamb"), "b2": (0.999, 0.98)}),
    # 8x: still AdamW (the switch is above 8x); b2 = 1 - 8 * 0.001
    ("auto", 256, {"learning_rate": (2e-5, 2e-5 * 8 ** 0.5), "b2": (0.999, 0.992)}),
    ("auto", 128, {"learning_rate": (2e-5, 4e-5), "b2": (0.999, 0.996)}),
    ("auto", 8, {"learning_rate": (2e-5, 1e-5)}),  # smaller batch: the rate only, b2 kept
    ("sqrt", 128, {"learning_rate": (2e-5, 4e-5)}),
    ("linear", 128, {"learning_rate": (2e-5, 8e-5)}), ("none", 1024, {})])
def test_batch_size_scaling_records_what_it_changed(scaling, batch, want):
  """The plan's learning rate (and what else the rule changes) for a batch that differs from the recipe's,
  against hand-computed values; `derived` says what changed, for the start line and config.json."""
  plan = optim.plan_optimizer(make_cfg(learning_rate=2e-5, lr_scaling=scaling, base_batch_size=32), 100, batch)
  assert set(plan.derived) == set(want)
  for key, (old, new) in want.items():
    if key == "name":
      assert plan.derived[key] == (old, new) and plan.name == new
      continue
    assert plan.derived[key] == pytest.approx((old, new))
    assert plan.hparams[key] == pytest.approx(new)
  if "name" not in want:
    assert plan.name == "adamw"
  if not want:
    assert plan.hparams["learning_rate"] == 2e-5


def test_base_batch_size_below_one_is_refused():
  with pytest.raises(UserError, match=r"optimizer.base_batch_size=0.0 is outside \[1.0, inf\]"):
    optim.plan_optimizer(make_cfg(base_batch_size=0), 100, 32)


@pytest.mark.parametrize("name, want", [("lamb", {"learning_rate": (1e-3, 1e-3 * 32 ** 0.5), "b2": (0.999, 0.98)}),
                                        ("rmsprop", {"learning_rate": (1e-3, 1e-3 * 32 ** 0.5)}),
                                        ("adamw", {"learning_rate": (1e-3, 1e-3 * 32 ** 0.5 * 14.14),
                                                   "name": ("adamw", "lamb"), "b2": (0.95, 0.95)})])
def test_batch_rule_by_recipe_optimizer(name, want):
  """A LAMB recipe keeps LAMB and its rate scale; b2 only for Adam moments; a recipe b2 below the floor is kept."""
  b2 = want["b2"][0] if "b2" in want else 0.999
  got = optim.batch_rule({"name": name, "learning_rate": 1e-3, "b1": 0.9, "b2": b2, "eps": 1e-8,
                          "warmup_fraction": 0.1}, 32.0)
  want = {k: v[1] for k, v in want.items() if v[0] != v[1]}
  assert set(got) == set(want)
  for key, value in want.items():
    assert got[key] == (value if key == "name" else pytest.approx(value))


@pytest.mark.parametrize("steps, examples, batch, base, max_steps_set, want", [
    # STS-B at batch 1024 for 3 epochs: 18 steps of 17,247 examples; 17,247 / 50 = 345 -> 320 (a multiple of 32)
    (18, 17247, 1024, 32, False, "use batch 320 or less, or more epochs"),
    (27, 26526, 1024, 32, False, "use batch 512 or less, or more epochs"),  # SNLI: 26,526 / 50 = 530.5 -> 512
    (49, 1600, 64, 32, False, "use batch 32 or less, or more epochs"),  # 1,600 / 50 = 32: exactly the recipe's
    (49, 1599, 64, 32, False, "train more epochs"),  # 31.98: no batch of at least the recipe's gives 50 steps
    (18, 17247, 1024, 24.5, False, "use batch 343 or less, or more epochs"),  # 345 / 24.5 = 14.08 -> 14 x 24.5
    (3, 17247, 1024, 32, True, "raise train.max_steps to 50"),  # the step count was chosen: the batch is not it
    (50, 1600, 1024, 32, False, ""),  # enough steps
    (66, 67349, 1024, 32, False, ""),  # SST-2, 1 epoch
    (10, 320, 32, 32, False, ""),  # the recipe's own batch
])
def test_short_run_advice(steps, examples, batch, base, max_steps_set, want):
  """A batch larger than the recipe's that leaves fewer than SHORT_RUN_STEPS steps says so, with a batch (a
  multiple of the recipe's) that gives its examples that many steps, or what else would."""
  got = optim.short_run_advice(steps, examples, batch, base, max_steps_set)
  if not want:
    assert got == ""
    return
  assert got.startswith(f"short run: {steps} steps at batch {batch} (the recipe's batch is {base:g})")
  assert got.endswith(f"for {optim.SHORT_RUN_STEPS}+ steps {want}")
