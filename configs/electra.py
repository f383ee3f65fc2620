"""ELECTRA fine-tuning (Clark et al. 2020: lr 1e-4 base, layer-wise LR decay 0.8, 10% warmup, 3 epochs).

  python -m bertjax.train --config configs/electra.py --config.data.train=train.csv --config.data.eval=dev.csv
Variants: `configs/electra.py:size=large` (lr 5e-5, layer-wise decay 0.9).
Data: your files, --config.data.train=train.csv --config.data.eval=dev.csv (any format of docs/data.md), or
GLUE from tensorflow-datasets: --config.data.train=tfds:glue/sst2:train --config.data.eval=tfds:glue/sst2:validation
(pip install 'bertjax[tfds]', prepared once with the network)."""

from bertjax.config_base import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, size="base")
  c = base_config()
  c.model.name_or_path = f"google/electra-{arg.size}-discriminator"
  large = arg.size == "large"
  c.optimizer.learning_rate = 5e-5 if large else 1e-4
  c.optimizer.base_batch_size = 32  # the batch this learning rate is for (lr_scaling=auto)
  c.optimizer.layerwise_lr_decay = 0.9 if large else 0.8
  c.optimizer.warmup_fraction = 0.1
  c.optimizer.eps = 1e-6
  c.train.num_epochs = 3.0
  return c
