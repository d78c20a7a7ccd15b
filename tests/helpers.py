"""Shared test fixtures: tiny models, variable-length data, and the full-batch reference."""

from __future__ import annotations

import copy

import torch
from torch import nn

from gradaccum import Accumulator

VOCAB = 48
IGNORE = -100


class TinyLM(nn.Module):
    """A plain (non-HF) causal LM-shaped module: ids [B, T] -> logits [B, T, V]."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        # A causal running mean gives each position a dependence on its prefix.
        h = torch.cumsum(h, dim=1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return self.head(torch.tanh(self.mix(h)))


def tiny_llama(dtype=torch.float64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(dtype)


def make_examples(lengths, masks, seed: int = 0):
    """Examples with the given lengths; masks[i] = how many leading tokens are prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for length, num_prompt in zip(lengths, masks):
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: min(num_prompt, length)] = IGNORE
        examples.append((ids, labels))
    return examples


def collate(examples):
    """Right-pad to the longest example; padded labels are ignored."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(lab)] = lab
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def logits_of(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits if hasattr(out, "logits") else out


def make_optimizer(kind: str, model, lr: float = None):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr or 0.5)
    return torch.optim.AdamW(model.parameters(), lr=lr or 1e-2, weight_decay=0.01)


def full_batch_reference(model, windows, optimizer_kind: str, normalize: str = "tokens",
                         max_grad_norm=None):
    """The definition: one optimizer step per window on the whole window as one batch."""
    model = copy.deepcopy(model)
    opt = make_optimizer(optimizer_kind, model)
    for window in windows:
        batch = collate(window)
        logits = logits_of(model, batch)[:, :-1]
        labels = batch["labels"][:, 1:]
        per_token = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                ignore_index=IGNORE, reduction="none").view(labels.shape)
        mask = labels != IGNORE
        if not mask.any():
            continue  # a window without targets takes no step (and would be 0/0)
        if normalize == "tokens":
            loss = per_token.sum() / mask.sum()
        else:
            has = mask.any(dim=1)
            loss = (per_token.sum(1)[has] / mask.sum(1)[has]).mean()
        opt.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
    return model


def accumulated(model, windows, optimizer_kind: str, micro_batch_size: int, accumulation: str = "exact",
                normalize: str = "tokens", max_grad_norm=None):
    """The same windows through Accumulator, cut into micro-batches of `micro_batch_size`."""
    model = copy.deepcopy(model)
    opt = make_optimizer(optimizer_kind, model)
    micro_batches = []
    for window in windows:
        assert len(window) % micro_batch_size == 0
        micro_batches += [collate(window[i:i + micro_batch_size]) for i in range(0, len(window), micro_batch_size)]
    acc = Accumulator(model, opt, accumulation_steps=len(windows[0]) // micro_batch_size,
                      accumulation=accumulation, normalize=normalize, max_grad_norm=max_grad_norm)
    stats = []
    for window in acc.windows(micro_batches):
        for batch in window:
            window.loss(logits_of(model, batch), batch["labels"]).backward()
        stats.append(window.step())
    return model, stats


def relative_error(model, reference, initial) -> float:
    """||w - w_ref|| / ||w_ref - w_0|| over all parameters: error relative to the update itself."""
    diff = sum(float((a.detach() - b.detach()).pow(2).sum()) for a, b in zip(model.parameters(), reference.parameters()))
    update = sum(float((b.detach() - c.detach()).pow(2).sum()) for b, c in zip(reference.parameters(), initial.parameters()))
    return (diff / update) ** 0.5
