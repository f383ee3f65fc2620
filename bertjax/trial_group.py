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
summary.json, curves.png), and can later be resumed or extended alone: the loop is the trainer's,
with one member per trial. The stacked state is also checkpointed, first and synchronously at each
save, in the group workdir (default: `.group-<hash>` next to the first trial's workdir); a rerun
resumes from it, after first writing the checkpoint of any trial whose own save was cut short.
Once the group has finished, the group workdir only serves a rerun (which changes nothing).
"""

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bertjax import checkpoint as ckpt_lib
from bertjax import optim, resume, sharding
from bertjax.errors import UserError, first_line
from bertjax.step import TrainState, make_train_step
from bertjax.trainer import Member, Trainer, WriteFailed, log

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


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def default_group_dir(workdirs: list[str]) -> Path:
  """`.group-<hash of the trial workdirs>` next to the first trial's workdir."""
  paths = [str(Path(w).resolve()) for w in workdirs]
  digest = hashlib.sha1("\n".join(paths).encode()).hexdigest()[:12]
  return Path(paths[0]).parent / f".group-{digest}"


def _steps(checkpoint_dir: Path) -> list[int]:
  return sorted(int(p.name) for p in checkpoint_dir.glob("*") if p.name.isdigit()) \
      if checkpoint_dir.is_dir() else []


class TrialGroup(Trainer):
  """Trial 0's Trainer, extended to train every trial: `run_members()` returns their summaries."""

  stops_members_alone = True  # a diverged trial stops (its updates go on being computed, and ignored)

  def __init__(self, configs: list[ml_collections.ConfigDict], workdirs: list[str],
               group_workdir: str | None = None):
    if not configs or len(configs) != len(workdirs):
      raise UserError(f"a trial group needs one workdir per config, got {len(configs)} configs "
                      f"and {len(workdirs)} workdirs")
    if len({str(Path(w).resolve()) for w in workdirs}) != len(workdirs):
      raise UserError(f"the trials of a group need distinct workdirs: {workdirs}")
    first = _flat(json.loads(group_key(configs[0])))
    for i, c in enumerate(configs[1:], 1):
      other = _flat(json.loads(group_key(c)))
      differ = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
      if differ:
        raise UserError(f"trial {i} ({workdirs[i]}) cannot share a group with trial 0: they differ in "
                        f"{', '.join(differ)} (only {', '.join(free_keys(configs[0]))} may differ)")
    self.group_dir = Path(group_workdir) if group_workdir else default_group_dir(workdirs)
    if not _steps(self.group_dir / "checkpoints"):  # then it starts from the trials' own checkpoints
      latest = {w: max(_steps(Path(w) / "checkpoints"), default=None) for w in workdirs}
      if len(set(latest.values())) > 1:
        raise UserError(f"the trials' latest checkpoints are at different steps ({latest}) and the group "
                        f"workdir {self.group_dir} has none: resume them alone (bertjax.train) or in their "
                        "first group")
    super().__init__(configs[0], workdirs[0], cache_dir=self.group_dir / "cache")
    self.trials = [self] + [Trainer(c, w, like=self) for c, w in zip(configs[1:], workdirs[1:])]
    hparams = [t.opt_plan.hparams for t in self.trials]
    self.varying = tuple(k for k in optim.HPARAMS if len({h[k] for h in hparams}) > 1)
    self._check_manifest()

  # ----- the stacked state ----------------------------------------------------------------

  def _members(self) -> list[Member]:
    return [Member(t, k, label=f"[trial {k}] ") for k, t in enumerate(self.trials)]

  def _init_state(self):
    states, self._single_defs = [], []
    for t in self.trials:
      params = t.loaded.params
      tx = optim.make_injected_optimizer(t.opt_plan, self.varying, params)
      states.append(TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(t.config.train.seed)))
      # A trial's own checkpoint holds its optimizer state as a single run has it: same leaves, its structure.
      single = jax.eval_shape(t.tx.init, params)
      inner = states[-1].opt_state.inner
      if [(x.shape, x.dtype) for x in jax.tree.leaves(single)] != \
         [(x.shape, x.dtype) for x in jax.tree.leaves(inner)]:
        raise AssertionError("the injected optimizer's state does not match the single-run one")
      self._single_defs.append(jax.tree.structure(single))
    self.group_tx = optim.make_injected_optimizer(self.opt_plan, self.varying, self.loaded.params)
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)
    self._hparams_host, self._inner_def = stacked.opt_state.hparams, jax.tree.structure(states[0].opt_state.inner)
    fsdp = self.mesh.shape["fsdp"]
    spec = lambda x: sharding.param_spec(tuple(x.shape[1:]), fsdp)  # each trial sharded as a single run
    self.state_shardings = jax.tree.map(lambda x: NamedSharding(self.mesh, P(None, *spec(x))), stacked)
    self.member_shardings = jax.tree.map(lambda x: NamedSharding(self.mesh, spec(x)), stacked)
    take = lambda tree, k: jax.tree.map(lambda x: x[k], tree)
    self._take = jax.jit(take, out_shardings=self.member_shardings)
    self._take_params = jax.jit(take, out_shardings=self.member_shardings.params)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            stacked, self.state_shardings)
    state = jax.device_put(stacked, self.state_shardings)
    self._hparams = state.opt_state.hparams
    return state, abstract

  def _member_state(self, state, index: int):
    one = self._take(state, index)
    return one.replace(opt_state=jax.tree.unflatten(self._single_defs[index], jax.tree.leaves(one.opt_state.inner)))

  def _member_params(self, state, index: int):
    return self._take_params(state.params, index)

  def _split_metrics(self, metrics: dict) -> list[dict]:
    return [{k: v[i] for k, v in metrics.items()} for i in range(len(self.trials))]

  def _make_step_fn(self):
    tc, plan, tx = self.config.train, self.opt_plan, self.group_tx

    def one_trial(state: TrainState, batch: dict):
      schedule = optim.injected_schedule(plan, state.opt_state)
      return make_train_step(self.model, tx, schedule, self.regression, self.grad_accum_steps,
                             tc.skip_nonfinite_steps, self.class_weights)(state, batch)

    return jax.vmap(one_trial, in_axes=(0, None))

  # ----- the group checkpoint -------------------------------------------------------------

  def _manifest(self) -> dict:
    """What a rerun must match to resume the stacked state: the trials, and what varies between them."""
    return {"workdirs": [str(t.workdir.resolve()) for t in self.trials], "varying": list(self.varying)}

  def _check_manifest(self) -> None:
    path = self.group_dir / "group.json"
    if _steps(self.group_dir / "checkpoints") and path.exists():
      saved, now = json.loads(path.read_text()), self._manifest()
      for key in ("workdirs", "varying"):
        if saved[key] != now[key]:
          raise UserError(f"{path}: this group was started with {key} {saved[key]}, not {now[key]}; "
                          "use the same trials or a new group workdir")

  def _resume(self, abstract):
    self.group_ckpt = ckpt_lib.Checkpoints(str(self.group_dir / "checkpoints"), keep_best=False, async_save=False,
                                           is_primary=self.is_primary, sync_name="group")
    latest = self.group_ckpt.latest_step()
    if latest is None:
      if self.is_primary:
        self.group_dir.mkdir(parents=True, exist_ok=True)
        (self.group_dir / "group.json").write_text(json.dumps(self._manifest(), indent=2) + "\n")
      return self._stack_trial_checkpoints()
    state, meta = self.group_ckpt.restore(latest, abstract)
    # Like a resumed single run, the trials go on with their configs' (possibly changed) hyperparameters.
    state = state.replace(opt_state=state.opt_state._replace(hparams=self._hparams))
    log(f"resumed the group from {self.group_dir}/checkpoints/{latest} (epoch {meta['epoch']}, "
        f"step {meta['step_in_epoch']} of {self.data.train.batcher.steps_in_epoch(meta['epoch'])})")
    loop_meta = {k: meta[k] for k in ("epoch", "step_in_epoch", "stats")}
    for m, saved in zip(self.members, meta["members"]):  # trials whose own save was cut short
      if saved["stopped_by"] is None and (m.checkpoints.latest_step() or -1) < latest:
        m.load_meta(saved)
        last = saved["last_eval"]
        self._save_member(m, latest, state, loop_meta, last if last and last["step"] == latest else None)
    return state, {**loop_meta, "members": meta["members"]}

  def _stack_trial_checkpoints(self):
    """The group's state from the trials' own checkpoints, all of the same step (None if they have none):
    a group regrouped, or whose group workdir was deleted, goes on from where its trials are."""
    restored = [self._restore_member(m, m.run.abstract_state()) for m in self.members]
    if restored[0] is None:
      return None
    positions = {(meta["epoch"], meta["step_in_epoch"]) for _, meta in restored}
    if len(positions) > 1:
      raise UserError(f"the trials' latest checkpoints are at different data positions {sorted(positions)}")
    states = [TrainState(step=s.step, params=s.params, rng=s.rng, opt_state=optim.InjectedState(
        {k: v[i] for k, v in self._hparams_host.items()}, jax.tree.unflatten(self._inner_def, jax.tree.leaves(s.opt_state))))
        for i, (s, _) in enumerate(restored)]
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)
    loop_meta = {**restored[0][1], "members": [meta["members"][0] for _, meta in restored]}
    return jax.device_put(stacked, self.state_shardings), loop_meta

  def _save_shared(self, step: int, state, loop_meta: dict) -> None:
    if self.group_ckpt.latest_step() == step:
      return
    meta = {**loop_meta, **self._manifest(), "label_names": self.data.label_names}
    try:
      self.group_ckpt.save(step, state, meta)
      self.group_ckpt.wait()
    except ckpt_lib.CheckpointError as e:
      raise WriteFailed(f"saving the group checkpoint of step {step} failed ({first_line(e)}); the previous "
                        f"one (step {self.group_ckpt.latest_step()}) is intact") from None

  def _close(self) -> None:
    if hasattr(self, "group_ckpt"):
      self.group_ckpt.close()

  # ----- reporting ------------------------------------------------------------------------

  def _start_lines(self, step: int) -> list[str]:
    seeds = len({t.config.train.seed for t in self.trials}) > 1
    lines = super()._start_lines(step) + [
        f"trial group of {len(self.trials)} in {self.group_dir}; varying: {', '.join(self.varying) or 'nothing'}"
        + (", train.seed" if seeds else "")]
    for k, t in enumerate(self.trials):
      values = [f"{name} {t.opt_plan.hparams[name]:g}" for name in self.varying]
      values += [f"seed {t.config.train.seed}"] if seeds else []
      lines.append(f"[trial {k}] {t.workdir}: " + ", ".join(values))
    return lines

  def _summary_extra(self, member: Member) -> dict:
    return {"trial_group": {"size": len(self.trials), "index": member.index, "group_workdir": str(self.group_dir)}}


def train_group(configs: list[ml_collections.ConfigDict], workdirs: list[str],
                group_workdir: str | None = None) -> list[dict]:
  """Trains the trials together; returns each one's summary (as `train_and_evaluate` would)."""
  return TrialGroup(configs, workdirs, group_workdir).run_members()
