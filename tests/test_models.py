"""Parity of the Flax models with Hugging Face PyTorch, weight round trips and bad checkpoints."""

import functools
import json

import jax
import numpy as np
import pytest
import torch
import transformers as tr
from safetensors.numpy import load_file, save_file

from bertjax import models
from bertjax.errors import UserError
from bertjax.models import hf_weights
from bertjax.models.encoder import Encoder
from bertjax.models.hf_weights import tensor_map
from conftest import VARIANTS, minilm_dir, padded_batch, to_bertjax

FAMILIES = tuple(VARIANTS)  # every family, and ModernBERT with mean pooling too


@functools.lru_cache(maxsize=None)
def load_tiny(folder) -> models.Loaded:
  """A checkpoint of `hf_tiny` loaded once per test process (tests do not modify what it returns)."""
  return models.load(str(folder))


def torch_logits(folder, ids, mask, types):
  model = tr.AutoModelForSequenceClassification.from_pretrained(folder).eval()
  kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if getattr(model.config, "type_vocab_size", 0) > 1:
    kwargs["token_type_ids"] = torch.tensor(types)
  with torch.no_grad():
    return model(**kwargs).logits.numpy()


def token_types(loaded, types):
  """The token types a family's model gets: none for one (RoBERTa, XLM-R) or no type embeddings."""
  return types if loaded.cfg.type_vocab_size > 1 else np.zeros_like(types)


def jax_logits(loaded, ids, mask, types, dtype="float32", matmul_dtype=""):
  cfg = loaded.cfg.replace(dtype=dtype, matmul_dtype=matmul_dtype)
  out = models.SequenceClassifier(cfg).apply({"params": loaded.params}, **to_bertjax(ids, mask, types))
  return np.asarray(out[:, 0, :])


@pytest.mark.parametrize("family, pairs", [(f, False) for f in FAMILIES] + [
    (f, True) for f in ("bert", "roberta", "electra", "albert")])  # the others have no token types
def test_logits_match_pytorch(hf_tiny, family, pairs):
  loaded = load_tiny(hf_tiny[family])
  assert not loaded.fresh_head and loaded.cfg.family == VARIANTS[family][0]
  rng = np.random.default_rng(1)
  lengths = [9, 17, 5, 30]  # longer than DeBERTa's 8 buckets and ModernBERT's window of 8
  split = [4, 10, 2, 12] if pairs else None
  ids, mask, types = padded_batch(rng, lengths, 120, loaded.cfg.pad_token_id, split)
  types = token_types(loaded, types)
  want = torch_logits(hf_tiny[family], ids, mask, types)
  got = jax_logits(loaded, ids, mask, types)
  assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
  got_bf16 = jax_logits(loaded, ids, mask, types, "bfloat16")
  bf16_diff = np.abs(got_bf16 - want).max()
  mixed_diff = np.abs(jax_logits(loaded, ids, mask, types, "float32", "bfloat16") - want).max()
  print(f"{family} pairs={pairs}: f32 max|diff|={np.abs(got - want).max():.2e} bf16={bf16_diff:.2e} "
        f"bf16 matmuls={mixed_diff:.2e}")
  assert bf16_diff < 0.1  # bf16 has ~3 significant digits; a wrong mapping is off by O(1)
  assert 1e-6 < mixed_diff < 0.03  # the products' operands are rounded (so not exact), a wrong product is O(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_cast_once_give_the_same_logits(hf_tiny, family):
  """The evaluator casts the Dense kernels to the products' operand dtype once per pass: only kernels
  change, and the logits are those of the float32 params (whose kernels each product rounds itself)."""
  import jax.numpy as jnp
  from bertjax.models.layers import cast_kernels
  loaded = load_tiny(hf_tiny[family])
  ids, mask, types = padded_batch(np.random.default_rng(2), [9, 17, 5, 30], 120, loaded.cfg.pad_token_id)
  cfg = loaded.cfg.replace(dtype="float32", matmul_dtype="bfloat16")
  cast = cast_kernels(cfg, loaded.params)
  flat = jax.tree_util.tree_flatten_with_path(cast)[0]
  kernels = [x for path, x in flat if path[-1].key == "kernel"]
  assert kernels and all(x.dtype == jnp.bfloat16 for x in kernels)
  assert all(x.dtype == jnp.float32 for path, x in flat if path[-1].key != "kernel")
  apply = lambda p: np.asarray(models.SequenceClassifier(cfg).apply({"params": p}, **to_bertjax(ids, mask, types)))
  np.testing.assert_allclose(apply(cast), apply(loaded.params), rtol=1e-6, atol=1e-6)
  assert cast_kernels(cfg.replace(matmul_dtype="float32"), loaded.params) is loaded.params


