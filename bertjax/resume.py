"""What a workdir records of its run's config, and what a resumed run must match."""

import json
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


def saved_label_names(workdir: Path) -> list[str] | None:
  """The label names of a run being resumed (so its classes keep their indices), else None."""
  path = workdir / "labels.json"
  if (workdir / "checkpoints").exists() and path.exists():
    return json.loads(path.read_text())["label_names"]
  return None
