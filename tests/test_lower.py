"""The real train and eval steps lowered for CUDA on this CPU-only machine (bertjax.lower), and
`python -m bertjax.train --lower_only=cuda`, which writes nothing."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import pytest

from bertjax import lower
from bertjax.trainer import Trainer
from conftest import demo_setup
from test_train import REPO, cli, demo_config

FMHA = "__cudnn$fmhaScaleBiasSoftmax"  # jax's cuDNN flash attention custom call (mask as bias), forward


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return demo_setup(tmp_path_factory.mktemp("lower"), 64, 24, seed=0)


def main_signature(text: str) -> str:
  return text[text.index("func.func public @main"):].split("\n")[0]


def test_sharded_bf16_steps_lower_for_cuda(setup):
  """On 4 fake devices (mesh data 2 x fsdp 2), the trainer's jitted train step (its shardings, its donated
  state) and the eval step lower for cuda with bfloat16 compute and the xla attention: every state leaf is
  donated (aliased to an output), the batch is split over both mesh axes, the fsdp-sharded leaves are the
  ones the partition rule picks, the attention's score products take bf16 operands with float32 sums,
  and nothing lowers to a custom call (no host-specific kernel)."""
  _, data, model = setup
  script = textwrap.dedent(f"""
      import json, re, sys
      import jax
      jax.config.update("jax_num_cpu_devices", 4)
      sys.path.insert(0, "tests")
      from test_train import demo_config
      from bertjax import lower
      from bertjax.trainer import Trainer
      config = demo_config({str(data)!r}, {str(model)!r}, **{{"model.dtype": "bfloat16", "model.attention": "xla",
                           "model.attention_dropout": 0.0, "mesh.data": 2, "mesh.fsdp": 2}})
      trainer = Trainer(config, {str(setup[0] / "w")!r}, token_cache=False)
      state = trainer.abstract_state()
      fsdp = sum("fsdp" in str(a.sharding.spec) for a in jax.tree.leaves(state))
      steps = lower.lower_steps(trainer, "cuda")
      print(json.dumps({{"state_leaves": len(jax.tree.leaves(state)), "fsdp_leaves": fsdp,
                         "layers": trainer.model_cfg.num_layers, "attention": [trainer.attention.train,
                         trainer.attention.eval], "steps": [[s.name, s.shape, s.text] for s in steps]}}))
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  assert out["attention"] == ["xla", "xla"]
  (train_name, _, train), (eval_name, _, evaluation) = out["steps"]  # packed rows: one shape each
  assert (train_name, eval_name) == ("train step", "eval step")
  bf16_scores = r"stablehlo.dot_general .*lhs_precision_type = bf16, rhs_precision_type = bf16, accumulation_type = f32"
  for text in (train, evaluation):
    assert "mhlo.num_partitions = 4" in text and 'sdy.mesh @mesh = <["data"=2, "fsdp"=2]>' in text
    assert "custom_call" not in text
  # Rows split over both axes: the batch (one int32 array), and eval's logits and example ids.
  assert main_signature(train).count('[{"data", "fsdp"}') == 1
  assert main_signature(evaluation).count('[{"data", "fsdp"}') == 1 + 2
  signature = main_signature(train)
  assert signature.count("tf.aliasing_output") == out["state_leaves"] > 100
  assert signature.count('{"fsdp"}') == 2 * out["fsdp_leaves"] > 0  # in the state argument and the new state
  # Forward: one score product per layer; backward: its two gradient products. Eval: forward only.
  assert len(re.findall(bf16_scores, train)) == 3 * out["layers"]
  assert len(re.findall(bf16_scores, evaluation)) == out["layers"]
  assert "tf.aliasing_output" not in main_signature(evaluation) and len(train) > 100_000


def test_cudnn_attention_lowers_for_cuda(setup, monkeypatch):
  """With `model.attention=auto` on a (pretended) CUDA GPU, bf16 and no attention dropout, the steps lower
  to cuDNN's fused attention: one forward call per layer, and in training one backward call per layer.
  Unpacked rows make the read-out layer's query count 1, which cuDNN trains on only when padded to an even
  count (jax checks it while tracing). jax probes the cuDNN version while tracing, so it is pretended too."""
  from jax._src.cudnn import fused_attention_stablehlo

  class CudnnVersion:
    cudnn_get_version = staticmethod(lambda: 91000)

  monkeypatch.setattr(fused_attention_stablehlo, "cuda_versions", CudnnVersion)
  monkeypatch.setattr("bertjax.models.config.cudnn_available", lambda backend=None: True)
  _, data, model = setup
  config = demo_config(data, model, **{"model.dtype": "bfloat16", "model.attention_dropout": 0.0,
                                       "data.packing": False})
  trainer = Trainer(config, str(setup[0] / "w"), token_cache=False)
  assert (trainer.attention.train, trainer.attention.eval) == ("cudnn", "cudnn")
  steps = lower.lower_steps(trainer, "cuda")
  layers = trainer.model_cfg.num_layers
  assert {s.name for s in steps} == {"train step", "eval step"}
  for step in steps:
    assert step.text.count(f"@{FMHA}(") == layers
    assert step.text.count(f"@{FMHA}Backward(") == (layers if step.name == "train step" else 0)
  assert not (setup[0] / "w").exists()


@pytest.mark.slow
def test_lower_only_cli_writes_nothing(setup, tmp_path):
  _, data, model = setup
  workdir = tmp_path / "run"
  # train.deterministic=true puts --xla_gpu_deterministic_ops=true in XLA_FLAGS, which the CPU build accepts.
  result = cli(workdir, data, model, "--lower_only=cuda", "--config.train.deterministic=true")
  assert result.returncode == 0, result.stderr[-3000:]
  assert not workdir.exists() and not list(tmp_path.iterdir())
  lines = result.stdout.splitlines()
  assert re.fullmatch(r"lowered for cuda on mesh \{'data': 1, 'fsdp': 1\}: 1,011,426 parameters", lines[0])
  train = re.fullmatch(r"train step \[\d+, \d+\]: ([\d.]+) model GFLOP per call, StableHLO (\d+) KiB, (\d+) ops",
                       lines[1])
  assert train and float(train[1]) > 0 and int(train[2]) > 100 and int(train[3]) > 1000
  assert re.fullmatch(r"eval step \[\d+, \d+\]: [\d.]+ model GFLOP per call, StableHLO \d+ KiB, \d+ ops", lines[2])
  assert "attention: train einsum (auto: attention dropout 0.1 needs it)" in result.stderr
  assert "deterministic ops on (cpu steps are deterministic)" in result.stderr
  bad = cli(workdir, data, model, "--lower_only=metal")
  assert bad.returncode == 2 and "error: --lower_only must be one of cuda, rocm, tpu, cpu, got 'metal'" in bad.stderr
  assert not workdir.exists()
