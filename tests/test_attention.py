"""The attention implementations (`model.attention`): the fused `xla` path against the `einsum` one, the
choice `auto` makes and the refusals, `model.attention_dropout`, and `train.deterministic`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.flatten_util import ravel_pytree

from bertjax import cli_setup, models, run_summary
from bertjax.errors import UserError
from bertjax.models.config import Attention, resolve_attention, resolve_attention_dropout
from bertjax.models.encoder import Encoder
from bertjax.trainer import Trainer
from conftest import demo_setup
from test_train import demo_config


def tiny_cfg(**kw):
  base = dict(family="bert", vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
              max_position_embeddings=64, num_labels=3, hidden_dropout=0.0, attention_dropout=0.0,
              classifier_dropout=0.0, initializer_range=0.1)  # weights large enough for uneven attention
  return models.EncoderConfig(**{**base, **kw})


def packed_batch(rng):
  """Two rows of 32 tokens holding 3 and 2 examples, then padding; read-out slots at each example's start
  (empty slots read token 0, as the batcher leaves them)."""
  lengths = ((6, 13, 4, 9), (20, 3, 9))  # per row: examples, then padding
  segments = np.stack([np.repeat(np.r_[1:len(n), 0], n) for n in lengths]).astype(np.int32)
  positions = np.stack([np.concatenate([np.arange(k) for k in n]) for n in lengths]).astype(np.int32)
  return dict(input_ids=rng.integers(3, 100, (2, 32)).astype(np.int32),
              token_type_ids=rng.integers(0, 2, (2, 32)).astype(np.int32), segment_ids=segments,
              position_ids=positions, cls_index=np.array([[0, 6, 19, 0], [0, 20, 0, 0]], np.int32))


def unpacked_batch(rng):
  """Three rows of 24 tokens, one example each (lengths 24, 7, 15), right-padded; one read-out slot."""
  lengths = np.array([24, 7, 15])
  real = np.arange(24)[None, :] < lengths[:, None]
  return dict(input_ids=np.where(real, rng.integers(3, 100, (3, 24)), 0).astype(np.int32),
              token_type_ids=np.zeros((3, 24), np.int32), segment_ids=real.astype(np.int32),
              position_ids=np.where(real, np.arange(24)[None, :], 0).astype(np.int32),
              cls_index=np.zeros((3, 1), np.int32))


MODERNBERT = dict(family="modernbert", architecture="modernbert", type_vocab_size=0, absolute_positions=False,
                  norm_bias=False, attention_bias=False, mlp_bias=False, layer_windows=(4, 0),
                  rope_thetas=(1e4, 1.6e5), head="dense_norm", head_act="gelu", head_bias=False)


@pytest.mark.slow
@pytest.mark.parametrize("make_batch", [packed_batch, unpacked_batch])
@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_xla_attention_equals_einsum(make_batch, family):
  """float32 logits, hidden states and all gradients agree within 1e-6 (the gradients relative to their
  largest), through full-length layers and the last layer run only at the read-out tokens; ModernBERT's
  rotary positions and sliding window (4 tokens here) go through the fused path too."""
  cfg = tiny_cfg(**(MODERNBERT if family == "modernbert" else {}))
  params = models.init_params(cfg, seed=1)
  batch = make_batch(np.random.default_rng(0))
  weights = np.random.default_rng(2).normal(size=(*batch["cls_index"].shape, 3)).astype(np.float32)
  out = {}
  for impl in ("einsum", "xla"):
    model = models.SequenceClassifier(cfg.replace(attention=impl))
    logits = lambda p: model.apply({"params": p}, **batch)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(weights * logits(p))))(params)
    encoder = Encoder(cfg.replace(attention=impl))
    hidden = jax.jit(lambda p: encoder.apply({"params": p}, *list(batch.values())[:4]))(params["encoder"])
    out[impl] = (np.asarray(jax.jit(logits)(params)), grads, np.asarray(hidden))
  (want, want_grads, want_hidden), (got, got_grads, got_hidden) = out["einsum"], out["xla"]
  assert np.abs(got - want).max() <= 1e-6 and np.abs(want).max() > 0.1
  assert np.abs(got_hidden - want_hidden).max() <= 1e-6 and got_hidden.shape == (*batch["input_ids"].shape, 32)
  want_flat, got_flat = np.asarray(ravel_pytree(want_grads)[0]), np.asarray(ravel_pytree(got_grads)[0])
  assert np.abs(got_flat - want_flat).max() <= 1e-6 * np.abs(want_flat).max()
  read_out_query = want_grads["encoder"]["layer_1"]["attention"]["qkv" if family == "modernbert" else "query"]
  read_out_query = read_out_query["kernel"]
  assert np.abs(read_out_query).max() > 1e-2  # gradients reach the read-out layer's attention


def test_fused_attention_refuses_attention_dropout_at_trace_time():
  """A hand-built config with a fused implementation and attention dropout fails in training instead of
  silently training without that dropout; evaluation (deterministic) is fine."""
  cfg = tiny_cfg(attention_dropout=0.1, attention="xla")
  model = models.SequenceClassifier(cfg)
  params = models.init_params(cfg)
  batch = unpacked_batch(np.random.default_rng(1))
  assert model.apply({"params": params}, **batch).shape == (3, 1, 3)
  with pytest.raises(UserError, match="attention 'xla' cannot apply attention dropout"):
    model.apply({"params": params}, **batch, deterministic=False, rngs={"dropout": jax.random.key(0)})


def test_auto_attention_choices():
  f32, bf16 = tiny_cfg(), tiny_cfg(dtype="bfloat16")
  measured = models.config.CPU_ATTENTION
  # CPU: the measured path, except einsum for a train step with attention dropout.
  cpu = resolve_attention("auto", f32.replace(attention_dropout=0.1), backend="cpu")
  assert (cpu.train, cpu.eval) == ("einsum", measured) and "attention dropout 0.1" in cpu.train_why
  why = "auto: xla measured no faster on CPU"
  assert resolve_attention("auto", bf16, backend="cpu") == Attention(measured, measured, why, why) == \
      resolve_attention("auto", f32, backend="cpu")
  # A CUDA GPU: cuDNN where it fits (bfloat16, head size a multiple of 8 up to 128); the train step of a
  # model with attention dropout stays on einsum.
  gpu = lambda cfg, name="auto": resolve_attention(name, cfg, backend="gpu")
  cuda = "bertjax.models.config.cudnn_available"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(cuda, lambda backend=None: backend == "gpu")
    assert (gpu(bf16).train, gpu(bf16).eval) == ("cudnn", "cudnn")
    assert (gpu(bf16.replace(attention_dropout=0.1)).train, gpu(bf16.replace(attention_dropout=0.1)).eval) == \
        ("einsum", "cudnn")
    assert gpu(f32).eval_why == f"{why}; not cudnn: it takes bfloat16 (or float16) inputs, and model.dtype is float32"
    assert gpu(f32).eval == measured and gpu(bf16.replace(hidden_size=48, num_heads=4)).eval == measured  # head 12
    assert gpu(bf16.replace(hidden_size=1024, num_heads=4)).eval == measured  # head 256
    assert gpu(bf16, "cudnn").train == "cudnn" and gpu(bf16, "einsum").eval == "einsum"
    with pytest.raises(UserError, match="model.attention=cudnn cannot run this model: it takes bfloat16"):
      gpu(f32, "cudnn")
    with pytest.raises(UserError, match="head size must be a multiple of 8 and at most 128, got 12"):
      gpu(bf16.replace(hidden_size=48), "cudnn")
    # DeBERTa adds its position terms to materialised scores: einsum everywhere.
    assert gpu(bf16.replace(architecture="deberta")) == Attention("einsum", "einsum", "DeBERTa: einsum only",
                                                                  "DeBERTa: einsum only")


@pytest.mark.parametrize("name,cfg,match", [
    ("flash", tiny_cfg(), "model.attention must be one of auto, einsum, xla, cudnn, got 'flash'"),
    ("cudnn", tiny_cfg(dtype="bfloat16"), "model.attention=cudnn needs a CUDA GPU"),
    ("xla", tiny_cfg(attention_dropout=0.1), "model.attention=xla has no attention dropout, and the model's is "
                                             "0.1: set model.attention_dropout=0.0, or model.attention=einsum"),
    ("xla", tiny_cfg(architecture="deberta"), "model.attention=xla is not implemented for DeBERTa's disentangled"),
])
def test_attention_refusals_on_this_cpu(name, cfg, match):
  with pytest.raises(UserError, match=match) as e:
    resolve_attention(name, cfg)  # the tests' backend: cpu
  assert "\n" not in str(e.value)


def test_attention_dropout_override():
  assert resolve_attention_dropout(-1.0, 0.1) == 0.1
  assert resolve_attention_dropout(0.0, 0.1) == 0.0 and resolve_attention_dropout(0.25, 0.1) == 0.25
  for bad in (1.0, -0.5, 2.0):
    with pytest.raises(UserError, match=f"model.attention_dropout must be -1 .* got {bad}"):
      resolve_attention_dropout(bad, 0.1)


def test_deterministic_ops_decision():
  on, why = cli_setup.deterministic_ops("auto", "cpu")
  assert on and "cpu steps are deterministic" in why
  on, why = cli_setup.deterministic_ops("auto", "gpu")
  assert not on and "train.deterministic=true for bitwise resume" in why
  assert cli_setup.deterministic_ops("false", "gpu")[0] is False
  flag = cli_setup.DETERMINISTIC_FLAG
  assert cli_setup.deterministic_ops("true", "gpu", f"--xla_foo=1 {flag}") == \
      (True, f"train.deterministic=true: {flag}")
  with pytest.raises(UserError, match="train.deterministic=true on a GPU needs XLA_FLAGS=--xla_gpu_deterministic"):
    cli_setup.deterministic_ops("true", "gpu", "--xla_foo=1")
  with pytest.raises(UserError, match="train.deterministic must be one of auto, true, false, got 'yes'"):
    cli_setup.deterministic_ops("yes", "cpu")
  # The flag goes into XLA_FLAGS (before jax starts) only for `true`, replacing another value of it.
  assert cli_setup.xla_flags_for("true", "") == flag
  assert cli_setup.xla_flags_for("true", "--a=1 --xla_gpu_deterministic_ops=false") == f"--a=1 {flag}"
  assert cli_setup.xla_flags_for("auto", "--a=1") == "--a=1" == cli_setup.xla_flags_for("false", "--a=1")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return demo_setup(tmp_path_factory.mktemp("attention"), 64, 24, seed=0)


def test_trainer_start_line_and_refusal(demo, tmp_path):
  """The tiny demo BERT has attention dropout 0.1: `auto` trains with einsum and evaluates with the measured
  path, and says so; with model.attention_dropout=0.0, model.attention=xla trains and evaluates with xla;
  with the checkpoint's dropout it is refused before anything is written."""
  _, data, model = demo
  trainer = Trainer(demo_config(data, model), str(tmp_path / "a"))
  assert (trainer.model.cfg.attention, trainer.eval_model.cfg.attention) == ("einsum", "einsum")
  assert trainer.model.cfg.attention_dropout == 0.1
  line = [l for l in run_summary.start_lines(trainer, 0) if l.startswith("attention:")]
  assert line == ["attention: train einsum (auto: attention dropout 0.1 needs it), eval einsum (auto: xla measured "
                  "no faster on CPU); deterministic ops on (cpu steps are deterministic)"]
  off = Trainer(demo_config(data, model, **{"model.attention_dropout": 0.0, "model.attention": "xla"}),
                str(tmp_path / "a"))
  assert (off.model.cfg.attention, off.eval_model.cfg.attention, off.model.cfg.attention_dropout) == \
      ("xla", "xla", 0.0)
  with pytest.raises(UserError, match="model.attention=xla has no attention dropout, and the model's is 0.1"):
    Trainer(demo_config(data, model, **{"model.attention": "xla"}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
