"""BERT fine-tuning (Devlin et al. 2019 recipe: lr 2e-5..5e-5, batch 32, 10% warmup, 3 epochs).

  python -m bertjax.train --config configs/bert.py --config.data.train=train.csv --config.data.eval=dev.csv
Variants: `configs/bert.py:name=bert-base-chinese` (any local folder or hub name).
Data: your files, --config.data.train=train.csv --config.data.eval=dev.csv (any format of docs/data.md), or
GLUE from tensorflow-datasets: --config.data.train=tfds:glue/sst2:train --config.data.eval=tfds:glue/sst2:validation
(pip install 'bertjax[tfds]', prepared once with the network)."""

from bertjax.config_base import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, name="bert-base-uncased")
  c = base_config()
  c.model.name_or_path = arg.name
  c.optimizer.learning_rate = 2e-5
  c.optimizer.base_batch_size = 32  # the batch this learning rate is for (lr_scaling=auto)
  c.optimizer.warmup_fraction = 0.1
  c.train.num_epochs = 3.0
  return c
