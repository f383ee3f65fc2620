"""MiniLM on SST-2, 1 epoch per trial: learning rate x batch size (3 x 2 = 6 trials), ranked by the
accuracy of each trial's best checkpoint (lowest eval loss).

  python -m bertjax.sweep --config configs/minilm_sst2.py --sweep configs/sweeps/minilm_sst2_lr.py \
      --workdir runs/sweep_minilm_sst2 \
      --config.data.train=../shared/data/sst2/train.tsv --config.data.eval=../shared/data/sst2/dev.tsv
Re-run the same command to resume; DIR/results.csv ranks the trials, DIR/plots/ shows accuracy vs each key.
Trials of one batch size differ only in their learning rate: with --parallel 3 they train together.
"""


def get_sweep():
  return {
      "grid": {
          "train.global_batch_size": [32, 64],
          "optimizer.learning_rate": [2e-5, 5e-5, 1e-4],
      },
      "metric": "best.accuracy",
      "mode": "max",
  }
