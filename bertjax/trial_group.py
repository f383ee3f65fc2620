"""Many trials in one program: configs that differ only in numbers that change no shape train as
one vmapped, jitted step over stacked params and optimizer states, on the same batches.

  summaries = train_group(configs, workdirs)      # one summary dict per trial, in order

Trials may differ in the keys of SHAPE_FREE, and in train.seed when data.shuffle_seed >= 0: the
batch order then comes from data.shuffle_seed, and train.seed only sets the head's random init and
the dropout keys. With data.shuffle_seed = -1 (the default) the batch order comes from train.seed,
so trials with different seeds would see different batches and cannot share a group: train.seed
is then part of `group_key`.

The hyperparameters that differ live in each trial's optimizer state (`optim.make_injected_optimizer`);
those equal in every trial stay constants, so such a trial computes what it would alone.

Each trial's workdir ends as an ordinary run of `trainer.train_and_evaluate` leaves it (config.json,
labels.json, model/, checkpoints of the latest and the best step, metrics.jsonl, TensorBoard,
summary.json, curves.png), and can later be resumed or extended alone: `TrialGroup` is the stacked
implementation of the `runs.Runs` that `trainer.train` loops over. The stacked state is also checkpointed,
first and synchronously at each save, in the group workdir (default: `.group-<hash>` next to the first
trial's workdir); a rerun resumes from it, after first writing the checkpoint of any trial whose own save
was cut short.
Once the group has finished, the group workdir only serves a rerun (which changes nothing).
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bertjax import checkpoint as ckpt_lib
from bertjax import optim, resume, run_summary, sharding
from bertjax import step as step_lib
from bertjax.config_base import flatten
from bertjax.errors import UserError, WriteFailed, first_line
from bertjax.loop_state import LoopState, restore_run, resumed_line, save_run
from bertjax.models import hf_weights
from bertjax.run_log import log
from bertjax.step import TrainState, make_train_step, new_train_state
from bertjax.trainer import Trainer, train

SHAPE_FREE = ("optimizer.learning_rate", "optimizer.weight_decay", "optimizer.eps", "optimizer.b1",
              "optimizer.b2", "optimizer.warmup_fraction", "optimizer.clip_norm")


def free_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config keys in which the trials of one group may differ."""
  seed_free = config.data.get("shuffle_seed", -1) >= 0
  return SHAPE_FREE + (("train.seed",) if seed_free else ())


def group_key(config: ml_collections.ConfigDict) -> str:
  """Equal for configs that can train in one group: everything but `free_keys` is equal."""
  snapshot = resume.config_snapshot(config)
  for key in free_keys(config):
    group, name = key.split(".")
    snapshot.get(group, {}).pop(name, None)
  return json.dumps(snapshot, sort_keys=True)


def default_group_dir(workdirs: list[str]) -> Path:
  """`.group-<hash of the trial workdirs>` next to the first trial's workdir."""
  paths = [str(Path(w).resolve()) for w in workdirs]
  digest = hashlib.sha1("\n".join(paths).encode()).hexdigest()[:12]
  return Path(paths[0]).parent / f".group-{digest}"


def _stack(trees: list):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


