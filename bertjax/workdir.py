"""A training workdir's run files (config, labels, model folder) and reading a finished (or running) run back."""

import dataclasses
import functools
import json
from pathlib import Path

import jax
import ml_collections

from bertjax import checkpoint as ckpt_lib
from bertjax import optim
from bertjax.errors import UserError
from bertjax.models.config import (EncoderConfig, from_hf_config, resolve_attention, resolve_dtype,
                                   resolve_matmul_dtype)
from bertjax.models.heads import random_params
from bertjax.step import new_train_state


@dataclasses.dataclass
class Run:
  workdir: Path
  config: ml_collections.ConfigDict
  model_cfg: EncoderConfig
  hf_config: dict
  task: str
  label_names: list[str] | None
  step: int
  params: dict


def write_run_files(workdir: Path, config: dict, task: str, label_names: list[str] | None, hf_config: dict,
                    tokenizer) -> None:
  """config.json, labels.json and model/ (the HF config and tokenizer) that evaluate, predict and export read."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  (workdir / "labels.json").write_text(json.dumps({"task": task, "label_names": label_names}, indent=2) + "\n")
  model_dir = workdir / "model"
  model_dir.mkdir(exist_ok=True)
  (model_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  tokenizer.save(model_dir)


def _read_json(path: Path) -> dict:
  if not path.exists():
    raise UserError(f"{path}: missing (is {path.parent} a bertjax training workdir?)")
  return json.loads(path.read_text())


def pick_step(checkpoints: ckpt_lib.Checkpoints, which: str) -> int:
  """'best' (by the run's train.best_metric; latest when no eval ran), 'latest', or a step number."""
  steps = checkpoints.all_steps()
  if not steps:
    raise UserError(f"{checkpoints.directory}: no complete checkpoint")
  if which == "latest":
    return checkpoints.latest_step()
  if which == "best":
    best = checkpoints.best_step()
    return best if best is not None else checkpoints.latest_step()
  if not str(which).isdigit() or int(which) not in steps:
    raise UserError(f"{checkpoints.directory}: no checkpoint {which!r}; have best, latest or steps {steps}")
  return int(which)


def load_run(workdir: str | Path, which: str = "best", dtype: str | None = None) -> Run:
  """Restores a run's params (on the default device) with what is needed to use them."""
  workdir = Path(workdir)
  config = ml_collections.ConfigDict(_read_json(workdir / "config.json"))
  labels = _read_json(workdir / "labels.json")
  hf_config = _read_json(workdir / "model" / "config.json")
  model_cfg = from_hf_config(hf_config, str(workdir / "model" / "config.json"))
  dtype = dtype or resolve_dtype(config.model.dtype)
  model_cfg = model_cfg.replace(dtype=dtype, matmul_dtype=resolve_matmul_dtype(config.model.get("matmul_dtype", "auto"),
                                                                               dtype))
  model_cfg = model_cfg.replace(attention=resolve_attention("auto", model_cfg).eval)  # forward passes only
  params = jax.eval_shape(functools.partial(random_params, model_cfg), jax.random.key(0))
  # What a restore needs of the optimizer is its state's structure, which no step count or rate changes.
  plan = optim.plan_optimizer(config.optimizer, total_steps=1, global_batch_size=config.train.global_batch_size)
  abstract = jax.eval_shape(functools.partial(new_train_state, tx=optim.build_optimizer(plan, plan.hparams, params)[0],
                                              seed=0), params)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  checkpoints = ckpt_lib.Checkpoints(str(workdir / "checkpoints"), async_save=False, is_primary=False,
                                     best_metric=config.train.get("best_metric", "eval_loss"))
  try:
    step = pick_step(checkpoints, which)
    state, _ = checkpoints.restore(step, abstract)
  finally:
    checkpoints.close()
  return Run(workdir=workdir, config=config, model_cfg=model_cfg, hf_config=hf_config, task=labels["task"],
             label_names=labels["label_names"], step=step, params=state.params)
