"""scripts/gpu_smoke.sh: the dry path on the CPU, and the refusal when jax sees no GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_path_trains_reports_and_compares_attention(tmp_path):
  out = tmp_path / "smoke"
  proc = subprocess.run(["bash", str(REPO / "scripts/gpu_smoke.sh"), "--cpu", "--steps", "4", "--ab_steps", "2",
                         "--batch", "32", "--examples", "600", "--out", str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHON": sys.executable})
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((out / "smoke.json").read_text())
  assert report["devices"]["backend"] == "cpu" and report["devices"]["device_count"] >= 1
  main, *ab = report["runs"]
  assert main["ok"] and main["steps"] == 4 and main["train_examples_per_sec"] > 0
  assert 0 <= main["input_wait_fraction"] < 1 and main["mean_examples_per_step"] > 0
  assert any(line.startswith("attention: train einsum") for line in main["start_lines"])
  assert main["compile_line"].startswith("train step: compiled in") and "per device" in main["compile_line"]
  assert [r["name"] for r in ab] == ["attention_einsum", "attention_xla", "attention_cudnn"]
  assert ab[0]["ok"] and ab[1]["ok"] and ab[0]["steps"] == ab[1]["steps"] == 2
  assert not ab[2]["ok"] and "needs a CUDA GPU" in ab[2]["error"]  # refused in one line on a CPU
  assert "attention A/B" in proc.stdout and "examples/s" in proc.stdout


def test_without_a_gpu_it_exits_1_with_the_reason(tmp_path):
  proc = subprocess.run(["bash", str(REPO / "scripts/gpu_smoke.sh"), "--out", str(tmp_path / "smoke")],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHON": sys.executable})  # also where REPO has no .venv
  assert proc.returncode == 1
  assert "jax sees no GPU" in proc.stderr and "[cuda12]" in proc.stderr
  assert not (tmp_path / "smoke" / "main").exists()  # nothing trained
