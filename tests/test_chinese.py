"""Chinese news titles (THUCNews, 10 classes) end to end with a bert-base-chinese style vocabulary:
one token per Chinese character, ids-as-labels files with a class-names file, train -> eval -> predict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertjax import trainer
from bertjax.data.tokenizer import load_tokenizer
from test_train import REPO, demo_config

THUC = Path(__file__).resolve().parents[2] / "shared" / "data" / "thucnews_titles"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def chinese_bert(folder: Path, rows: list[str]) -> Path:
  """A tiny random BERT whose WordPiece vocabulary is the characters of `rows` plus ASCII, as
  bert-base-chinese's is (CJK characters are split one per token before WordPiece)."""
  import torch
  import transformers as tr
  from conftest import TINY
  chars = sorted({c for row in rows for c in row.lower() if not c.isspace()} |
                 set("abcdefghijklmnopqrstuvwxyz0123456789"))
  folder.mkdir(parents=True)
  (folder / "vocab.txt").write_text("\n".join(SPECIALS + chars) + "\n", encoding="utf-8")
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
       "model_max_length": 512}))
  torch.manual_seed(0)
  cfg = tr.BertConfig(**dict(TINY, max_position_embeddings=64, initializer_range=0.02),
                      vocab_size=len(SPECIALS) + len(chars))
  tr.BertModel(cfg).save_pretrained(folder, safe_serialization=True)
  return folder


@pytest.fixture(scope="module")
def thucnews(tmp_path_factory):
  if not (THUC / "dev.txt").exists():
    pytest.skip(f"{THUC} not found (../shared beside the repo)")
  root = tmp_path_factory.mktemp("thuc")
  lines = (THUC / "dev.txt").read_text(encoding="utf-8").splitlines()
  rng = np.random.default_rng(0)
  picked = [lines[i] for i in rng.permutation(len(lines))[:3600]]
  (root / "train.txt").write_text("\n".join(picked[:3000]) + "\n", encoding="utf-8")
  (root / "dev.txt").write_text("\n".join(picked[3000:]) + "\n", encoding="utf-8")
  model = chinese_bert(root / "model", [l.split("\t")[0] for l in picked[:3000]])
  return root, model


def thuc_config(root: Path, model: Path):
  c = demo_config(root, model)
  c.data.train, c.data.eval = str(root / "train.txt"), str(root / "dev.txt")
  c.data.text_fields, c.data.label_field, c.data.has_header = (0,), "1", False  # as --config.data.label_field=1
  c.data.label_names_file = str(THUC / "class.txt")
  c.data.max_length = 48
  c.train.num_epochs, c.train.global_batch_size, c.train.log_every_steps = 6.0, 32, 20
  c.optimizer.learning_rate = 3e-3
  return c


def test_chinese_titles_tokenize_per_character(thucnews):
  root, model = thucnews
  tok = load_tokenizer(model)  # a vocab.txt alone: transformers converts it
  title = "同步A股首秀：港股缩量回调"
  pieces = tok.backend.encode(title).tokens
  assert pieces == ["[CLS]", "同", "步", "a", "股", "首", "秀", "：", "港", "股", "缩", "量", "回", "调", "[SEP]"]


@pytest.mark.slow
def test_chinese_news_topics_train_evaluate_predict(thucnews, tmp_path):
  root, model = thucnews
  workdir = tmp_path / "run"
  summary = trainer.train_and_evaluate(thuc_config(root, model), str(workdir))
  print(f"\nTHUCNews 3000 train titles, tiny BERT: final {summary['final']}")
  names = (THUC / "class.txt").read_text(encoding="utf-8").split()
  assert json.loads((workdir / "labels.json").read_text())["label_names"] == names
  losses = [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()
            if json.loads(l).get("kind", "train") == "train" and "learning_rate" in json.loads(l)]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
  # 10 balanced classes: chance is ~0.10; a tiny character model learns topics from title words.
  assert summary["final"]["accuracy"] > 0.35, summary["final"]
  assert summary["num_train_examples"] == 3000 and summary["num_eval_examples"] == 600

  titles = tmp_path / "titles.txt"
  titles.write_text("国足主帅公布世预赛名单\n央行宣布下调存款准备金率\n", encoding="utf-8")
  out = tmp_path / "pred.jsonl"
  result = subprocess.run([sys.executable, "-m", "bertjax.predict", f"--model={workdir}", f"--input={titles}",
                           f"--output={out}"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr[-2000:]
  preds = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
  assert len(preds) == 2 and all(p["label"] in names and len(p["probs"]) == 10 for p in preds)
  assert all(abs(sum(p["probs"]) - 1) < 1e-4 for p in preds)