def test_albert_shares_layers(hf_tiny):
  loaded = load_tiny(hf_tiny["albert"])
  cfg = loaded.cfg
  # 4 layers over 2 groups of 2 inner layers: 4 parameter sets, 8 applied layers.
  assert cfg.param_layers == 4 and cfg.layer_schedule() == [0, 1, 0, 1, 2, 3, 2, 3]
  assert sorted(k for k in loaded.params["encoder"] if k.startswith("layer_")) == [f"layer_{k}" for k in range(4)]


def test_minilm_hidden_states_match_pytorch():
  folder = minilm_dir()
  loaded = models.load(str(folder), num_labels=2)
  assert loaded.fresh_head and any("new 2-label" in n for n in loaded.notes)
  tok = tr.AutoTokenizer.from_pretrained(folder)
  enc = tok(["a charming and often affecting journey .", "unflinchingly bleak",
             "the movie was not bad at all , i enjoyed it"], padding=True, return_tensors="np")
  ids, mask, types = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
  pt = tr.AutoModel.from_pretrained(folder).eval()
  with torch.no_grad():
    want = pt(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
  inputs = to_bertjax(ids, mask, types)
  hidden = Encoder(loaded.cfg).apply({"params": loaded.params["encoder"]}, inputs["input_ids"],
                                     inputs["token_type_ids"], inputs["segment_ids"], inputs["position_ids"])
  real = mask.astype(bool)
  diff = np.abs(np.asarray(hidden)[real] - want[real]).max()
  assert diff <= 1e-4, diff


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_to_pytorch(hf_tiny, tmp_path, family):
  """bertjax params -> Hugging Face folder -> transformers PyTorch gives our logits."""
  loaded = load_tiny(hf_tiny[family])
  # Change the params so the test can't pass by re-reading the original file.
  noise = np.random.default_rng(5)
  params = jax.tree.map(lambda x: x + 0.05 * noise.standard_normal(x.shape).astype(np.float32), loaded.params)
  out = models.save(tmp_path / "export", loaded.cfg, params, loaded.hf_config, ["neg", "neu", "pos"])
  config = json.loads((out / "config.json").read_text())
  assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
  rng = np.random.default_rng(2)
  ids, mask, types = padded_batch(rng, [7, 12, 3], 120, loaded.cfg.pad_token_id, [3, 5, 1])
  types = token_types(loaded, types)
  want = torch_logits(out, ids, mask, types)
  got = np.asarray(models.SequenceClassifier(loaded.cfg).apply({"params": params}, **to_bertjax(ids, mask, types))
                   )[:, 0]
  assert np.abs(got - want).max() <= 1e-4
  assert np.abs(got - torch_logits(hf_tiny[family], ids, mask, types)).max() > 1e-3  # params really changed


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_examples_alone(hf_tiny, family):
  """Two examples packed in one row give the logits each gives alone (for DeBERTa and ModernBERT: relative
  distances, rotary positions, the sliding window and mean pooling count within each example)."""
  loaded = load_tiny(hf_tiny[family])
  model = models.SequenceClassifier(loaded.cfg)
  rng = np.random.default_rng(3)
  na, nb = 12, 19  # longer than DeBERTa's 8 buckets and ModernBERT's window of 8
  a, b = rng.integers(3, 120, na).astype(np.int32), rng.integers(3, 120, nb).astype(np.int32)
  ta = token_types(loaded, np.r_[np.zeros(4), np.ones(na - 4)])
  tb = token_types(loaded, np.r_[np.zeros(5), np.ones(nb - 5)])
  alone = []
  for ids, types in ((a, ta), (b, tb)):
    n = len(ids)
    batch = dict(input_ids=ids[None], token_type_ids=types[None].astype(np.int32), segment_ids=np.ones((1, n), np.int32),
                 position_ids=np.arange(n, dtype=np.int32)[None], cls_index=np.zeros((1, 1), np.int32))
    alone.append(np.asarray(model.apply({"params": loaded.params}, **batch))[0, 0])
  pad = loaded.cfg.pad_token_id
  row = np.r_[a, b, [pad] * 6].astype(np.int32)
  packed = dict(input_ids=row[None], token_type_ids=np.r_[ta, tb, np.zeros(6)][None].astype(np.int32),
                segment_ids=np.r_[[1] * na, [2] * nb, [0] * 6][None].astype(np.int32),
                position_ids=np.r_[np.arange(na), np.arange(nb), np.zeros(6)][None].astype(np.int32),
                cls_index=np.array([[0, na]], np.int32))
  got = np.asarray(model.apply({"params": loaded.params}, **packed))[0]
  assert np.abs(got - np.stack(alone)).max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_at_read_tokens_only(hf_tiny, family):
  """The last layer run only at the read-out tokens gives the hidden states the full last layer gives there."""
  loaded = load_tiny(hf_tiny[family])
  encoder = Encoder(loaded.cfg)
  rng = np.random.default_rng(5)
  lengths = ((6, 13, 4, 9), (20, 3, 9))  # per row: examples, then padding
  segments = np.stack([np.repeat(np.r_[1:len(n), 0], n) for n in lengths]).astype(np.int32)
  positions = np.stack([np.concatenate([np.arange(k) for k in n]) for n in lengths]).astype(np.int32)
  starts = np.array([[0, 6, 19, 0], [0, 20, 0, 0]], np.int32)  # first tokens, then empty slots (index 0)
  args = (rng.integers(3, 120, (2, 32)).astype(np.int32), np.zeros((2, 32), np.int32), segments, positions)
  params = {"params": loaded.params["encoder"]}
  full = np.asarray(encoder.apply(params, *args))
  read = np.asarray(encoder.apply(params, *args, read_BxS=starts))
  assert read.shape == (2, 4, loaded.cfg.hidden_size)
  want = np.take_along_axis(full, starts[:, :, None], axis=1)  # empty slots: the row's first token, as before
  assert np.abs(read - want).max() <= 1e-5
  assert np.abs(full[:, 1] - full[:, 0]).max() > 1e-3 and np.abs(full[1] - full[0]).max() > 1e-3  # gathers checked


def test_dropout_is_active_in_training_and_seeded(hf_tiny):
  loaded = load_tiny(hf_tiny["bert"])
  model = models.SequenceClassifier(loaded.cfg)
  rng = np.random.default_rng(4)
  inputs = to_bertjax(*padded_batch(rng, [8, 8], 120, 0))
  run = lambda seed: np.asarray(model.apply({"params": loaded.params}, **inputs, deterministic=False,
                                            rngs={"dropout": jax.random.key(seed)}))
  assert np.abs(run(0) - run(1)).max() > 1e-3
  np.testing.assert_array_equal(run(0), run(0))


def test_num_labels_disagreeing_with_head(hf_tiny):
  with pytest.raises(UserError, match="has 3 labels but num_labels=2"):
    models.load(str(hf_tiny["bert"]), num_labels=2)


def test_bad_checkpoints(hf_tiny, tmp_path):
  src = hf_tiny["bert"]
  with pytest.raises(UserError, match="no config.json"):
    models.load(str(tmp_path))
  with pytest.raises(UserError, match="does not exist"):
    models.load(str(tmp_path / "nope"))

  def copy_with(name, config=None, tensors=None):
    d = tmp_path / name
    d.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(src / "model.safetensors"))
    t = tensors(t) if tensors else t
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)

  with pytest.raises(UserError, match="unsupported model_type 'gpt2'"):
    models.load(copy_with("gpt", {"model_type": "gpt2"}))
  name = "bert.encoder.layer.1.attention.self.key.weight"
  with pytest.raises(UserError, match=f"model.safetensors: missing tensor '{name}'"):
    models.load(copy_with("missing", tensors=lambda t: {k: v for k, v in t.items() if k != name}))
  with pytest.raises(UserError, match=f"model.safetensors: tensor '{name}' has shape \\(32, 31\\), expected \\(32, 32\\)"):
    models.load(copy_with("shape", tensors=lambda t: {**t, name: t[name][:, :31].copy()}))
  with pytest.raises(UserError, match="num_hidden_layers=0; a classifier needs at least one layer"):
    models.load(copy_with("no_layers", {"num_hidden_layers": 0}))
  with pytest.raises(UserError, match="unexpected tensor 'bert.encoder.layer.7.foo'"):
    models.load(copy_with("extra", tensors=lambda t: {**t, "bert.encoder.layer.7.foo": np.zeros(3, np.float32)}))


