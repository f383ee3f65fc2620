"""Optimizers: optax chains, LR schedules and scaling, weight-decay mask, layer-wise LR decay.

Every optimizer is one `optax.chain`, so the whole update stays a single jitted function:

  clip_by_global_norm(clip_norm)        # skipped when clip_norm == 0
  -> direction (adam / rms / factored rms moments)
  -> + weight_decay * param             # decoupled, masked: no biases, no LayerNorm params
  -> trust ratio                        # lamb only; not on biases and LayerNorm params (decay_mask)
  -> * -schedule_fn(step)
  -> * layer-wise multiplier            # skipped when layerwise_lr_decay == 1

Because the decay term is added before the learning rate, it is scaled by the same per-layer
learning rate as the gradient step, like torch.optim.AdamW with one param group per layer.

`make_injected_optimizer` is the same chain with some hyperparameters (learning rate, warmup,
weight decay, eps, b1, b2, clip norm) stored as arrays in the state, so trials that differ only
in them train as one vmapped step (`bertjax.trial_group`).
"""

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bertjax.errors import UserError

OPTIMIZERS = ("adamw", "lamb", "rmsprop", "adafactor")
SCHEDULES = ("linear", "cosine", "constant", "step")
LR_SCALINGS = ("auto", "none", "linear", "sqrt")

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]

_LAYER_KEY = re.compile(r"layer_(\d+)")


def _key_name(entry: Any) -> str:
  """The string name of one tree-path entry (dict key, attribute or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _get(cfg: ml_collections.ConfigDict, key: str) -> Any:
  if key not in cfg:
    raise UserError(f"optimizer config is missing key '{key}'")
  return cfg[key]


def _choice(cfg: ml_collections.ConfigDict, key: str, valid: tuple[str, ...]) -> str:
  value = str(_get(cfg, key)).lower()
  if value not in valid:
    raise UserError(
        f"optimizer.{key}={_get(cfg, key)!r} is unknown; valid: {', '.join(valid)}"
    )
  return value


def _number(cfg: ml_collections.ConfigDict, key: str, low: float, high: float = math.inf,
            low_open: bool = False) -> float:
  """Reads cfg[key] as a float in [low, high] (or (low, high] when low_open)."""
  value = _get(cfg, key)
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise UserError(f"optimizer.{key}={value!r} is not a number") from None
  too_low = value <= low if low_open else value < low
  if too_low or value > high or math.isnan(value):
    bracket = "(" if low_open else "["
    raise UserError(f"optimizer.{key}={value} is outside {bracket}{low}, {high}]")
  return value


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: every leaf except biases and LayerNorm params.

  A leaf is a bias when its own key is `bias`; it is a LayerNorm param when any key on its
  path contains `norm` (e.g. `attention_norm/scale`, `LayerNorm_0/bias`).
  """

  def wants_decay(path, _):
    names = [_key_name(p) for p in path]
    if names and names[-1] == "bias":
      return False
    return not any("norm" in n.lower() for n in names)

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def layer_depths(params: Any) -> tuple[Any, int]:
  """Depth of each leaf and the number n of encoder layers.

  `encoder/embeddings/...` and `encoder/relative/...` (DeBERTa's relative position embeddings, an input to
  every layer like the absolute ones) are depth 0, `encoder/layer_k/...` is k+1; everything else (the head, a
  pooler or ModernBERT's `encoder/final_norm` above the last layer) is n+1.
  """
  if not hasattr(params, "keys"):
    raise UserError("layer-wise LR decay needs a params dict with an 'encoder' entry")
  encoder = params.get("encoder")
  if encoder is None or not hasattr(encoder, "keys"):
    raise UserError(
        f"layer-wise LR decay needs params['encoder'] with layer_* entries; got top-level "
        f"keys {sorted(params.keys())}"
    )
  layer_ids = [int(m.group(1)) for k in encoder.keys() if (m := _LAYER_KEY.fullmatch(k))]
  n = len(layer_ids)
  if n == 0 or sorted(layer_ids) != list(range(n)):
    raise UserError(
        f"layer-wise LR decay needs params['encoder'] to hold layer_0..layer_{{n-1}}; got "
        f"keys {sorted(encoder.keys())}"
    )

  def depth(path, _):
    names = [_key_name(p) for p in path]
    if len(names) >= 2 and names[0] == "encoder":
      if names[1] in ("embeddings", "relative"):
        return 0
      if m := _LAYER_KEY.fullmatch(names[1]):
        return int(m.group(1)) + 1
    return n + 1

  return jax.tree_util.tree_map_with_path(depth, params), n


