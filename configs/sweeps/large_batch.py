"""Large-batch study (scripts/large_batch_study.sh): batch 256 and 1024, learning rate scaled linearly or by
the square root from 5e-5 at batch 32 (`optimizer.base_batch_size`), AdamW against LAMB: 8 trials.

  python -m bertjax.sweep --config configs/minilm_sst2.py --sweep configs/sweeps/large_batch.py \
      --workdir runs/large_batch/sweep --config.data.train=... --config.data.eval=...
Warmup is a fraction of the steps (`optimizer.warmup_fraction`), so it covers the same share of the data
at every batch size. Gradient accumulation (`train.grad_accum_steps`) fits batch 1024 on any device.
"""


def get_sweep():
  return {
      "grid": {
          "train.global_batch_size": [256, 1024],
          "optimizer.lr_scaling": ["linear", "sqrt"],
          "optimizer.name": ["adamw", "lamb"],
      },
      "metric": "best.accuracy",
      "mode": "max",
  }
