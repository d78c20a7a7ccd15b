"""The loss and count probes: what one target is for this model, whether its loss honours
`num_items_in_batch`, and what a real `transformers.Trainer` does with it on one window.

Two crafted micro-batches of unequal size (`probe_batches`) are run through the model; its own loss is
compared with the sum of its token losses, computed here from its logits, divided by each candidate
count; the forward is called with `num_items_in_batch` = n and 2n; and a Trainer built around the model
gives each micro-batch's share of the step through its own `compute_loss` and target count.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import tempfile
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..errors import first_line
from ..models import ordinary_token_ids
from .report import TrainerFacts

TASKS = ("causal-lm", "seq2seq-lm", "sequence-classification")
# Two float32 forwards of the same rows agree to ~1e-6; a real difference (another count, another
# batch statistic) is of order one.
RELATIVE_TOLERANCE = 1e-4
WIDTH = 10  # tokens per probe row


# ---------------------------------------------------------------------------------------------
# Probe inputs

def task_of(model: nn.Module) -> str:
    """causal-lm, seq2seq-lm or sequence-classification, from transformers' auto mappings."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    if name in modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values() \
            or name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    config = getattr(model, "config", None)
    if name in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values() \
            or getattr(config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    return "causal-lm"


def _row_specs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(length, masked prefix) per row; micro-batch a has 3 rows, b has 1, with unequal target counts.

    Row a0's first label is a target, so shifted and unshifted counts differ; row a2 is padded.
    """
    return [(WIDTH, 0), (WIDTH, 6), (7, 2)], [(WIDTH, 8)]


def _seq_cls_labels(config, rows: int, generator: torch.Generator) -> torch.Tensor:
    kind = _problem_type(config)
    if kind == "regression":
        return torch.randn(rows, generator=generator) if config.num_labels == 1 else \
            torch.randn(rows, config.num_labels, generator=generator)
    if kind == "multi_label_classification":
        return torch.randint(0, 2, (rows, config.num_labels), generator=generator).float()
    return torch.randint(0, config.num_labels, (rows,), generator=generator)


def _problem_type(config) -> str:
    if config.problem_type:
        return config.problem_type
    return "regression" if config.num_labels == 1 else "single_label_classification"


def probe_batches(model: nn.Module, task: str, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two right-padded micro-batches [a (3 rows), b (1 row)] of WIDTH tokens for this model and task."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    pad_id = config.pad_token_id if isinstance(getattr(config, "pad_token_id", None), int) else 0
    allowed = ordinary_token_ids(model)
    allowed = allowed[allowed != pad_id]
    batches = []
    for rows in _row_specs():
        input_ids = torch.full((len(rows), WIDTH), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), WIDTH, dtype=torch.long)
        labels = torch.full((len(rows), WIDTH), IGNORE_INDEX, dtype=torch.long)
        for row, (length, masked) in enumerate(rows):
            ids = allowed[torch.randint(0, len(allowed), (length,), generator=generator)]
            input_ids[row, :length], attention_mask[row, :length] = ids, 1
            labels[row, masked:length] = ids[masked:]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        eos_id = getattr(config, "eos_token_id", None)
        if task == "sequence-classification" and isinstance(eos_id, int) and eos_id != pad_id:
            # Encoder-decoder classifiers (BART, T5) pool the hidden state at each row's final <eos>.
            input_ids[torch.arange(len(rows)), attention_mask.sum(dim=1) - 1] = eos_id
        if task == "seq2seq-lm":  # the decoder's targets are another text than the encoder's input
            batch["labels"] = torch.where(labels == IGNORE_INDEX, labels, labels.roll(1, dims=1))
        elif task == "sequence-classification":
            batch["labels"] = _seq_cls_labels(config, len(rows), generator)
        batches.append(batch)
    return batches


# ---------------------------------------------------------------------------------------------
# What the model's loss is


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[1]


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, targets: str, config=None) -> tuple[torch.Tensor, int]:
    """(sum of per-target losses, number of targets) of one micro-batch, for one meaning of "target"."""
    if targets == "sequences":
        kind = _problem_type(config)
        logits = logits.float()
        if kind == "regression":
            return F.mse_loss(logits.view_as(labels) if logits.numel() == labels.numel() else logits,
                              labels.float(), reduction="sum"), labels.numel()
        if kind == "multi_label_classification":
            return F.binary_cross_entropy_withlogits_of(logits, labels, reduction="sum"), labels.numel()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum"), int((labels != IGNORE_INDEX).sum())
    if targets == "shifted":
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum"), int((labels != IGNORE_INDEX).sum())


def close(a: float, b: float, tolerance: float = RELATIVE_TOLERANCE) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tolerance * max(abs(a), abs(b), 1e-12)


def forward(model: nn.Module, batch: dict, seed: int = 0, **extra):
    # Reseeded so that anything random the probe could not switch off is the same in every forward.
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(**batch, **extra)


def loss_targets(model: nn.Module, task: str, batches: list[dict], outputs: list) -> str:
    """What the model's own mean loss divides by: which candidate reproduces it on every micro-batch."""
    if any(getattr(out, "loss", None) is None for out in outputs):
        return "none"
    candidates = ("sequences",) if task == "sequence-classification" else ("shifted", "unshifted")
    for targets in candidates:
        sums = [summed_loss(logits_of(out), batch["labels"], targets, model.config)
                for out, batch in zip(outputs, batches)]
        if all(count > 0 and close(float(out.loss), float(total) / count)
               for out, (total, count) in zip(outputs, sums)):
            return targets
    return "other"


def count_honoured(model: nn.Module, batch: dict, count: int, own_loss: float | None) -> str:
    """Forward with num_items_in_batch = n, then 2n: a loss that honours the count halves, and at the
    model's own count n it is the model's own mean (when we know what the model counts)."""
    losses = []
    for value in (count, 2 * count):
        try:
            out = forward(model, batch, num_items_in_batch=torch.tensor(value))
        except Exception:  # noqa: BLE001 - any refusal means the same: it cannot take the count
            return "rejected"
        losses.append(float(out.loss))
    at_n, at_2n = losses
    if close(at_n, 2 * at_2n) and (own_loss is None or close(at_n, own_loss)):
        return "yes"
    if close(at_n, at_2n):
        return "no"
    return "partly"


# ---------------------------------------------------------------------------------------------
# What transformers.Trainer does with it


@contextlib.contextmanager
def quiet():
    """Trainer and the models warn about things irrelevant to a probe (no eval set, unknown loss_type)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def build_trainer(model: nn.Module, batches: list[dict]):
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:  # Trainer writes nothing until it trains
        args = TrainingArguments(output_dir=output_dir, report_to="none", use_cpu=True, save_strategy="no",
                                 per_device_train_batch_size=len(batches[0]["labels"]),
                                 gradient_accumulation_steps=len(batches))
        return Trainer(model=model, args=args)


def trainer_count(trainer, batches: list[dict]):
    """Trainer's num_items_in_batch for one window of micro-batches, from its own code."""
    device = trainer.args.device
    if hasattr(trainer, "_get_num_items_in_batch"):
        return trainer._get_num_items_in_batch(batches, device)
    # Older transformers counted inside get_batch_samples (with or without a device argument).
    extra = (device,) if "device" in inspect.signature(trainer.get_batch_samples).parameters else ()
    return trainer.get_batch_samples(iter(batches), len(batches), *extra)[1]


def _trainer_divides(trainer, count) -> bool:
    """training_step's rule: divide by the accumulation steps unless the loss counts as scaled."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (bool(trainer.model_accepts_loss_kwargs) and count is not None) \
            or getattr(trainer, "compute_loss_func", None) is not None
    return not scaled


def trainer_shares(model: nn.Module, batches: list[dict]) -> tuple[bool, Any, bool, list[float]]:
    """(passes the count, the window's count, divides by K, each micro-batch's loss as backpropagated)."""
    trainer = build_trainer(model, batches)
    count = trainer_count(trainer, batches)
    divides = _trainer_divides(trainer, count)
    trainer.current_gradient_accumulation_steps = len(batches)
    shares = []
    for batch in batches:
        torch.manual_seed(0)
        with torch.no_grad():
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
        shares.append(float(loss) / (len(batches) if divides else 1))
    return bool(trainer.model_accepts_loss_kwargs), count, divides, shares


def _counted(count: int, batches: list[dict], task: str) -> str:
    if task == "sequence-classification":
        return "sequences"
    for targets in ("shifted", "unshifted"):
        if count == sum(target_count(batch["labels"], targets) for batch in batches):
            return targets
    return f"{count} targets"


def target_count(labels: torch.Tensor, targets: str) -> int:
    if targets == "shifted":
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def trainer_facts(model: nn.Module, task: str, batches: list[dict], outputs: list, targets: str,
                  honoured: str, takes_kwargs: bool) -> TrainerFacts:
    try:
        passes, count, divides, shares = trainer_shares(model, batches)
    except ImportError as error:
        return TrainerFacts("unavailable", why=f"transformers.Trainer cannot be built here: {first_line(error)}")
    except Exception as error:  # noqa: BLE001 - whatever Trainer raises is what the user would meet
        if honoured == "rejected":
            return TrainerFacts("count-rejected", passes_count=True, why="Trainer passes num_items_in_batch to a "
                                f"forward that raises on it: {first_line(error)}")
        return TrainerFacts("fails", why=f"Trainer's compute_loss fails: {first_line(error)}")
    facts = TrainerFacts("", passes_count=passes, divides_by_accumulation_steps=divides)
    if count is not None:
        facts.counts = _counted(int(count), batches, task)
    if targets == "none":
        facts.verdict, facts.why = "no-loss", "the model returns no loss from labels: Trainer needs a compute_loss"
        return facts
    if targets == "other":
        facts.verdict = "unknown-loss"
        facts.why = ("the model's loss is not a token or sequence mean of its logits (an auxiliary term?): "
                     "accumulation cannot be checked, nor made exact from logits")
        return facts
    sums = [summed_loss(logits_of(out), batch["labels"], targets, model.config) for out, batch in zip(outputs, batches)]
    total = sum(n for _, n in sums)
    facts.weights = [round(share * total / float(s), 6) for share, (s, _) in zip(shares, sums)]
    if count is not None:
        facts.count_ratio = round(total / float(count), 6)
    facts.verdict, facts.why = _trainer_verdict(facts, task, targets, honoured, takes_kwargs)
    return facts


def _trainer_verdict(facts: TrainerFacts, task: str, targets: str, honoured: str,
                     takes_kwargs: bool) -> tuple[str, str]:
    k = len(facts.weights)
    if all(close(w, 1.0) for w in facts.weights):
        return "exact", (f"Trainer passes num_items_in_batch ({facts.counts} labels), the loss divides its sum "
                         "by it, and Trainer does not divide by the accumulation steps")
    if facts.passes_count and honoured == "no":
        return "count-dropped", ("Trainer passes num_items_in_batch and therefore skips its division by the "
                                 "accumulation steps, but the model's loss ignores the count and returns its "
                                 f"micro-batch mean: each step is the sum of {k} means, ~{k}x the big-batch "
                                 "gradient, with short micro-batches weighing more")
    if facts.passes_count and honoured == "yes" and facts.count_ratio and not close(facts.count_ratio, 1.0):
        return "count-mismatch", (f"the loss honours num_items_in_batch, but Trainer counts {facts.counts} labels "
                                  f"while the loss has {targets} targets: every step is scaled by their ratio "
                                  f"({facts.count_ratio:.3f} here; it changes with the batch)")
    if not facts.passes_count:
        reason = ("the model sets accepts_loss_kwargs = False" if takes_kwargs else
                  "the forward takes no **kwargs")
        unit = ("sequences: exact except for a short last micro-batch" if task == "sequence-classification"
                else "targets")
        return "mean-of-means", (f"{reason}, so Trainer never passes num_items_in_batch and divides each "
                                 f"micro-batch's mean loss by the accumulation steps: the mean of means, exact "
                                 f"only when every micro-batch holds the same number of {unit}")
    return "inexact", (f"micro-batch weights relative to the big batch are {facts.weights} "
                       f"(count honoured: {honoured})")