def layerwise_multipliers(params: Any, decay: float) -> Any:
  """LR multiplier per leaf: decay ** (n + 1 - depth), so 1 for the head."""
  depths, n = layer_depths(params)
  return jax.tree.map(lambda d: float(decay ** (n + 1 - d)), depths)


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update leaf by the matching constant in `multipliers` (stateless)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _at_least_one(x):
  """max(x, 1) for a python number, or its traced equivalent for a jax scalar."""
  return max(x, 1) if isinstance(x, (int, float)) else jnp.maximum(x, 1.0)


def make_schedule(kind: str, peak_lr: float | jax.Array, total_steps: int,
                  warmup_steps: int | jax.Array) -> Schedule:
  """Learning rate at a step: linear warmup 0 -> peak_lr over `warmup_steps`, then

  - linear:   linear decay from peak_lr to 0 at `total_steps`;
  - cosine:   half-cosine decay from peak_lr to 0 at `total_steps`;
  - constant: peak_lr;
  - step:     peak_lr, x0.1 once 1/3 and again once 2/3 of the post-warmup steps have passed.

  The first update (step 0) uses lr 0 when warmup_steps > 0, as in Hugging Face's warmup
  schedules. Steps past `total_steps` stay at the end value.
  """
  if kind not in SCHEDULES:
    raise UserError(f"optimizer.schedule={kind!r} is unknown; valid: {', '.join(SCHEDULES)}")
  decay_steps = _at_least_one(total_steps - warmup_steps)

  def schedule(step: jax.typing.ArrayLike) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * step / _at_least_one(warmup_steps)
    frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if kind == "linear":
      body = peak_lr * (1.0 - frac)
    elif kind == "cosine":
      body = peak_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif kind == "constant":
      body = jnp.full_like(frac, peak_lr)
    else:
      drops = (frac >= 1 / 3).astype(jnp.float32) + (frac >= 2 / 3).astype(jnp.float32)
      body = peak_lr * 0.1**drops
    return jnp.where(step < warmup_steps, warm, body)

  return schedule


# optimizer.lr_scaling=auto (`batch_rule`). Measured on MiniLM/SST-2 (docs/large_batch.md).
LAMB_FROM_RATIO = 8.0  # AdamW recipes switch to LAMB above this many times their batch (batch > 256 for 32)
LAMB_LR_PER_ADAM_LR = 14.14  # LAMB's peak LR over AdamW's sqrt-scaled one (4e-3 at batch 1024 for 5e-5 at 32)
MIN_B2_STEPS = 50.0  # Adam's second moment averages over at least this many steps: b2 <= 1 - 1/50
# At 32x the recipe's batch, runs of 18-27 steps lost 4.5-7.5 points to it and no learning rate made up for the
# steps; STS-B given 54 steps came within 1.0 point, SNLI given 81 still 3.8 (docs/large_batch.md, "Short runs").
SHORT_RUN_STEPS = 50


def batch_rule(recipe: dict, ratio: float) -> dict:
  """`optimizer.lr_scaling=auto`: the recipe's values that change when the batch is `ratio` times the batch it
  was tuned for (keys of `recipe`: name, learning_rate, b1, b2, eps, warmup_fraction).

  - learning rate x sqrt(ratio): with the same examples, Adam's step-size noise stays the same (the square-root
    rule of Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms");
  - above LAMB_FROM_RATIO, an AdamW recipe becomes LAMB (trust ratio on the matrices only) at
    LAMB_LR_PER_ADAM_LR times that rate: LAMB's step is relative to each matrix's norm, so its rate is on
    another scale, and per-layer normalisation is what keeps the few, large steps stable;
  - b2 so that the second moment averages over the recipe's number of examples, 1 - ratio * (1 - b2), but
    never over fewer than MIN_B2_STEPS steps (and never above the recipe's b2);
  - warmup is a share of the examples already (optimizer.warmup_fraction), so it needs no change.
  The measurements behind each choice are in docs/large_batch.md."""
  if ratio == 1:
    return {}
  changes = {"learning_rate": recipe["learning_rate"] * math.sqrt(ratio)}
  if ratio > LAMB_FROM_RATIO and recipe["name"] == "adamw":
    changes["name"] = "lamb"
    changes["learning_rate"] *= LAMB_LR_PER_ADAM_LR
  if ratio > 1 and recipe["name"] in ("adamw", "lamb"):
    b2 = min(recipe["b2"], max(1.0 - ratio * (1.0 - recipe["b2"]), 1.0 - 1.0 / MIN_B2_STEPS))
    if b2 != recipe["b2"]:
      changes["b2"] = b2
  return changes


