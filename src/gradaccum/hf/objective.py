"""The loss a trainer trains, as a sum over targets: what one target is, and a micro-batch's summed loss.

A window divides the sum of its micro-batches' `loss_sum` by the sum of their `count`: the mean
over the whole window, which is the big batch's loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ModelError

IGNORE_INDEX = -100


def upcast(logits: torch.Tensor) -> torch.Tensor:
    # A softmax over a large vocabulary in bf16/fp16 loses digits (HF upcasts too); float64 stays.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def logits_of(outputs) -> torch.Tensor:
    logits = outputs if torch.is_tensor(outputs) else getattr(outputs, "logits", None)
    if not torch.is_tensor(logits):
        raise ModelError(f"make_exact: the model returned {type(outputs).__name__} without a .logits tensor")
    return logits


@dataclass(frozen=True)
class Objective:
    """The trainer's loss as a sum over targets, so that a window divides it by its own count.

    level "token": logits [B, T, V] against labels [B, T] (shifted by one when `shift`); normalize
    "tokens" averages over target tokens, "samples" over sequences (rows, or the sequences a packed
    row holds, by its position_ids restarts). level "sequence": logits [B, C], one loss term per
    label element, as HF's classification/regression/multi-label losses average them.
    """

    level: str
    shift: bool = False
    normalize: str = "tokens"
    smoothing: float = 0.0
    problem_type: str | None = None
    labels_to_model: bool = False  # encoder-decoders build decoder_input_ids from the labels
    use_cache_off: bool = False  # the forward takes use_cache: no KV cache in training (packed rows need none)

    def model_inputs(self, inputs: dict) -> dict:
        kept = {k: v for k, v in inputs.items() if k != "labels" or self.labels_to_model}
        if self.use_cache_off:
            kept["use_cache"] = False
        return kept

    def count(self, batch: dict) -> torch.Tensor:
        """Targets in `batch` (0-dim int64 tensor on the labels' device)."""
        labels = batch["labels"]
        if self.level == "sequence":
            if self.problem_type == "single_label_classification":
                return (labels != IGNORE_INDEX).sum()
            return torch.tensor(labels.numel(), device=labels.device)
        mask = self._aligned(None, labels)[1] != IGNORE_INDEX
        if self.normalize == "tokens":
            return mask.sum()
        segments = self._segments(batch)[mask]
        return torch.tensor(int(segments.unique().numel()), device=labels.device)

    def loss_sum(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Summed loss of the micro-batch's targets (scalar); divided by the window's count it is its share."""
        labels = batch["labels"].to(logits.device)
        if self.level == "sequence":
            return self._sequence_terms(logits, labels).sum()
        logits, labels = self._aligned(logits, labels)
        mask = labels != IGNORE_INDEX
        terms = self._cross_entropy(logits[mask], labels[mask])
        if self.normalize == "tokens":
            return terms.sum()
        _, inverse, counts = torch.unique(self._segments(batch).to(mask.device)[mask], return_inverse=True,
                                          return_counts=True)
        return (terms / counts[inverse].to(terms.dtype)).sum()

    def targets(self, batch: dict):
        """Token level: (rows, cols, targets, weights) of the target positions in the aligned frame
        (shifted: position t of the logits predicts label t + 1); weights are None for "tokens", and
        1 / (targets of its sequence) for "samples", whose weighted sum is `loss_sum`."""
        labels = self._aligned(None, batch["labels"])[1]
        mask = labels != IGNORE_INDEX
        rows, cols = mask.nonzero(as_tuple=True)
        weights = None
        if self.normalize == "samples":
            _, inverse, counts = torch.unique(self._segments(batch)[mask], return_inverse=True, return_counts=True)
            weights = 1.0 / counts[inverse].to(torch.float64)
        return rows, cols, labels[rows, cols], weights

    def mean(self, logits: torch.Tensor, batch: dict) -> float:
        """The loss of one batch on its own (what the trainer computes without a count); nan without targets."""
        count = int(self.count(batch))
        return float(self.loss_sum(logits, batch)) / count if count else math.nan

    def _aligned(self, logits, labels):
        if self.shift:
            return (None if logits is None else logits[:, :-1]), labels[:, 1:]
        return logits, labels

    def _segments(self, batch: dict) -> torch.Tensor:
        """A sequence id per (aligned) label position: rows, split where packed position_ids restart at 0."""
        labels = batch["labels"]
        rows, width = labels.shape
        segments = torch.arange(rows, device=labels.device).view(-1, 1).expand(rows, width) * (width + 1)
        positions = batch.get("position_ids")
        if torch.is_tensor(positions) and positions.shape == labels.shape:
            starts = positions.to(labels.device) == 0
            segments = segments + starts.cumsum(dim=1)
        return self._aligned(None, segments)[1]

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = upcast(logits).log_softmax(dim=-1)
        terms = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if self.smoothing:  # as transformers' LabelSmoother: (1 - eps) nll + eps * mean over the vocabulary
            terms = (1 - self.smoothing) * terms - self.smoothing * log_probs.mean(dim=-1)
        return terms

    def _sequence_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        if self.problem_type == "single_label_classification":
            logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            mask = labels != IGNORE_INDEX
            return self._cross_entropy(logits[mask], labels[mask])
        labels = labels.to(logits.dtype)
        if self.problem_type == "regression":
            if logits.shape[-1] == 1:  # HF squeezes both sides when there is one output
                logits, labels = logits.reshape(-1), labels.reshape(-1)
            return (logits - labels).pow(2).reshape(-1)
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").reshape(-1)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (peft's forward hands everything on to it)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def problem_type_of(config, labels: torch.Tensor) -> str:
    # The rule of transformers' ForSequenceClassificationLoss, which sets config.problem_type on first use.
    if getattr(config, "problem_type", None):
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


def candidates_for(model, logits: torch.Tensor, labels: torch.Tensor, normalize: str,
                   base: Objective) -> list[Objective]:
    """The objectives the trainer's own loss may be, from the shapes of the logits and labels."""
    config = model.config
    name = type(model).__name__
    if logits.dim() == 2 and labels.dim() in (1, 2) and logits.shape[0] == labels.shape[0]:
        problem_type = problem_type_of(config, labels)
        if base.smoothing and problem_type != "single_label_classification":
            raise ConfigError(f"make_exact: label_smoothing_factor={base.smoothing} with a {problem_type} head "
                             f"({name}): label smoothing applies to class labels only; set it to 0")
        return [replace(base, level="sequence", normalize="samples", problem_type=problem_type)]
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[:2] == labels.shape:
        normalize = "tokens" if normalize == "auto" else normalize
        if base.labels_to_model:
            # The decoder reads the labels shifted right, so logits[t] predicts labels[t].
            return [replace(base, normalize=normalize)]
        return [replace(base, shift=True, normalize=normalize), replace(base, shift=False, normalize=normalize)]
    raise ModelError(f"make_exact: {name} returns logits of shape {tuple(logits.shape)} for labels of shape "
                     f"{tuple(labels.shape)}; it handles token-level heads (logits [batch, time, vocab]) and "
                     "sequence-level heads (logits [batch, classes]) only")


