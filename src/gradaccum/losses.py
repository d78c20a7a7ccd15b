"""Sum-reduced token losses.

Every loss here returns a *sum* over target tokens, never a mean: the division by
the number of targets belongs to the Accumulator, which alone knows the count of
the whole window over all ranks. A mean taken here would bake in the very
per-micro-batch normalisation that makes naive accumulation wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool = True):
    """Align logits with the labels they predict: position t predicts token t+1."""
    if shift_labels:
        return logits[..., :-1, :], labels[..., 1:]
    return logits, labels


def count_targets(labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True) -> int:
    """Number of target tokens in `labels` (after the causal shift when asked)."""
    if shift_labels:
        labels = labels[..., 1:]
    return int((labels != ignore_index).sum())


def count_target_sequences(labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True) -> int:
    """Number of sequences with at least one target token (the unit of normalize="samples")."""
    if shift_labels:
        labels = labels[..., 1:]
    return int((labels != ignore_index).reshape(labels.shape[0], -1).any(dim=1).sum())


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    # Softmax over a 50k vocabulary in bf16/fp16 loses digits; float64 stays float64.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True
) -> torch.Tensor:
    """Sum of the cross-entropy of every target token. Shape: scalar. Units: nats."""
    logits, labels = shift_for_causal_lm(logits, labels, shift_labels)
    return F.cross_entropy(
        _upcast(logits).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )


def sequence_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed loss [batch] and per-sequence target count [batch]."""
    logits, labels = shift_for_causal_lm(logits, labels, shift_labels)
    per_token = F.cross_entropy(
        _upcast(logits).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).reshape(labels.shape)
    mask = labels != ignore_index
    return per_token.reshape(labels.shape[0], -1).sum(dim=1), mask.reshape(labels.shape[0], -1).sum(dim=1)


def sequence_mean_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True
) -> torch.Tensor:
    """Sum over sequences of each sequence's mean token loss (sequences without targets add 0)."""
    sums, counts = sequence_loss_sums(logits, labels, ignore_index, shift_labels)
    return (sums / counts.clamp(min=1).to(sums.dtype)).sum()


class CausalLMLoss(torch.nn.Module):
    """A causal LM and its summed loss in one forward.

    Data-parallel wrappers (DDP, FSDP2) only see work done inside `forward`, so the
    loss is computed here rather than on logits handed back to the loop.
    Returns the *summed* loss: token losses (normalize="tokens") or per-sequence means
    (normalize="samples"); the Accumulator divides by the global count.
    """

    def __init__(self, model: torch.nn.Module, normalize: str = "tokens", ignore_index: int = -100):
        super().__init__()
        self.model = model
        self.normalize = normalize
        self.ignore_index = ignore_index

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.normalize == "samples":
            return sequence_mean_sum(logits, labels, self.ignore_index)
        return token_loss_sum(logits, labels, self.ignore_index)
