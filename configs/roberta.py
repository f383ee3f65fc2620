"""RoBERTa fine-tuning (Liu et al. 2019 GLUE recipe: lr 1e-5..2e-5, batch 32, 6% warmup, 10 epochs, early
stopping after 3 evals without a better eval loss).

  python -m bertjax.train --config configs/roberta.py --config.data.train=train.csv --config.data.eval=dev.csv
roberta-base comes from the hub; offline, --config.model.name_or_path=/path/to/roberta-base.
Variants: `configs/roberta.py:size=large`.
Data: your files, --config.data.train=train.csv --config.data.eval=dev.csv (any format of docs/data.md), or
GLUE from tensorflow-datasets: --config.data.train=tfds:glue/sst2:train --config.data.eval=tfds:glue/sst2:validation
(pip install 'bertjax[tfds]', prepared once with the network)."""

from bertjax.config_base import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, size="base")
  c = base_config()
  c.model.name_or_path = f"roberta-{arg.size}"
  c.optimizer.learning_rate = 1e-5 if arg.size == "large" else 2e-5
  c.optimizer.base_batch_size = 32  # the batch this learning rate is for (lr_scaling=auto)
  c.optimizer.warmup_fraction = 0.06
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.train.num_epochs = 10.0
  c.train.early_stopping_patience = 3
  return c