@pytest.mark.parametrize("family", ["bert", "modernbert-mean"])
def test_a_head_the_checkpoint_lacks_is_the_random_models_head(hf_tiny, tmp_path, monkeypatch, family):
  """load() draws random values only for the head a checkpoint lacks (the encoder's are read, not drawn first),
  and they are those of the whole random model for that seed: the same start as before."""
  src = hf_tiny[family]
  folder = tmp_path / "encoder_only"
  folder.mkdir()
  (folder / "config.json").write_text((src / "config.json").read_text())
  tensors = load_file(str(src / "model.safetensors"))
  save_file({k: v for k, v in tensors.items() if not k.startswith(("classifier", "head.", "cls"))},
            str(folder / "model.safetensors"), metadata={"format": "pt"})
  kept = load_tiny(src)
  drawn = models.init_params(kept.cfg.replace(num_labels=3), seed=7)["head"]
  monkeypatch.setattr(hf_weights, "init_params", lambda *a, **k: pytest.fail("load computed a whole random model"))
  loaded = models.load(str(folder), num_labels=3, seed=7)
  assert loaded.fresh_head and not kept.fresh_head and loaded.cfg == kept.cfg.replace(num_labels=3)
  fresh = {"bert": {"out"}, "modernbert-mean": {"dense", "norm", "out"}}[family]  # BERT's pooler is the encoder's
  assert set(loaded.params["head"]) == set(drawn) >= fresh
  for name, layer in loaded.params["head"].items():
    jax.tree.map(np.testing.assert_array_equal, layer, (drawn if name in fresh else kept.params["head"])[name])
  jax.tree.map(np.testing.assert_array_equal, loaded.params["encoder"], kept.params["encoder"])
  assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in jax.tree.leaves(loaded.params))


