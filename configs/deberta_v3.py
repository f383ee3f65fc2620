"""DeBERTa-v3 fine-tuning (He et al. 2023): AdamW, weight decay 0.01, Adam eps 1e-6, clipping 1.0, warmup then
linear decay; learning rate, epochs and warmup steps from the microsoft/deberta-v3-* model cards' GLUE command
(base: lr 2e-5, 500 warmup steps, 3 epochs, batch 8 x 8 = 64), within the paper's grid (lr 1.5e-5..3e-5 for base,
warmup {50, 100, 500, 1000} steps, batch 16..64).

  python -m bertjax.train --config configs/deberta_v3.py --config.data.train=train.csv --config.data.eval=dev.csv
microsoft/deberta-v3-base comes from the hub (its tokenizer is an spm.model: pip install sentencepiece); offline,
--config.model.name_or_path=/path/to/deberta-v3-base. Data: your files (any format of docs/data.md), or GLUE from
tensorflow-datasets: --config.data.train=tfds:glue/sst2:train --config.data.eval=tfds:glue/sst2:validation.
The warmup is the model card's step count as a share of its SST-2 run (it scales with any data set's length).
Variants: `configs/deberta_v3.py:size=large` (lr 6e-6, 50 warmup steps, 2 epochs), `size=small`, `size=xsmall`.
"""

from bertjax.config_base import base_config, parse_arg
from bertjax.errors import UserError

RECIPES = {"xsmall": (4.5e-5, 1000, 3.0), "small": (4.5e-5, 1500, 3.0), "base": (2e-5, 500, 3.0),
           "large": (6e-6, 50, 2.0)}  # size: (learning rate, warmup steps, epochs)
SST2_TRAIN_EXAMPLES = 67349


def get_config(arg=None):
  arg = parse_arg(arg, size="base")
  if arg.size not in RECIPES:
    raise UserError(f"unknown DeBERTa-v3 size {arg.size!r}; valid: {', '.join(RECIPES)}")
  lr, warmup_steps, epochs = RECIPES[arg.size]
  c = base_config()
  c.model.name_or_path = f"microsoft/deberta-v3-{arg.size}"
  c.train.global_batch_size = 64
  c.optimizer.base_batch_size = 64  # the batch this learning rate is for (lr_scaling=auto)
  c.train.num_epochs = epochs
  c.optimizer.learning_rate = lr
  # The warmup steps as a share of SST-2's steps (bertjax warms up over a fraction of training).
  c.optimizer.warmup_fraction = round(warmup_steps / (epochs * SST2_TRAIN_EXAMPLES / 64), 3)
  c.optimizer.weight_decay = 0.01
  c.optimizer.eps = 1e-6
  c.optimizer.clip_norm = 1.0
  return c