class TrialGroup:
  """The trials' TrainStates stacked on a leading axis and advanced by one vmapped step: what `trainer.train`
  trains for a group. Each trial is sharded as its run alone; its own checkpoints hold its state as that run's."""

  def __init__(self, configs: list[ml_collections.ConfigDict], workdirs: list[str],
               group_workdir: str | None = None):
    if not configs or len(configs) != len(workdirs):
      raise UserError(f"a trial group needs one workdir per config, got {len(configs)} configs "
                      f"and {len(workdirs)} workdirs")
    if len({str(Path(w).resolve()) for w in workdirs}) != len(workdirs):
      raise UserError(f"the trials of a group need distinct workdirs: {workdirs}")
    first = flatten(json.loads(group_key(configs[0])))
    for i, c in enumerate(configs[1:], 1):
      other = flatten(json.loads(group_key(c)))
      differ = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
      if differ:
        raise UserError(f"trial {i} ({workdirs[i]}) cannot share a group with trial 0: they differ in "
                        f"{', '.join(differ)} (only {', '.join(free_keys(configs[0]))} may differ)")
    self.group_dir = Path(group_workdir) if group_workdir else default_group_dir(workdirs)
    if not ckpt_lib.steps_on_disk(self.group_dir / "checkpoints"):  # then it starts from the trials' own checkpoints
      latest = {w: max(ckpt_lib.steps_on_disk(Path(w) / "checkpoints"), default=None) for w in workdirs}
      if len(set(latest.values())) > 1:
        raise UserError(f"the trials' latest checkpoints are at different steps ({latest}) and the group "
                        f"workdir {self.group_dir} has none: resume them alone (bertjax.train) or in their "
                        "first group")
    with hf_weights.reads_shared():  # the checkpoint read once for all trials
      self.lead = Trainer(configs[0], workdirs[0], cache_dir=self.group_dir / "cache")
      self.trainers = [self.lead] + [Trainer(c, w, inputs=self.lead.inputs)
                                     for c, w in zip(configs[1:], workdirs[1:])]
    self.labels = [f"[trial {k}] " for k in range(len(self.trainers))]
    hparams = [t.opt_plan.hparams for t in self.trainers]
    self.varying = tuple(k for k in optim.HPARAMS if len({h[k] for h in hparams}) > 1)
    self._check_manifest()
    self.group_ckpt: ckpt_lib.Checkpoints | None = None
    self._define_state()

  # ----- the stacked state ----------------------------------------------------------------

  def _define_state(self) -> None:
    """The trials' optimizers (their differing hyperparameters in their states), and the stacked state's shapes
    and shardings."""
    self._txs = [optim.make_injected_optimizer(t.opt_plan, self.varying, t.loaded.params) for t in self.trainers]
    self._single_defs = []  # a trial's own checkpoint holds its optimizer state as its run alone has it
    for t, tx in zip(self.trainers, self._txs):
      single, inner = jax.eval_shape(t.tx.init, t.loaded.params), jax.eval_shape(tx.init, t.loaded.params).inner
      if [(x.shape, x.dtype) for x in jax.tree.leaves(single)] != [(x.shape, x.dtype) for x in jax.tree.leaves(inner)]:
        raise AssertionError("the injected optimizer's state does not match the single-run one")
      self._single_defs.append(jax.tree.structure(single))
    self._inner_def = jax.tree.structure(inner)
    self._hparams = {k: np.asarray([t.opt_plan.hparams[k] for t in self.trainers], np.float32) for k in self.varying}
    one = jax.eval_shape(lambda p: new_train_state(p, self._txs[0], 0), self.lead.loaded.params)
    mesh, fsdp = self.lead.mesh, self.lead.mesh.shape["fsdp"]
    spec = lambda x: sharding.param_spec(tuple(x.shape), fsdp)  # each trial sharded as a single run
    self.state_shardings = jax.tree.map(lambda x: NamedSharding(mesh, P(None, *spec(x))), one)
    self.trial_shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), one)
    self.param_shardings = self.trial_shardings.params
    stacked = lambda x, s: jax.ShapeDtypeStruct((len(self.trainers),) + x.shape, x.dtype, sharding=s)
    self.abstract = jax.tree.map(stacked, one, self.state_shardings)
    take = lambda tree, k: jax.tree.map(lambda x: x[k], tree)
    self._take = jax.jit(take, out_shardings=self.trial_shardings)
    self._take_params = jax.jit(take, out_shardings=self.param_shardings)

  def _fresh_state(self) -> TrainState:
    states = [new_train_state(t.loaded.params, tx, t.config.train.seed) for t, tx in zip(self.trainers, self._txs)]
    return jax.device_put(_stack(states), self.state_shardings)

  def _trial_state(self, state: TrainState, k: int) -> TrainState:
    """Trial k's state as its run alone has it."""
    one = self._take(state, k)
    return one.replace(opt_state=jax.tree.unflatten(self._single_defs[k], jax.tree.leaves(one.opt_state.inner)))

  def params(self, state: TrainState, k: int) -> dict:
    return self._take_params(state.params, k)

  def split(self, metrics: dict) -> list[dict]:
    return [{name: v[k] for name, v in metrics.items()} for k in range(len(self.trainers))]

  def jit_train_step(self):
    lead, plan, tx = self.lead, self.lead.opt_plan, self._txs[0]

    def one_trial(state: TrainState, batch):
      schedule = optim.injected_schedule(plan, state.opt_state)
      return make_train_step(lead.model, tx, schedule, lead.regression, lead.grad_accum_steps,
                             lead.config.train.skip_nonfinite_steps, lead.class_weights)(state, batch)

    return step_lib.jit_train_step(jax.vmap(one_trial, in_axes=(0, None)), self.state_shardings, lead.mesh)

  # ----- the group checkpoint -------------------------------------------------------------

  def _manifest(self) -> dict:
    """What a rerun must match to resume the stacked state: the trials, and what varies between them."""
    return {"workdirs": [str(t.workdir.resolve()) for t in self.trainers], "varying": list(self.varying)}

  def _check_manifest(self) -> None:
    path = self.group_dir / "group.json"
    if ckpt_lib.steps_on_disk(self.group_dir / "checkpoints") and path.exists():
      saved, now = json.loads(path.read_text()), self._manifest()
      for key in ("workdirs", "varying"):
        if saved[key] != now[key]:
          raise UserError(f"{path}: this group was started with {key} {saved[key]}, not {now[key]}; "
                          "use the same trials or a new group workdir")

  def start(self, checkpoints: list[ckpt_lib.Checkpoints]):
    """The stacked state from the group's latest checkpoint (first writing the checkpoint of any trial whose own
    save was cut short), else from the trials' own checkpoints, else fresh."""
    self.group_ckpt = ckpt_lib.Checkpoints(str(self.group_dir / "checkpoints"), keep_best=False, async_save=False,
                                           is_primary=self.lead.is_primary, sync_name="group")
    latest = self.group_ckpt.latest_step()
    if latest is None:
      if self.lead.is_primary:
        self.group_dir.mkdir(parents=True, exist_ok=True)
        (self.group_dir / "group.json").write_text(json.dumps(self._manifest(), indent=2) + "\n")
      return self._stack_trial_checkpoints(checkpoints) or (self._fresh_state(), None)
    state, meta = self.group_ckpt.restore(latest, self.abstract)
    # Like a resumed single run, the trials go on with their configs' (possibly changed) hyperparameters.
    hparams = jax.device_put(self._hparams, self.state_shardings.opt_state.hparams)
    state = state.replace(opt_state=state.opt_state._replace(hparams=hparams))
    loop = LoopState.from_meta(meta, latest)
    log("the group " + resumed_line(f"{self.group_dir}/checkpoints/{latest}", loop, self.lead))
    for k in loop.training():
      if (checkpoints[k].latest_step() or -1) < latest:
        save_run(checkpoints[k], self._trial_state(state, k), loop.of_run(k))
    return state, loop

  def _stack_trial_checkpoints(self, checkpoints: list[ckpt_lib.Checkpoints]):
    """The group's state from the trials' own checkpoints, all of the same step (None if they have none):
    a group regrouped, or whose group workdir was deleted, goes on from where its trials are."""
    restored = [restore_run(c, t, label)
                for c, t, label in zip(checkpoints, self.trainers, self.labels)]
    if restored[0] is None:
      return None
    positions = {(loop.epoch, loop.step_in_epoch) for _, loop in restored}
    if len(positions) > 1:
      raise UserError(f"the trials' latest checkpoints are at different data positions {sorted(positions)}")
    inner = lambda s: jax.tree.unflatten(self._inner_def, jax.tree.leaves(s.opt_state))
    states = [s.replace(opt_state=optim.InjectedState({k: v[i] for k, v in self._hparams.items()}, inner(s)))
              for i, (s, _) in enumerate(restored)]
    loop = dataclasses.replace(restored[0][1], runs=[loop.runs[0] for _, loop in restored])
    return jax.device_put(_stack(states), self.state_shardings), loop

  def save(self, state: TrainState, loop: LoopState, checkpoints: list[ckpt_lib.Checkpoints], which: list[int]):
    """The stacked state first (synchronously, so a trial's checkpoint is never ahead of it), then the trials'."""
    if self.group_ckpt.latest_step() != loop.step:
      try:
        self.group_ckpt.save(loop.step, state, loop.to_meta())
        self.group_ckpt.wait()
      except ckpt_lib.CheckpointError as e:
        raise WriteFailed(f"saving the group checkpoint of step {loop.step} failed ({first_line(e)}); the previous "
                          f"one (step {self.group_ckpt.latest_step()}) is intact") from None
    for k in which:
      save_run(checkpoints[k], self._trial_state(state, k), loop.of_run(k))

  def close(self) -> None:
    if self.group_ckpt is not None:
      self.group_ckpt.close()

  # ----- reporting ------------------------------------------------------------------------

  def start_lines(self, step: int) -> list[str]:
    seeds = len({t.config.train.seed for t in self.trainers}) > 1
    lines = run_summary.start_lines(self.lead, step) + [
        f"trial group of {len(self.trainers)} in {self.group_dir}; varying: {', '.join(self.varying) or 'nothing'}"
        + (", train.seed" if seeds else "")]
    for k, t in enumerate(self.trainers):
      values = [f"{name} {t.opt_plan.hparams[name]:g}" for name in self.varying]
      values += [f"seed {t.config.train.seed}"] if seeds else []
      lines.append(f"[trial {k}] {t.workdir}: " + ", ".join(values))
    return lines

  def summary_extra(self, k: int) -> dict:
    return {"trial_group": {"size": len(self.trainers), "index": k, "group_workdir": str(self.group_dir)}}


def train_group(configs: list[ml_collections.ConfigDict], workdirs: list[str],
                group_workdir: str | None = None) -> list[dict]:
  """Trains the trials together; returns each one's summary (as `train_and_evaluate` would), a failed trial's
  with its "error"."""
  return train(TrialGroup(configs, workdirs, group_workdir))
