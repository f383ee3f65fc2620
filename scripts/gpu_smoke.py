"""The first command on a GPU machine: does jax see the GPUs the job asked for, and how fast does bertjax train?

  bash scripts/gpu_smoke.sh [--steps 100] [--batch 1024] [--expected_devices N]
  bash scripts/gpu_smoke.sh --cpu      # the same path on the CPU with a tiny model (what the tests run)

Prints the devices and their kinds, builds a random BERT-base-sized model (12 layers x 768, all-MiniLM-L6-v2's
WordPiece vocabulary), generates short labelled sentences (bertjax.demo_data), then trains `--steps` steps at
`--batch` with packing through the real `python -m bertjax.train` and prints what that run reports: resolved
dtypes and attention, compile time, memory per device, examples/s, input-wait fraction and MFU. Then an A/B of
the attention implementations (`--ab_steps` steps each, attention dropout off so that every implementation can
run the train step). Writes everything to OUT/smoke.json. Exits 1 with the reason when jax sees no GPU, or not
the number the job asked for (the trainer's own device check; --expected_devices for launchers it cannot read).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATTENTIONS = ("einsum", "xla", "cudnn")


def devices() -> dict:
  import jax
  return {"backend": jax.default_backend(), "process_count": jax.process_count(),
          "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
          "kinds": sorted({d.device_kind for d in jax.devices()}), "jax": jax.__version__}


def random_model(folder: Path, tiny: bool) -> Path:
  """A randomly initialised BERT (BERT-base sized, or tiny) with MiniLM's tokenizer, as a Hugging Face folder."""
  if (folder / "config.json").exists():
    return folder
  from transformers import AutoTokenizer
  from bertjax.config_base import minilm_path
  from bertjax.models import hf_weights
  from bertjax.models.config import from_hf_config
  tokenizer = AutoTokenizer.from_pretrained(minilm_path())
  size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if tiny else
          dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072))
  hf = dict(model_type="bert", vocab_size=tokenizer.vocab_size, max_position_embeddings=512, type_vocab_size=2,
            hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
            initializer_range=0.02, pad_token_id=0, num_labels=2, **size)
  cfg = from_hf_config(hf)
  hf_weights.save(folder, cfg, hf_weights.init_params(cfg, seed=0), hf)
  tokenizer.save_pretrained(str(folder))
  return folder


def train(out: Path, name: str, model: Path, data: Path, steps: int, batch: int, extra: list[str]) -> dict:
  """One `python -m bertjax.train` run of `steps` steps; its summary, start lines and compile line."""
  workdir = out / name
  cmd = [sys.executable, "-m", "bertjax.train", f"--config={REPO}/configs/demo.py:data_dir={data}",
         f"--workdir={workdir}", f"--config.model.name_or_path={model}", f"--config.train.max_steps={steps}",
         f"--config.train.global_batch_size={batch}", f"--config.train.eval_batch_size={batch}",
         f"--config.train.log_every_steps={max(steps // 4, 1)}", "--config.data.max_length=128", *extra]
  t = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = proc.stderr.splitlines()
  if proc.returncode != 0:
    return {"name": name, "ok": False, "exit_code": proc.returncode,
            "error": next((l for l in reversed(lines) if l.startswith("error:")), "\n".join(lines[-5:]))}
  summary = json.loads((workdir / "summary.json").read_text())
  start = [l for l in lines if l.startswith(("model:", "data:", "optimizer:", "attention:", "deterministic:"))]
  compiled = next((l for l in lines if l.startswith("train step: compiled")), "")
  return {"name": name, "ok": True, "wall_seconds": time.time() - t, "start_lines": start, "compile_line": compiled,
          **{k: summary.get(k) for k in ("train_examples_per_sec", "train_tokens_per_sec", "mfu", "mfu_peak_source",
                                          "input_wait_fraction", "padding_fraction", "compile_seconds",
                                          "num_compilations", "mean_examples_per_step", "steps")}}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--ab_steps", type=int, default=30)
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--examples", type=int, default=60000, help="generated training sentences")
  parser.add_argument("--expected_devices", type=int, default=None)
  parser.add_argument("--out", default="runs/gpu_smoke")
  parser.add_argument("--cpu", action="store_true", help="the dry path on the CPU: tiny model, few steps")
  args = parser.parse_args()
  if args.cpu:
    os.environ["JAX_PLATFORMS"] = "cpu"
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  report = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "devices": devices(), "runs": []}
  d = report["devices"]
  print(f"jax {d['jax']}: backend {d['backend']}, {d['device_count']} devices ({d['local_device_count']} in this "
        f"process, {d['process_count']} processes): {', '.join(d['kinds'])}")
  if d["backend"] == "cpu" and not args.cpu:
    print("gpu_smoke: jax sees no GPU (install the CUDA build: pip install -e '.[cuda12]'; check nvidia-smi and "
          "CUDA_VISIBLE_DEVICES); --cpu runs the dry path on the CPU", file=sys.stderr)
    return 1
  from bertjax import demo_data
  data = out / "data"
  if not (data / "train.tsv").exists():
    demo_data.write(data, args.examples, 2000, seed=0)
  model = random_model(out / ("tiny_bert" if args.cpu else "bert_base_random"), tiny=args.cpu)
  expected = [f"--expected_devices={args.expected_devices}"] if args.expected_devices else []
  main_run = train(out, "main", model, data, args.steps, args.batch, expected + ["--config.data.packing=true"])
  report["runs"].append(main_run)
  if not main_run["ok"]:
    print(f"gpu_smoke: the training run failed: {main_run['error']}", file=sys.stderr)
    (out / "smoke.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1
  for line in main_run["start_lines"] + [main_run["compile_line"]]:
    print(line)
  print(f"{args.steps} steps at batch {args.batch}: {main_run['train_examples_per_sec']:.1f} examples/s, "
        f"{main_run['train_tokens_per_sec']:.0f} tokens/s, MFU {main_run['mfu']:.1%} ({main_run['mfu_peak_source']}), "
        f"input wait {main_run['input_wait_fraction']:.1%}, padding {main_run['padding_fraction']:.1%}")
  print(f"attention A/B ({args.ab_steps} steps each, attention dropout 0):")
  for attention in ATTENTIONS:
    run = train(out, f"attention_{attention}", model, data, args.ab_steps, args.batch,
                [f"--config.model.attention={attention}", "--config.model.attention_dropout=0.0"])
    report["runs"].append(run)
    said = (f"{run['train_examples_per_sec']:.1f} examples/s, compile {run['compile_seconds']:.1f} s" if run["ok"]
            else f"not run: {run['error']}")
    print(f"  {attention:7s} {said}")
  (out / "smoke.json").write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {out / 'smoke.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