def short_run_advice(total_steps: int, examples: float, global_batch_size: int, base_batch_size: float,
                     max_steps_set: bool) -> str:
  """A start line when a batch larger than the recipe's leaves fewer than SHORT_RUN_STEPS steps, naming a batch
  (a multiple of the recipe's) that trains the run's `examples` in at least that many; else ""."""
  if global_batch_size <= base_batch_size or total_steps >= SHORT_RUN_STEPS:
    return ""
  multiples = math.floor(examples / SHORT_RUN_STEPS / base_batch_size)
  if max_steps_set:
    instead = f"raise train.max_steps to {SHORT_RUN_STEPS}"
  elif multiples >= 1:
    instead = f"use batch {multiples * base_batch_size:g} or less, or more epochs"
  else:
    instead = "train more epochs"
  return (f"short run: {total_steps} steps at batch {global_batch_size} (the recipe's batch is "
          f"{base_batch_size:g}): at 32x the recipe's batch, runs of 18-27 steps lost 4.5-7.5 points to it "
          f"(docs/large_batch.md); for {SHORT_RUN_STEPS}+ steps {instead}")


def scaled_hparams(recipe: dict, scaling: str, global_batch_size: int, base_batch_size: int) -> dict:
  """The recipe's values that `scaling` changes at this batch: the learning rate times global/base (`linear`)
  or sqrt(global/base) (`sqrt`), `batch_rule` (`auto`), nothing (`none`)."""
  ratio = global_batch_size / base_batch_size
  if scaling == "none" or ratio == 1:
    return {}
  if scaling == "auto":
    return batch_rule(recipe, ratio)
  return {"learning_rate": recipe["learning_rate"] * (ratio if scaling == "linear" else math.sqrt(ratio))}


def _direction(name: str, b1: float, b2: float, eps: float) -> list[optax.GradientTransformation]:
  """The optimizer's preconditioned gradient, before weight decay and learning rate.

  adamw/lamb: Adam moments (b1, b2, eps outside the sqrt, bias-corrected).
  rmsprop: RMS of gradients with decay b2, bias-corrected (otherwise the first steps are
    ~1/sqrt(1-b2) times too large), eps outside the sqrt as in PyTorch; no momentum, b1 unused.
  adafactor: factored second moments with optax's defaults (decay 0.8, eps 1e-30) and update
    clipping at block RMS 1; b1, b2, eps unused, and no scaling by parameter norm, so the
    learning rate is an absolute step size like the other optimizers.
  """
  if name in ("adamw", "lamb"):
    return [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
  if name == "rmsprop":
    return [optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True)]
  return [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)]


HPARAMS = ("learning_rate", "warmup_steps", "weight_decay", "eps", "b1", "b2", "clip_norm")


@dataclasses.dataclass(frozen=True)
class OptimizerPlan:
  """A validated `optimizer` config: its structure, and the numbers (`hparams`, keys HPARAMS) that
  trials of one group may vary. `learning_rate`, `b1`, `b2` and `eps` are after batch-size scaling
  (`scaled_hparams`) and `warmup_steps` = round(warmup_fraction * total_steps), i.e. the same share of the
  examples at any batch size."""
  name: str
  schedule: str
  layer_decay: float
  total_steps: int
  hparams: dict
  derived: dict  # what optimizer.lr_scaling changed for the batch: key -> (recipe's value, value used)


def plan_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, global_batch_size: int) -> OptimizerPlan:
  """Reads and checks the `optimizer` config group."""
  name = _choice(cfg, "name", OPTIMIZERS)
  kind = _choice(cfg, "schedule", SCHEDULES)
  scaling = _choice(cfg, "lr_scaling", LR_SCALINGS)
  recipe = {"name": name, "learning_rate": _number(cfg, "learning_rate", 0.0, low_open=True),
            "b1": _number(cfg, "b1", 0.0, 1.0), "b2": _number(cfg, "b2", 0.0, 1.0), "eps": _number(cfg, "eps", 0.0),
            "warmup_fraction": _number(cfg, "warmup_fraction", 0.0, 1.0)}
  layer_decay = _number(cfg, "layerwise_lr_decay", 0.0, 1.0, low_open=True)
  if int(total_steps) < 1:
    raise UserError(f"total training steps must be >= 1, got {total_steps}")
  base_batch_size = _number(cfg, "base_batch_size", 1.0)  # the batch the recipe's learning rate was tuned for
  changes = scaled_hparams(recipe, scaling, global_batch_size, base_batch_size)
  used = {**recipe, **changes}
  hparams = {"learning_rate": used["learning_rate"], "weight_decay": _number(cfg, "weight_decay", 0.0),
             "eps": used["eps"], "b1": used["b1"], "b2": used["b2"], "clip_norm": _number(cfg, "clip_norm", 0.0),
             "warmup_steps": int(round(used["warmup_fraction"] * total_steps))}
  derived = {key: (recipe[key], value) for key, value in changes.items()}
  return OptimizerPlan(used["name"], kind, layer_decay, int(total_steps), hparams, derived)


