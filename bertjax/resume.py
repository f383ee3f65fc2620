"""What a workdir records of its run's config, and what a resumed run must match: the same model and data
always; the same mathematics (optimizer, batch, seed, schedule length, class weights) unless
train.allow_changed_config, which records the change."""

import json
import sys
from pathlib import Path

import ml_collections

from bertjax.config_base import base_config
from bertjax.errors import UserError
from bertjax.models.config import resolve_dtypes


def config_snapshot(config: ml_collections.ConfigDict) -> dict:
  """The config as the workdir's config.json holds it."""
  return json.loads(config.to_json_best_effort())


def check_resume_compatible(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """A resumed run must train the same model on the same data; step budgets may change."""
  saved_path = workdir / "config.json"
  if not saved_path.exists():
    return
  saved, now = json.loads(saved_path.read_text()), config_snapshot(config)
  defaults = config_snapshot(base_config())
  saved.setdefault("data", {}).setdefault("num_shards", 1)  # before data.num_shards: one global plan
  for group in ("model", "data"):
    for key in sorted(set(saved.get(group, {})) | set(now.get(group, {}))):
      if key not in saved.get(group, {}) and now[group].get(key) == defaults[group].get(key):
        continue  # a key added after the run started, left at its default
      if group == "model" and key in ("dtype", "matmul_dtype") and \
          resolve_dtypes(saved.get("model", {})) == resolve_dtypes(now["model"]):
        continue  # `auto` is what this backend resolves it to
      if group == "model" and key == "attention":
        continue  # how attention is computed, not what: a run may resume with another implementation
      if saved.get(group, {}).get(key) != now.get(group, {}).get(key):
        raise UserError(f"{saved_path}: this workdir was trained with {group}.{key}="
                        f"{saved.get(group, {}).get(key)!r}, not {now.get(group, {}).get(key)!r}; "
                        "use a new --workdir or the same setting")


# Settings that change what the remaining steps compute (every optimizer.* key, and these).
MATH_KEYS = ("train.global_batch_size", "train.seed", "train.num_epochs", "train.max_steps", "train.class_weights")


def _math_keys(saved: dict, now: dict) -> list[str]:
  optimizer = sorted(set(saved.get("optimizer", {})) | set(now.get("optimizer", {})))
  return [f"optimizer.{k}" for k in optimizer] + list(MATH_KEYS)


def changed_settings(workdir: Path, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{key: (old, new)} of the settings in which `config` differs from the run it resumes (none for a fresh
  workdir). A change is refused in one line naming the key, unless train.allow_changed_config."""
  saved_path = workdir / "config.json"
  if not (workdir / "checkpoints").exists() or not saved_path.exists():
    return {}
  saved, now = json.loads(saved_path.read_text()), config_snapshot(config)
  defaults = config_snapshot(base_config())
  changes = {}
  for key in _math_keys(saved, now):
    group, name = key.split(".")
    old, new = saved.get(group, {}).get(name, defaults[group].get(name)), now[group].get(name)
    if old != new:
      changes[key] = (old, new)
  if changes and not config.train.allow_changed_config:
    (key, (old, new)), more = next(iter(changes.items())), len(changes) - 1
    raise UserError(f"{saved_path}: this run was trained with {key}={old!r}, not {new!r}"
                    + (f" (and {more} more: {', '.join(list(changes)[1:])})" if more else "")
                    + "; that changes the rest of the run: use a new --workdir, the same setting, or "
                    "--config.train.allow_changed_config=True to go on with it (recorded in config.json)")
  return changes


def record_changes(run, runlog, step: int) -> None:
  """A resumed run's allowed changes (`run.config_changes`): a `config` line in metrics.jsonl at the resumed
  step, config.json rewritten with the new settings and the history of changes, and a start line."""
  if not run.config_changes or step == 0:  # no checkpoint to go on from: a fresh start, not a change
    return
  changed = {key: {"old": old, "new": new} for key, (old, new) in run.config_changes.items()}
  runlog.write_record(step, "config", {"changed": changed})
  if run.is_primary:
    path = run.workdir / "config.json"
    history = json.loads(path.read_text()).get("changes", [])
    path.write_text(json.dumps({**run.config_record(), "changes": history + [{"step": step, "changed": changed}]},
                               indent=2) + "\n")
    print("config: resuming at step {} with {} (train.allow_changed_config; recorded in config.json and "
          "metrics.jsonl)".format(step, ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in run.config_changes.items())),
          file=sys.stderr, flush=True)


def mesh_note(saved: dict | None, mesh: dict, global_batch_size: int) -> str:
  """For a resumed run's start line: how the devices changed since its checkpoint (the steps' plan and the
  data position do not depend on them)."""
  if not saved or saved == mesh:
    return ""
  count = lambda m: m["data"] * m["fsdp"]
  return (f"; checkpointed on {count(saved)} devices (mesh {saved}), now {count(mesh)} (mesh {mesh}): the same "
          f"global batch of {global_batch_size} and data position")


def saved_label_names(workdir: Path) -> list[str] | None:
  """The label names of a run being resumed (so its classes keep their indices), else None."""
  path = workdir / "labels.json"
  if (workdir / "checkpoints").exists() and path.exists():
    return json.loads(path.read_text())["label_names"]
  return None
