"""tensorflow-datasets sources without TensorFlow: a real SST-2 sample prepared as an array_record tfds
dataset in a temporary data_dir, read through `tfds.data_source` + grain, and trained on end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

from bertjax import trainer
from bertjax.data import sources
from bertjax.errors import UserError
from conftest import tiny_bert_with_tokenizer
from test_train import demo_config

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def _tsv_rows(path: Path, n: int) -> list[tuple[str, int]]:
  ex = sources.read_examples(path, "sentence", "label")
  return [(t[0], int(l)) for t, l in zip(ex.texts[:n], ex.labels[:n])]


class Sst2Sample(tfds.core.GeneratorBasedBuilder):
  """The first rows of the shared SST-2 files as a tfds dataset (splits train and validation)."""
  VERSION = tfds.core.Version("1.0.0")
  SIZES = {"train": 600, "validation": 200}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "sentence": tfds.features.Text(), "idx": tfds.features.Scalar(dtype=np.int32),
        "label": tfds.features.ClassLabel(names=["negative", "positive"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(SST2 / "train.tsv", self.SIZES["train"]),
            "validation": self._generate_examples(SST2 / "dev.tsv", self.SIZES["validation"])}

  def _generate_examples(self, path, n):
    for i, (sentence, label) in enumerate(_tsv_rows(path, n)):
      yield i, {"sentence": sentence, "label": label, "idx": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  if not (SST2 / "train.tsv").exists():
    pytest.skip(f"{SST2} not found (../shared beside the repo)")
  root = tmp_path_factory.mktemp("tfds")
  Sst2Sample(data_dir=str(root), file_format="array_record").download_and_prepare()
  return root


def test_tfds_split_reads_the_same_examples_as_the_tsv(data_dir):
  ex = sources.read_examples("tfds:sst2_sample:validation", "sentence", "label", tfds_data_dir=str(data_dir))
  assert ex.label_names == ["negative", "positive"] and len(ex) == 200
  got = sorted((t[0], names) for t, names in zip(ex.texts, ex.labels))
  want = sorted((s, str(l)) for s, l in _tsv_rows(SST2 / "dev.tsv", 200))
  assert got == want
  sliced = sources.read_examples("tfds:sst2_sample:train[:10%]", "sentence", "label", tfds_data_dir=str(data_dir))
  assert len(sliced) == 60
  # Each host's shard: only its block of records, numbered as in the whole split.
  shards = [sources.read_examples("tfds:sst2_sample:validation", "sentence", "label", tfds_data_dir=str(data_dir),
                                  shard=(k, 3)) for k in range(3)]
  assert [len(s) for s in shards] == [66, 67, 67] and [s.start for s in shards] == [0, 66, 133]
  assert sum((s.texts for s in shards), []) == ex.texts and sum((s.labels for s in shards), []) == ex.labels
  assert shards[1].line_numbers[0] == ex.line_numbers[66] == 67


def test_tfds_errors_are_one_line(data_dir):
  for spec, fields, match in [("tfds:no_such_dataset_xyz:train", "sentence", "cannot open tfds:no_such_dataset_xyz"),
                              ("tfds:sst2_sample:validation", "text", "feature 'text' not in .*sentence"),
                              ("tfds:sst2_sample:nosplit", "sentence", "cannot open tfds:sst2_sample:nosplit"),
                              ("tfds:sst2_sample", "sentence", "expected tfds:NAME")]:
    with pytest.raises(UserError, match=match) as e:
      sources.read_examples(spec, fields, "label", tfds_data_dir=str(data_dir))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_train_from_tfds(data_dir, tmp_path):
  model = tiny_bert_with_tokenizer(tmp_path / "model")
  c = demo_config(tmp_path, model)
  c.data.train, c.data.eval = "tfds:sst2_sample:train", "tfds:sst2_sample:validation"
  c.data.tfds_data_dir = str(data_dir)
  c.train.num_epochs = 2.0
  summary = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  labels = json.loads((tmp_path / "run" / "labels.json").read_text())
  assert labels["label_names"] == ["negative", "positive"]  # from the tfds ClassLabel, not "0"/"1"
  assert summary["finished"] and summary["num_train_examples"] == 600 and summary["num_eval_examples"] == 200
  assert summary["final"]["eval_loss"] > 0 and np.isfinite(summary["final"]["eval_loss"])
