"""ModernBERT fine-tuning (Warner et al. 2024): the GLUE recipe Answer.AI publishes with the model
(examples/finetune_modernbert_on_glue.ipynb in AnswerDotAI/ModernBERT): AdamW lr 8e-5, betas (0.9, 0.98),
eps 1e-6, weight decay 8e-6, batch 32, 2 epochs, linear decay without warmup.

  python -m bertjax.train --config configs/modernbert.py --config.data.train=train.csv --config.data.eval=dev.csv
answerdotai/ModernBERT-base comes from the hub; offline, --config.model.name_or_path=/path/to/ModernBERT-base.
Data: your files (any format of docs/data.md), or GLUE from tensorflow-datasets:
--config.data.train=tfds:glue/sst2:train --config.data.eval=tfds:glue/sst2:validation.
Variant `configs/modernbert.py:size=large` keeps these settings (the notebook tunes base only).
Packing is ModernBERT's unpadding: several examples share a row, and rotary positions and the 128-token sliding
window count within each (bertjax.models.modernbert).
"""

from bertjax.config_base import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, size="base")
  c = base_config()
  c.model.name_or_path = f"answerdotai/ModernBERT-{arg.size}"
  c.train.global_batch_size = 32
  c.optimizer.base_batch_size = 32  # the batch this learning rate is for (lr_scaling=auto)
  c.train.num_epochs = 2.0
  c.optimizer.learning_rate = 8e-5
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 8e-6
  c.optimizer.warmup_fraction = 0.0
  return c