def test_offline_hub_name_is_one_line_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(UserError) as e:
    models.load("roberta-base")
  msg = str(e.value)
  assert "\n" not in msg and "roberta-base" in msg and "local folder" in msg


def test_every_param_is_mapped(hf_tiny):
  """The name map covers the whole param tree, so nothing is silently left at its random init."""
  for family in FAMILIES:
    loaded = load_tiny(hf_tiny[family])
    paths = {tuple(p.key for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(loaded.params)[0]}
    mapped = {path for path, _ in tensor_map(loaded.cfg).values()}
    assert paths == mapped, paths ^ mapped


@pytest.mark.parametrize("spec, a_shape, b_shape", [
    ("...i,io->...o", (3, 5, 8), (8, 6)),  # a dense layer
    ("bqnd,bknd->bnqk", (2, 5, 3, 4), (2, 7, 3, 4)),  # attention scores
    ("bnqk,bknd->bqnd", (2, 3, 5, 7), (2, 7, 3, 4)),  # attention context
])
def test_bf16_operand_products_and_their_gradients(spec, a_shape, b_shape):
  """The forward product and both gradients are float32 sums of bfloat16-rounded operands (the incoming
  gradient rounded too); with float32 operands the custom gradient is exactly autodiff's."""
  import jax.numpy as jnp
  from bertjax.models.config import EncoderConfig
  from bertjax.models.layers import _cast_einsum, matmul
  ka, kb, kg = jax.random.split(jax.random.key(0), 3)
  a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
  g = jax.random.normal(kg, jnp.einsum(spec, a, b).shape)
  cfg = EncoderConfig("bert", 10, 8, 1, 2, 16, matmul_dtype="bfloat16")
  out, vjp = jax.vjp(lambda x, y: matmul(cfg, spec, x, y), a, b)
  grad_a, grad_b = vjp(g)
  assert out.dtype == grad_a.dtype == grad_b.dtype == jnp.float32
  r = lambda t: np.asarray(t.astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # rounded, summed exactly
  want_a, want_b = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), r(a), r(b))[1](r(g))
  np.testing.assert_allclose(out, np.einsum(spec, r(a), r(b)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_a, want_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_b, want_b, rtol=1e-5, atol=1e-5)
  exact_a, exact_b = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), a, b)[1](g)
  assert np.abs(grad_a - exact_a).max() > 1e-4  # the rounding is real: not a float32 product
  custom = jax.vjp(lambda x, y: _cast_einsum(spec, x, y, jnp.float32, jnp.float32), a, b)[1](g)
  np.testing.assert_allclose(custom[0], exact_a, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(custom[1], exact_b, rtol=1e-6, atol=1e-6)