def _is_const(x) -> bool:
  return isinstance(x, (int, float))


def clip_by_global_norm(max_norm: float | jax.Array) -> optax.GradientTransformation:
  """Scale all updates by min(1, max_norm / global norm); a traced max_norm <= 0 passes them through.

  The same result as `optax.clip_by_global_norm` up to rounding, written as one multiply by a scalar
  factor: XLA then fuses the scaling into the Adam moment updates that read it, instead of
  materialising a clipped copy of every gradient (optax's select of a division is not duplicated
  into two consumers). On CPU that made the MiniLM optimizer update about 30% faster."""
  if _is_const(max_norm) and max_norm <= 0:
    raise ValueError(f"clip_by_global_norm needs max_norm > 0, got {max_norm} (leave the step out instead)")

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    if not _is_const(max_norm):
      factor = jnp.where(max_norm > 0, factor, 1.0)
    return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def build_optimizer(plan: OptimizerPlan, hparams: dict, params: Any) -> tuple[optax.GradientTransformation, Schedule]:
  """The chain and schedule for `hparams`: python numbers are constants (a zero clip_norm or
  weight_decay drops its step, as in a single run); jax scalars are traced, and then the step is
  kept and switched inside, so every trial of a group has the same state structure."""
  hp = hparams
  schedule_fn = make_schedule(plan.schedule, hp["learning_rate"], plan.total_steps, hp["warmup_steps"])
  chain = []
  if not _is_const(hp["clip_norm"]) or hp["clip_norm"] > 0:
    chain.append(clip_by_global_norm(hp["clip_norm"]))
  chain += _direction(plan.name, hp["b1"], hp["b2"], hp["eps"])
  if not _is_const(hp["weight_decay"]) or hp["weight_decay"] > 0:
    chain.append(optax.add_decayed_weights(hp["weight_decay"], mask=decay_mask))
  if plan.name == "lamb":  # layer adaptation of the matrices only, as the LAMB paper and TF Model Garden do
    chain.append(optax.masked(optax.scale_by_trust_ratio(), decay_mask))
  chain.append(optax.scale_by_learning_rate(schedule_fn))
  if plan.layer_decay != 1.0:
    chain.append(scale_by_tree(layerwise_multipliers(params, plan.layer_decay)))
  return optax.chain(*chain), schedule_fn


class InjectedState(NamedTuple):
  """Optimizer state with per-trial hyperparameters: `hparams` (float32 scalars) and the chain's
  state `inner`, whose leaves are those of the single-run optimizer's state, in the same order."""
  hparams: dict
  inner: Any


def make_injected_optimizer(plan: OptimizerPlan, varying: tuple[str, ...], params: Any) -> optax.GradientTransformation:
  """The optimizer of one trial of a group: the hyperparameters named in `varying` live in the
  state, so one `update` (under jax.vmap over stacked states) serves trials that differ in them;
  the others stay python constants (equal in every trial), as in a single run. Injected values are
  float32: for b1 and b2 that rounds optax's `1 - b` a little differently from the constant (~1e-7)."""
  unknown = set(varying) - set(HPARAMS)
  if unknown:
    raise ValueError(f"not an injectable hyperparameter: {sorted(unknown)}")

  def build(state_hparams):
    return build_optimizer(plan, {**plan.hparams, **state_hparams}, params)

  def init_fn(p):
    hparams = {k: jnp.asarray(plan.hparams[k], jnp.float32) for k in varying}
    return InjectedState(hparams, build(hparams)[0].init(p))

  def update_fn(updates, state, p=None):
    updates, inner = build(state.hparams)[0].update(updates, state.inner, p)
    return updates, InjectedState(state.hparams, inner)

  return optax.GradientTransformation(init_fn, update_fn)


def injected_schedule(plan: OptimizerPlan, state: InjectedState) -> Schedule:
  """The learning-rate schedule of the trial whose optimizer state is `state`."""
  hp = {**plan.hparams, **state.hparams}
  return make_schedule(plan.schedule, hp["learning_rate"], plan.total_steps, hp["warmup_steps"])
