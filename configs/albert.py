"""ALBERT fine-tuning (Lan et al. 2020 GLUE settings: lr 1e-5..3e-5, batch 32, warmup ~6-10%).

  python -m bertjax.train --config configs/albert.py --config.data.train=train.csv --config.data.eval=dev.csv
Variants: `configs/albert.py:size=large`.
Data: your files, --config.data.train=train.csv --config.data.eval=dev.csv (any format of docs/data.md), or
GLUE from tensorflow-datasets: --config.data.train=tfds:glue/sst2:train --config.data.eval=tfds:glue/sst2:validation
(pip install 'bertjax[tfds]', prepared once with the network)."""

from bertjax.config_base import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, size="base")
  c = base_config()
  c.model.name_or_path = f"albert-{arg.size}-v2"
  c.optimizer.learning_rate = 3e-5
  c.optimizer.base_batch_size = 32  # the batch this learning rate is for (lr_scaling=auto)
  c.optimizer.warmup_fraction = 0.06
  c.train.num_epochs = 3.0
  return c
