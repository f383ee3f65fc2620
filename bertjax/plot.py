"""Train/eval loss and accuracy curves from `metrics.jsonl`.

  python -m bertjax.plot --workdir DIR     # writes DIR/curves.png
"""

import json
from pathlib import Path

from absl import flags

from bertjax.errors import UserError, exit_on_user_error


def read_metrics(workdir: Path) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise UserError(f"{path}: no such file (is {workdir} a training workdir?)")
  records = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if n != len(path.read_text().splitlines()):  # a killed run may leave half a last line
        raise UserError(f"{path}:{n}: not a JSON line") from None
  return records


def plot_metrics(workdir: Path) -> Path:
  """Loss (train and eval) and accuracy (or eval Pearson for regression) against step."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure
  records = read_metrics(workdir)
  series = lambda kind, key: [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
  fig = Figure(figsize=(10, 4))
  ax_loss, ax_acc = fig.subplots(1, 2)
  for kind, style in (("train", "-"), ("eval", "o-")):
    points = series(kind, "loss" if kind == "train" else "eval_loss")
    if points:
      ax_loss.plot(*zip(*points), style, label=f"{kind} loss")
    for key in ("accuracy", "pearson"):
      points = series(kind, key)
      if points:
        ax_acc.plot(*zip(*points), style, label=f"{kind} {key}")
  for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy / correlation")):
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.tight_layout()
  out = Path(workdir) / "curves.png"
  fig.savefig(out, dpi=100)
  return out


@exit_on_user_error
def main(argv):
  del argv
  if not flags.FLAGS.workdir:
    raise UserError("--workdir is required")
  print(plot_metrics(Path(flags.FLAGS.workdir)))


if __name__ == "__main__":
  from bertjax.cli_setup import run_cli
  flags.DEFINE_string("workdir", None, "Training workdir with metrics.jsonl.")
  run_cli(main)
