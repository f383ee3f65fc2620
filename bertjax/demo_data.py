"""Generates the offline demo's labelled sentiment data (every sentence is made here, none copied).

Each review is built from a subject, an adjective (positive or negative), an optional negation
and an optional "but" clause; the label follows the clause after "but", with negation flipping
polarity. Pretrained weights know the words; the model still has to learn the composition.

  python -m bertjax.demo_data runs/demo_data [--train 2000 --dev 500 --seed 0]
"""

import argparse
import random
import sys
from pathlib import Path

from bertjax.files import atomic_write

SUBJECTS = ["the film", "this movie", "the acting", "the plot", "the soundtrack", "the ending", "the dialogue",
            "the cast", "the story", "the camera work", "the script", "the director's vision", "the pacing",
            "the visual effects", "the lead performance", "the second half", "the humor", "the characters"]
POSITIVE = ["wonderful", "moving", "brilliant", "delightful", "gripping", "charming", "superb", "funny",
            "beautiful", "clever", "heartfelt", "thrilling", "memorable", "fresh", "engaging", "touching"]
NEGATIVE = ["boring", "clumsy", "dull", "tedious", "awful", "predictable", "shallow", "messy", "flat",
            "forgettable", "painful", "lifeless", "confusing", "weak", "bland", "tiresome"]
VERBS = ["is", "was", "feels", "seemed", "turns out to be", "remains"]
INTENSIFIERS = ["", "", "really ", "truly ", "quite ", "rather ", "utterly ", "surprisingly "]


def clause(rng: random.Random) -> tuple[str, int]:
  positive = rng.random() < 0.5
  adjective = rng.choice(POSITIVE if positive else NEGATIVE)
  negated = rng.random() < 0.3
  verb = rng.choice(VERBS)
  neg = "not " if negated else ""
  text = f"{rng.choice(SUBJECTS)} {verb} {neg}{rng.choice(INTENSIFIERS)}{adjective}"
  return text, int(positive != negated)


def review(rng: random.Random) -> tuple[str, int]:
  first, label = clause(rng)
  if rng.random() < 0.35:
    second, label = clause(rng)
    first = f"{first} , but {second}"
  return first + " .", label


def write(out_dir: Path, num_train: int, num_dev: int, seed: int) -> None:
  rng = random.Random(seed)
  seen, rows = set(), []
  while len(rows) < num_train + num_dev:
    text, label = review(rng)
    if text not in seen:  # no sentence in both train and dev
      seen.add(text)
      rows.append((text, label))
  out_dir.mkdir(parents=True, exist_ok=True)
  for name, part in (("train.tsv", rows[:num_train]), ("dev.tsv", rows[num_train:])):
    with atomic_write(out_dir / name) as f:  # whole or absent: processes started together may race
      f.write("sentence\tlabel\n")
      f.writelines(f"{t}\t{y}\n" for t, y in part)


def ensure(out_dir: Path) -> None:
  """Writes the default data set (2000 train, 500 dev, seed 0) to `out_dir` unless its files are there: the
  demo config calls this, so that `python -m bertjax.train --config configs/demo.py` runs in a fresh clone."""
  out_dir = Path(out_dir)
  if (out_dir / "train.tsv").exists() and (out_dir / "dev.tsv").exists():
    return
  write(out_dir, 2000, 500, seed=0)
  print(f"demo: wrote 2000 train and 500 dev examples to {out_dir}", file=sys.stderr)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir", type=Path)
  parser.add_argument("--train", type=int, default=2000)
  parser.add_argument("--dev", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  write(args.out_dir, args.train, args.dev, args.seed)
  print(f"wrote {args.train} train and {args.dev} dev examples to {args.out_dir}")


if __name__ == "__main__":
  main()
