"""The Hugging Face PyTorch peer that `bertjax.bench` measures bertjax against.

A plain transformers training loop, as a user would write it: AutoModelForSequenceClassification
from the same folder, torch AdamW with the same hyper-parameters (no decay on biases and LayerNorm
weights, linear warmup then linear decay, grad-norm clipping), per-batch dynamic padding (what
DataCollatorWithPadding does) or `group_by_length` batches (transformers' LengthGroupedSampler:
megabatches of 50 batches sorted by length, longest batch first), optionally accumulating gradients over
micro-batches as the Trainer's gradient_accumulation_steps does. torch keeps its own thread
settings. With `bf16=True` its forward runs under torch.autocast(bfloat16) (the Trainer's `bf16=True`
on CPU). This is the only bertjax module that imports torch.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bertjax.data.tokenize import Tokenized
from bertjax.errors import UserError

MEGABATCH = 50  # batches per megabatch, transformers' default in get_length_grouped_indices


def length_grouped(ids: list[int], lengths: np.ndarray, batch_size: int) -> list[list[int]]:
  """Batches of `ids` (already shuffled) the way transformers' LengthGroupedSampler forms them."""
  size = MEGABATCH * batch_size
  mega = [sorted(ids[i:i + size], key=lambda j: -int(lengths[j])) for i in range(0, len(ids), size)]
  batches = [m[i:i + batch_size] for m in mega for i in range(0, len(m), batch_size)]
  # The longest batch goes first, so an out-of-memory error shows at once (kept for fidelity).
  longest = max(range(len(batches)), key=lambda b: int(lengths[batches[b][0]]))
  batches[0], batches[longest] = batches[longest], batches[0]
  return batches


def in_order(ids: list[int], batch_size: int) -> list[list[int]]:
  return [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]


def micro_slices(batch: list[int], micro_batch: int | None) -> list[list[int]]:
  """A batch's consecutive micro-batches (the whole batch when `micro_batch` is None or 0)."""
  return in_order(batch, micro_batch or len(batch))


class TorchPeer:
  """Model, optimizer and schedule; `train` and `evaluate` run timed blocks on given examples."""

  def __init__(self, folder: Path, num_labels: int, plan, seed: int = 0, bf16: bool = False):
    """`plan`: the bertjax run's `optim.OptimizerPlan`, so both train with the same resolved values (the
    learning rate, b2 and warmup after optimizer.lr_scaling)."""
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup
    if plan.name != "adamw" or plan.schedule != "linear" or plan.layer_decay != 1.0:
      raise UserError(f"the torch peer implements adamw with a linear schedule and no layer-wise decay; this run "
                      f"uses {plan.name} with a {plan.schedule} schedule and layerwise_lr_decay={plan.layer_decay} "
                      f"(set optimizer.name=adamw, schedule=linear, layerwise_lr_decay=1, or lr_scaling=none if "
                      f"the batch rule chose {plan.name})")
    hp = plan.hparams
    torch.manual_seed(seed)
    self.model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels)
    self.model.train()
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")  # norm.weight: ModernBERT
    named = list(self.model.named_parameters())
    groups = [{"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": hp["weight_decay"]},
              {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0}]
    self.optimizer = torch.optim.AdamW(groups, lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"])
    self.scheduler = get_linear_schedule_with_warmup(self.optimizer, hp["warmup_steps"], plan.total_steps)
    self.clip_norm = hp["clip_norm"]
    # DistilBERT and ModernBERT take no token_type_ids; DeBERTa-v3 and RoBERTa have no types to tell apart.
    self.token_types = getattr(self.model.config, "type_vocab_size", 0) > 1
    self.bf16 = bf16  # forward under torch.autocast(bfloat16), as the Hugging Face Trainer's bf16=True

  def autocast(self):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

  def collate(self, tokenized: Tokenized, labels: np.ndarray | None, batch: list[int]) -> dict:
    """Pads a batch to its own longest example (dynamic padding)."""
    longest = int(max(tokenized.lengths[i] for i in batch))
    ids = np.full((len(batch), longest), tokenized.pad_id, np.int64)
    types = np.zeros((len(batch), longest), np.int64)
    mask = np.zeros((len(batch), longest), np.int64)
    for r, i in enumerate(batch):
      n = int(tokenized.lengths[i])
      ids[r, :n], types[r, :n], mask[r, :n] = tokenized.ids(i), tokenized.type_ids(i), 1
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if self.token_types:
      out["token_type_ids"] = torch.from_numpy(types)
    if labels is not None:
      dtype = torch.float32 if labels.dtype.kind == "f" else torch.long
      out["labels"] = torch.as_tensor(labels[batch], dtype=dtype)
    return out

  def train(self, tokenized: Tokenized, labels: np.ndarray, batches: list[list[int]],
            micro_batch: int | None = None) -> dict:
    """One optimizer step per batch; the time includes collation, as in a DataLoader loop. With `micro_batch`,
    gradients accumulate over consecutive slices of that many examples, each padded to its own longest (the
    Trainer's per_device_train_batch_size with gradient_accumulation_steps); each slice's mean loss is weighted
    by its share of the batch, so the step's gradient is the whole batch's."""
    slots = 0
    t = time.perf_counter()
    for batch in batches:
      loss = 0.0
      for part in micro_slices(batch, micro_batch):
        inputs = self.collate(tokenized, labels, part)
        slots += inputs["input_ids"].numel()
        with self.autocast():
          part_loss = self.model(**inputs).loss * (len(part) / len(batch))
        part_loss.backward()
        loss = loss + part_loss.detach()
      if self.clip_norm:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
      self.optimizer.step()
      self.scheduler.step()
      self.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t
    if not torch.isfinite(loss):
      raise RuntimeError(f"torch peer: non-finite loss {float(loss)}")
    return {"seconds": seconds, "steps": len(batches), "slots": slots, "last_loss": float(loss)}

  def evaluate(self, tokenized: Tokenized, batch_size: int) -> dict:
    """no_grad inference over the split in order, dynamic padding; logits kept like an evaluator would."""
    self.model.eval()
    n = len(tokenized)
    out = []
    t = time.perf_counter()
    with torch.no_grad(), self.autocast():
      for batch in in_order(list(range(n)), batch_size):
        out.append(self.model(**self.collate(tokenized, None, batch)).logits.float().numpy())
    seconds = time.perf_counter() - t
    self.model.train()
    return {"seconds": seconds, "examples": n, "logits_shape": list(np.concatenate(out).shape)}
