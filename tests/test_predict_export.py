"""Predicting from a workdir, an export or a plain checkpoint; the export loads in PyTorch with the same logits."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertjax import demo_data, trainer
from bertjax.errors import UserError
from bertjax.predict import input_options, load_model, predict_logits, read_input
from conftest import tiny_bert_with_tokenizer
from test_train import demo_config

REPO = Path(__file__).resolve().parents[1]
LONG = " ".join(["the acting was wonderful but the ending felt rather flat and the pacing was slow"] * 4)


def _run(module, *args, stdin=None):
  return subprocess.run([sys.executable, "-m", f"bertjax.{module}", *map(str, args)], cwd=REPO, capture_output=True,
                        text=True, timeout=300, input=stdin)


def _error_line(result):
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run on the demo data and its export (through the command line)."""
  root = tmp_path_factory.mktemp("predict")
  demo_data.write(root / "data", 512, 100, seed=0)
  base = tiny_bert_with_tokenizer(root / "base")
  workdir = root / "run"
  config = demo_config(root / "data", base, **{"train.max_steps": 96, "train.eval_every_steps": 96})
  trainer.train_and_evaluate(config, str(workdir))
  exported = root / "export"
  result = _run("export", "--workdir", workdir, "--output", exported)
  assert result.returncode == 0, result.stderr[-3000:]
  return root, base, workdir, exported


def _torch_logits(folder, first, second=None, max_length=128):
  import torch
  from transformers import AutoModelForSequenceClassification, AutoTokenizer
  model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
  tok = AutoTokenizer.from_pretrained(str(folder))
  enc = tok(first, second, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
  with torch.no_grad():
    return model(**enc).logits.numpy(), model.config, enc["input_ids"].shape[1]


@pytest.mark.slow
def test_export_loads_in_torch_and_matches_predict(trained):
  root, _, workdir, exported = trained
  texts = [l.split("\t")[0] for l in (root / "data" / "dev.tsv").read_text().splitlines()[1:41]] + [LONG]
  (root / "in.txt").write_text("\n".join(texts) + "\n")
  result = _run("predict", "--model", exported, "--input", root / "in.txt", "--output", root / "out.jsonl")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "examples/sec" in result.stderr
  rows = [json.loads(l) for l in (root / "out.jsonl").read_text().splitlines()]
  assert [r["line"] for r in rows] == list(range(1, len(texts) + 1))
  ours = np.array([r["logits"] for r in rows])
  theirs, config, width = _torch_logits(exported, texts, max_length=32)  # the run's data.max_length
  assert width == 32, "the long text should need truncation"
  assert config.id2label == {0: "0", 1: "1"} and config.label2id == {"0": 0, "1": 1}
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert np.abs(ours[:, 0] - ours[:, 1]).max() > 0.1, "an untrained head would make this comparison weak"
  for r in rows:
    assert r["label_id"] == int(np.argmax(r["logits"])) and r["label"] == str(r["label_id"])
    assert sum(r["probs"]) == pytest.approx(1.0)
  # The workdir itself (orbax checkpoint, packed batches) predicts the same at the same numerics. A Hugging
  # Face folder predicts in float32; a workdir as its run computed (model.matmul_dtype=auto: bfloat16
  # operands on a CPU with bf16 dot instructions), which moves the logits by about bfloat16's precision.
  model = load_model(workdir)
  examples, skipped = read_input(model.data, model.num_texts, str(root / "in.txt"))
  logits, stats = predict_logits(model, examples, batch_size=16)
  np.testing.assert_allclose(logits, ours, atol=3e-2)
  assert not skipped and stats["num_examples"] == len(texts) and stats["examples_per_sec"] > 0
  model.model_cfg = model.model_cfg.replace(matmul_dtype="float32")
  np.testing.assert_allclose(predict_logits(model, examples, batch_size=16)[0], ours, atol=1e-5)


@pytest.mark.slow
def test_plain_checkpoint_with_pairs(trained, tmp_path, monkeypatch):
  root, base, _, _ = trained
  headed = tiny_bert_with_tokenizer(tmp_path / "headed", num_labels=3, seed=1, with_head=True)
  pairs = [("a great film .", "the plot was dull"), ("the acting was flat", " ".join([LONG] * 3)),
           ("charming", "a moving story .")]
  (tmp_path / "pairs.tsv").write_text("premise\thypothesis\n" + "".join(f"{a}\t{b}\n" for a, b in pairs))
  model = load_model(headed, text_fields=["premise", "hypothesis"])
  assert model.data.max_length == 128 and model.label_names == ["LABEL_0", "LABEL_1", "LABEL_2"]
  from_tsv, _ = predict_logits(model, read_input(model.data, 2, str(tmp_path / "pairs.tsv"))[0])
  monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{a}\t{b}\n" for a, b in pairs)))
  from_stdin, _ = predict_logits(model, read_input(*input_options(headed), "-")[0])  # pairs told by the input
  theirs, _, width = _torch_logits(headed, [a for a, _ in pairs], [b for _, b in pairs])
  assert width == 128
  np.testing.assert_allclose(from_tsv, theirs, atol=1e-4)
  np.testing.assert_allclose(from_stdin, theirs, atol=1e-4)
  with pytest.raises(UserError, match="no classification head"):
    load_model(base)


@pytest.mark.slow
def test_malformed_line_stops_or_is_skipped(trained):
  root, _, workdir, _ = trained
  bad = root / "bad.txt"
  bad.write_text("a fine film .\nthe plot was dull .\ntoo\tmany\tfields\nthe ending was moving .\n")
  out = root / "bad.jsonl"
  line = _error_line(_run("predict", "--model", workdir, "--input", bad, "--output", out))
  assert f"{bad}:3:" in line and "found 3 fields" in line
  assert not out.exists() and not list(root.glob(".bad.jsonl*"))
  result = _run("predict", "--model", workdir, "--input", bad, "--output", out, "--skip_bad_lines")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"skipped 1 bad line: {bad}:3:" in result.stderr
  assert [json.loads(l)["line"] for l in out.read_text().splitlines()] == [1, 2, 4]


@pytest.mark.parametrize("name,content,where", [
    ("in.tsv", "sentence\tlabel\ngood film\t1\nbad film\n\t0\nfine film\t1\n", 3),
    ("in.jsonl", '{"sentence": "good film"}\n{"sentence": "bad film"\n{"sentence": "fine film"}\n', 2),
    ("in.txt", "good film\n   \nfine film\n", 2),
])
def test_bad_rows_in_each_format(trained, tmp_path, name, content, where):
  _, _, _, exported = trained
  options = input_options(exported)  # text_fields=sentence, one text, from bertjax.json
  assert tuple(options[0].text_fields) == ("sentence",) and options[1] == 1
  path = tmp_path / name
  path.write_text(content)
  with pytest.raises(UserError, match=f"{name}:{where}: ") as e:
    read_input(*options, str(path))
  assert "\n" not in str(e.value)
  examples, skipped = read_input(*options, str(path), skip_bad_lines=True)
  assert [t[0] for t in examples.texts][0] == "good film" and examples.texts[-1] == ("fine film",)
  assert skipped[0].startswith(f"{path}:{where}: ")
