"""A 2x2 grid (learning rate x seed) for the tiny random BERT of the tests; 4 trials of a few steps each.

  python -m bertjax.sweep --config configs/demo.py:tiny --sweep configs/sweeps/tiny_grid.py --workdir runs/sweep_tiny \
      --config.model.name_or_path=TINY_MODEL_DIR --config.train.max_steps=8
"""


def get_sweep():
  return {
      "grid": {
          "optimizer.learning_rate": [1e-3, 3e-3],
          "train.seed": [0, 1],
      },
      "metric": "best.accuracy",
      "mode": "max",
  }
