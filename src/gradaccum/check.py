"""`gradaccum check`: does gradient accumulation with this model equal the big batch? Seconds, no training.

    gradaccum check --model DIR|HUB_ID|FILE.gguf [--json]      # exit 0: exact under HF Trainer as-is

    result = check_model(model)          # any transformers model: causal LM, seq2seq LM, sequence classifier
    print(format_report(result)); result.exact_under_trainer

The answer is measured on two crafted micro-batches of unequal size, never read from a list of known
models:

- the model's own loss is compared with the sum of its token losses, computed here from its logits,
  divided by each candidate count (next-token shifted labels, unshifted labels, sequences): that says
  what one target is for this model;
- the forward is called with `num_items_in_batch` = n and 2n: a loss that honours the count halves;
- a real `transformers.Trainer` is built around the model, and its own `compute_loss` and target count
  give each micro-batch's share of the step; its weight relative to the big batch (sum of all
  summed losses / total count) is 1 exactly when Trainer accumulates exactly;
- the rows of the two micro-batches are run as one batch: a row whose output changes with its
  neighbours (BatchNorm, capacity-limited expert routing) makes every micro-batch a different model;
- causal LMs: two documents packed in one row (position_ids restarting, no attention_mask, as Trainer's
  padding-free collators and `gradaccum train --packing` send them) are compared with each run alone.

Dropout is switched off for the probe (it is random per micro-batch, but the same in expectation as in
the big batch, so it is no departure); everything else runs in training mode.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import re
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CheckResult", "check_model", "format_report", "add_arguments", "main"]

IGNORE_INDEX = -100
TASKS = ("causal-lm", "seq2seq-lm", "sequence-classification")
# Two float32 forwards of the same rows agree to ~1e-6; a real difference (another count, another
# batch statistic) is of order one.
RELATIVE_TOLERANCE = 1e-4
# Batched against unbatched matmuls drift a little more than repeated identical forwards.
ROW_TOLERANCE = 1e-3
WIDTH = 10  # tokens per probe row

FIX_TRAINER = "trainer = gradaccum.hf.make_exact(trainer)  (or train with `gradaccum train`)"
MOE_CONFIG_FLAGS = ("output_router_logits", "router_aux_loss_coef", "router_z_loss_coef", "aux_loss_alpha",
                    "aux_loss_coef", "moe_aux_loss_coeff", "router_aux_loss_factor")
CAPACITY_CONFIG_FLAGS = ("expert_capacity", "capacity_factor", "moe_capacity_factor")


@dataclass
class TrainerFacts:
    """What transformers.Trainer does with this model, as its own code decides it."""

    verdict: str  # exact | count-dropped | count-mismatch | mean-of-means | count-rejected | no-loss | ...
    passes_count: bool | None = None  # Trainer.model_accepts_loss_kwargs
    divides_by_accumulation_steps: bool | None = None
    counts: str | None = None  # what Trainer counts: "shifted" | "unshifted" labels, or a number we cannot place
    count_ratio: float | None = None  # model's own window count / Trainer's count (1 = same targets)
    weights: list[float] = field(default_factory=list)  # each micro-batch's share / the big batch's (1 = exact)
    why: str = ""


@dataclass
class CheckResult:
    model_class: str
    task: str
    transformers_version: str
    attention: str | None
    loss_targets: str  # "shifted" | "unshifted" | "sequences" | "none" (no loss from labels) | "other"
    forward_takes_kwargs: bool
    forward_names_num_items: bool
    count_honoured: str  # "yes" | "no" | "partly" | "rejected" (forward raises) | "untested"
    trainer: TrainerFacts
    ours: str  # gradaccum train / Accumulator: exact | not exact
    ours_why: str
    departures: list[str] = field(default_factory=list)  # beyond the count: they hold under any loop
    notes: list[str] = field(default_factory=list)
    packing: str = "n/a"
    exact_under_trainer: bool = False
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


def _special_ids(config) -> set[int]:
    ids: set[int] = set()
    for name, value in vars(config).items():
        if name.endswith(("_token_id", "_token_index")):
            ids.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
    return ids


def _vocab_size(model: nn.Module) -> int:
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # character-level models have no embedding table
        embeddings = None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    # Character-level models (CANINE) take code points: any small id is a valid one.
    return int(getattr(model.config, "vocab_size", 0) or getattr(model.config.get_text_config(), "vocab_size", 256))


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
    allowed = torch.tensor([i for i in range(min(_vocab_size(model), 512)) if i not in _special_ids(config) | {pad_id}])
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


def _logits(output) -> torch.Tensor:
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
            return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"), labels.numel()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum"), int((labels != IGNORE_INDEX).sum())
    if targets == "shifted":
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum"), int((labels != IGNORE_INDEX).sum())


def _close(a: float, b: float, tolerance: float = RELATIVE_TOLERANCE) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tolerance * max(abs(a), abs(b), 1e-12)


def _forward(model: nn.Module, batch: dict, **extra):
    # Reseeded so that anything random the probe could not switch off is the same in every forward.
    torch.manual_seed(0)
    with torch.no_grad():
        return model(**batch, **extra)


def loss_targets(model: nn.Module, task: str, batches: list[dict], outputs: list) -> str:
    """What the model's own mean loss divides by: which candidate reproduces it on every micro-batch."""
    if any(getattr(out, "loss", None) is None for out in outputs):
        return "none"
    candidates = ("sequences",) if task == "sequence-classification" else ("shifted", "unshifted")
    for targets in candidates:
        sums = [summed_loss(_logits(out), batch["labels"], targets, model.config)
                for out, batch in zip(outputs, batches)]
        if all(count > 0 and _close(float(out.loss), float(total) / count)
               for out, (total, count) in zip(outputs, sums)):
            return targets
    return "other"


def count_honoured(model: nn.Module, batch: dict, count: int, own_loss: float | None) -> str:
    """Forward with num_items_in_batch = n, then 2n: a loss that honours the count halves, and at the
    model's own count n it is the model's own mean (when we know what the model counts)."""
    losses = []
    for value in (count, 2 * count):
        try:
            out = _forward(model, batch, num_items_in_batch=torch.tensor(value))
        except Exception:  # noqa: BLE001 - any refusal means the same: it cannot take the count
            return "rejected"
        losses.append(float(out.loss))
    at_n, at_2n = losses
    if _close(at_n, 2 * at_2n) and (own_loss is None or _close(at_n, own_loss)):
        return "yes"
    if _close(at_n, at_2n):
        return "no"
    return "partly"


# ---------------------------------------------------------------------------------------------
# What transformers.Trainer does with it


@contextlib.contextmanager
def _quiet():
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


def _build_trainer(model: nn.Module, batches: list[dict]):
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:  # Trainer writes nothing until it trains
        args = TrainingArguments(output_dir=output_dir, report_to="none", use_cpu=True, save_strategy="no",
                                 per_device_train_batch_size=len(batches[0]["labels"]),
                                 gradient_accumulation_steps=len(batches))
        return Trainer(model=model, args=args)


def _trainer_count(trainer, batches: list[dict]):
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
    trainer = _build_trainer(model, batches)
    count = _trainer_count(trainer, batches)
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
        return TrainerFacts("unavailable", why=f"transformers.Trainer cannot be built here: {_first_line(error)}")
    except Exception as error:  # noqa: BLE001 - whatever Trainer raises is what the user would meet
        if honoured == "rejected":
            return TrainerFacts("count-rejected", passes_count=True, why="Trainer passes num_items_in_batch to a "
                                f"forward that raises on it: {_first_line(error)}")
        return TrainerFacts("fails", why=f"Trainer's compute_loss fails: {_first_line(error)}")
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
    sums = [summed_loss(_logits(out), batch["labels"], targets, model.config) for out, batch in zip(outputs, batches)]
    total = sum(n for _, n in sums)
    facts.weights = [round(share * total / float(s), 6) for share, (s, _) in zip(shares, sums)]
    if count is not None:
        facts.count_ratio = round(total / float(count), 6)
    facts.verdict, facts.why = _trainer_verdict(facts, task, targets, honoured, takes_kwargs)
    return facts


def _trainer_verdict(facts: TrainerFacts, task: str, targets: str, honoured: str,
                     takes_kwargs: bool) -> tuple[str, str]:
    k = len(facts.weights)
    if all(_close(w, 1.0) for w in facts.weights):
        return "exact", (f"Trainer passes num_items_in_batch ({facts.counts} labels), the loss divides its sum "
                         "by it, and Trainer does not divide by the accumulation steps")
    if facts.passes_count and honoured == "no":
        return "count-dropped", ("Trainer passes num_items_in_batch and therefore skips its division by the "
                                 "accumulation steps, but the model's loss ignores the count and returns its "
                                 f"micro-batch mean: each step is the sum of {k} means, ~{k}x the big-batch "
                                 "gradient, with short micro-batches weighing more")
    if facts.passes_count and honoured == "yes" and facts.count_ratio and not _close(facts.count_ratio, 1.0):
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Departures that no loss scaling fixes


class _Restore:
    """Attributes the probe changes on the user's model (dropout rates, use_cache), put back on exit."""

    def __init__(self):
        self.saved: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self.saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self) -> None:
        for obj, name, value in reversed(self.saved):
            setattr(obj, name, value)
        self.saved.clear()


_RANDOM_RATE = re.compile(r"dropout|layerdrop|drop_path|drop_prob|jitter")


def _is_config(value: Any) -> bool:
    return hasattr(value, "to_dict") and hasattr(value, "model_type")


def _configs(model: nn.Module) -> list:
    """The model's config and every sub-config (text, vision, encoder, decoder)."""
    found, stack = [], [getattr(model, "config", None)]
    while stack:
        config = stack.pop()
        if config is None or any(config is seen for seen in found):
            continue
        found.append(config)
        stack.extend(value for value in vars(config).values() if _is_config(value))
    return found


def switch_off_dropout(model: nn.Module, restore: _Restore) -> None:
    """Dropout, LayerDrop, stochastic depth and router jitter to zero: random per micro-batch, but the
    same in expectation as in the big batch, so not a departure; off, the probe's forwards repeat."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            restore.set(module, "p", 0.0)
        for owner in (module, *(_configs(model) if module is model else ())):
            for name, value in list(vars(owner).items()):
                if type(value) is float and value > 0 and _RANDOM_RATE.search(name):
                    restore.set(owner, name, 0.0)


def batchnorm_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(module).__name__]


def moe_facts(model: nn.Module) -> tuple[bool, bool, bool]:
    """(is a mixture of experts, router aux loss switched on, expert capacity per batch)."""
    flags = {name: value for config in _configs(model) for name, value in vars(config).items()}
    routed = any(name in flags for name in MOE_CONFIG_FLAGS) or any(
        re.search(r"Router|SparseMoe|MoE|Moe|Experts", type(module).__name__) for module in model.modules())
    aux_on = bool(flags.get("output_router_logits")) and routed
    capacity = any(flags.get(name) for name in CAPACITY_CONFIG_FLAGS)
    return routed, aux_on, capacity


def _valid_rows(out, batch: dict, task: str) -> list[torch.Tensor]:
    """Each row's outputs at the positions that mean something (no padding)."""
    logits = _logits(out).float()
    if task == "sequence-classification":
        return list(logits)
    keep = batch["attention_mask"].bool() if task == "causal-lm" else batch["labels"] != IGNORE_INDEX
    return [row[mask] for row, mask in zip(logits, keep)]


def row_dependence(model: nn.Module, task: str, batches: list[dict], outputs: list) -> float | None:
    """Largest change of a row's outputs when the micro-batches run as one batch, relative to the
    outputs' size; None when the forward is random even with dropout off (the test would mean nothing)."""
    again = _forward_seeded(model, batches[0], seed=1)
    if not torch.equal(_logits(again), _logits(outputs[0])):
        return None
    whole = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
    together = _valid_rows(_forward(model, whole), whole, task)
    alone = [row for out, batch in zip(outputs, batches) for row in _valid_rows(out, batch, task)]
    scale = max(float(row.abs().max()) for row in alone) or 1.0
    return max(float((a - b).abs().max()) for a, b in zip(alone, together)) / scale


def _forward_seeded(model: nn.Module, batch: dict, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(**batch)


def packing_probe(model: nn.Module, batch: dict) -> str:
    """Two documents in one row, position_ids restarting, no attention_mask (how Trainer's padding-free
    collators and `gradaccum train --packing` send them): does the second see the first?"""
    from .packing import packing_unsupported_reason

    attention = getattr(model.config, "_attn_implementation", None)
    first, second = batch["input_ids"][0, :5], batch["input_ids"][0, 5:WIDTH]
    packed = {"input_ids": torch.cat([first, second])[None],
              "position_ids": torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None]}
    alone = {"input_ids": second[None], "position_ids": torch.arange(len(second))[None]}
    try:
        together, reference = _forward(model, packed), _forward(model, alone)
    except Exception as error:  # noqa: BLE001 - the forward cannot take packed rows, whatever the reason
        return f"not possible: the forward fails with position_ids ({_first_line(error)})"
    seen = _logits(together)[0, len(first):].float()
    own = _logits(reference)[0].float()
    difference = float((seen - own).abs().max()) / (float(own.abs().max()) or 1.0)
    refused = packing_unsupported_reason(model)
    ours = f"gradaccum train --packing refuses it ({refused})" if refused else "gradaccum train --packing accepts it"
    if difference <= ROW_TOLERANCE:
        return f"exact with {attention} attention: packed documents stay apart; {ours}"
    return (f"leaks with {attention} attention: a packed document attends to the one before it "
            f"(logits change by {difference:.1e}): pad instead of packing; {ours}")


# ---------------------------------------------------------------------------------------------
# The whole check


def _forward_accepts(model: nn.Module) -> tuple[bool, bool]:
    """(forward takes **kwargs, forward names num_items_in_batch), as Trainer inspects it."""
    parameters = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return takes_kwargs, "num_items_in_batch" in parameters


def check_model(model: nn.Module, task: str | None = None) -> CheckResult:
    """Probe `model` (a transformers model in float32 or float64, on the CPU) and say whether gradient
    accumulation equals the big batch under HF Trainer and under gradaccum, and why not.

    The model is left as it was (dropout rates, use_cache, BatchNorm statistics are put back).
    """
    import transformers

    task = task or task_of(model)
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    restore = _Restore()
    statistics = {name: buffer.clone() for name, buffer in model.named_buffers() if "running" in name
                  or name.endswith("num_batches_tracked")}
    was_training = model.training
    try:
        with _quiet():
            model.train()
            switch_off_dropout(model, restore)
            for config in _configs(model):
                if getattr(config, "use_cache", None):  # Trainer sets it off too; a cache hides packing
                    restore.set(config, "use_cache", False)
            return _check(model, task, transformers.__version__)
    finally:
        restore.undo()
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in statistics:
                    buffer.copy_(statistics[name])


def _check(model: nn.Module, task: str, version: str) -> CheckResult:
    batches = probe_batches(model, task)
    outputs = [_forward(model, batch) for batch in batches]
    targets = loss_targets(model, task, batches, outputs)
    takes_kwargs, names_count = _forward_accepts(model)
    if targets == "none":
        honoured = "untested"
    else:
        known = targets != "other"
        count = (summed_loss(_logits(outputs[0]), batches[0]["labels"], targets, model.config)[1] if known
                 else target_count(batches[0]["labels"], "unshifted"))
        honoured = count_honoured(model, batches[0], count, float(outputs[0].loss) if known else None)
    trainer = trainer_facts(model, task, batches, outputs, targets, honoured, takes_kwargs)
    result = CheckResult(
        model_class=type(model).__name__, task=task, transformers_version=version,
        attention=getattr(model.config, "_attn_implementation", None), loss_targets=targets,
        forward_takes_kwargs=takes_kwargs, forward_names_num_items=names_count, count_honoured=honoured,
        trainer=trainer, ours="exact", ours_why="")
    _add_departures(result, model, task, batches, outputs)
    _add_notes(result, task, targets, takes_kwargs, names_count)
    if task == "causal-lm":
        result.packing = packing_probe(model, batches[0])
    result.exact_under_trainer = trainer.verdict == "exact" and not result.departures
    result.fix = _fix(result)
    return result


def _add_departures(result: CheckResult, model: nn.Module, task: str, batches: list[dict], outputs: list) -> None:
    norms = batchnorm_modules(model)
    routed, aux_on, capacity = moe_facts(model)
    if aux_on and result.trainer.verdict == "unknown-loss":
        result.trainer.why = ("the loss adds the router aux loss, a mean over the micro-batch outside the token "
                              "count, to the token loss: Trainer passes the count and skips its division by the "
                              "accumulation steps, so the aux term is summed over the micro-batches")
    if norms:
        result.departures.append(f"BatchNorm ({len(norms)} layers, e.g. {norms[0]}): each micro-batch is "
                                 "normalised with its own statistics, not the big batch's")
    if aux_on:
        result.departures.append("router aux loss (output_router_logits=True): its load-balancing statistics are "
                                 "taken per micro-batch, and it is added to each micro-batch's loss outside the "
                                 "token count")
    dependence = row_dependence(model, task, batches, outputs)
    if dependence is None:
        result.notes.append("the forward stays random with dropout off: rows-independence not tested")
    elif dependence > ROW_TOLERANCE and not norms:
        cause = "expert capacity per batch" if capacity else "unknown cause"
        result.departures.append(f"a row's outputs change with the other rows of its batch by {dependence:.1e} "
                                 f"({cause}): micro-batches are not slices of the big batch")
    loop_departures = [d for d in result.departures if not d.startswith("router aux loss")]
    if loop_departures:
        result.ours = "not exact"
        result.ours_why = "no loss scaling fixes: " + "; ".join(d.split(" (")[0] for d in loop_departures)
    elif task == "causal-lm":
        result.ours_why = ("gradaccum computes the next-token loss from the logits and divides it by the "
                           "window's target count")
    else:
        result.ours_why = ("with the Accumulator (shift_labels=False) and window.scale(summed loss); "
                           "`gradaccum train` loads causal LMs only")
    if aux_on:
        result.notes.append("gradaccum train optimises the token loss only: the router aux loss is not trained")
    if routed and not aux_on:
        result.notes.append("mixture of experts with the router aux loss off (output_router_logits=False); "
                            "switched on, it is computed per micro-batch and departs from the big batch")


def _add_notes(result: CheckResult, task: str, targets: str, takes_kwargs: bool, names_count: bool) -> None:
    if names_count and not takes_kwargs:
        result.notes.append("the forward names num_items_in_batch but has no **kwargs, and Trainer looks only "
                            "for **kwargs: it never passes the count")
    if task == "causal-lm" and targets == "unshifted":
        result.notes.append("this causal LM's own loss does not shift labels (it expects them shifted already); "
                            "gradaccum train always predicts the next token")
    if result.count_honoured == "partly":
        result.notes.append("num_items_in_batch rescales only part of the loss")


def _fix(result: CheckResult) -> str:
    fixes = []
    if result.trainer.verdict in ("count-dropped", "count-mismatch", "mean-of-means", "inexact"):
        fixes.append(FIX_TRAINER)
    if any(d.startswith("BatchNorm") for d in result.departures):
        fixes.append("freeze BatchNorm statistics (eval-mode BatchNorm) or replace it with GroupNorm/LayerNorm")
    if any(d.startswith("router aux loss") for d in result.departures):
        fixes.append("set output_router_logits=False, or accept a balancing loss taken per micro-batch")
    if any(d.startswith("a row's") for d in result.departures):
        fixes.append("do not accumulate with this model: one micro-batch per optimizer step")
    if result.trainer.verdict == "unknown-loss" and not fixes:
        fixes.append("compute the loss from the logits as a sum over targets and divide it by the window's "
                     "count (gradaccum.Accumulator: window.scale)")
    return "; ".join(fixes)


# ---------------------------------------------------------------------------------------------
# Report and command line

LOSS_WORDS = {
    "shifted": "mean over next-token targets (labels shifted by one)",
    "unshifted": "mean over unshifted labels (logit t scores label t)",
    "sequences": "mean over sequences",
    "none": "none returned from labels",
    "other": "not a mean over targets of the logits (an extra term?)",
}
TRAINER_HEADLINES = {
    "exact": "EXACT",
    "count-dropped": "NOT EXACT: count passed, model drops it (~K x gradient)",
    "count-mismatch": "NOT EXACT: Trainer counts other targets than the loss",
    "mean-of-means": "NOT EXACT: mean of micro-batch means",
    "count-rejected": "FAILS: forward rejects num_items_in_batch",
    "no-loss": "no loss from labels",
    "unknown-loss": "CANNOT TELL: loss is not a mean over targets of the logits",
    "inexact": "NOT EXACT",
    "fails": "FAILS",
    "unavailable": "not checked",
}


def format_report(result: CheckResult) -> str:
    """The human-readable answer: facts, the two verdicts with reasons, departures, packing, fix."""
    t = result.trainer
    yes = {True: "yes", False: "no", None: "?"}
    lines = [
        f"gradaccum check: {result.model_class} ({result.task}; transformers {result.transformers_version}; "
        f"attention {result.attention})",
        f"  loss: {LOSS_WORDS[result.loss_targets]}",
        f"  num_items_in_batch: forward takes **kwargs: {yes[result.forward_takes_kwargs]}; "
        f"loss honours it (n -> 2n halves): {result.count_honoured}",
        f"  Trainer: passes the count: {yes[t.passes_count]}; counts: {t.counts or '-'}; "
        f"divides by accumulation steps: {yes[t.divides_by_accumulation_steps]}"
        + (f"; micro-batch weights vs big batch: {', '.join(f'{w:.3f}' for w in t.weights)}" if t.weights else ""),
        f"HF Trainer as-is, loss scaling: {TRAINER_HEADLINES.get(t.verdict, t.verdict)}",
        f"  why: {t.why}",
        f"gradaccum (train / Accumulator): {result.ours.upper()}: {result.ours_why}",
        "other departures: " + ("none (no BatchNorm, no router aux loss, rows independent)"
                                if not result.departures else ""),
        *[f"  - {departure}" for departure in result.departures],
        *([f"packing: {result.packing}"] if result.task == "causal-lm" else []),
        *[f"note: {note}" for note in result.notes],
        "verdict: " + ("exact under HF Trainer as-is" if result.exact_under_trainer else
                       "NOT exact under HF Trainer as-is") + f"; {result.ours} under gradaccum",
    ]
    if result.fix:
        lines.append(f"fix: {result.fix}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", metavar="MODEL",
                        help="tiny | a local HF model directory | a hub id | a .gguf file (default: tiny)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own code from its repository (off by default)")


def main(args: argparse.Namespace) -> int:
    """Load, probe, print. Exit 0 when accumulation under HF Trainer as-is is exact, 1 otherwise;
    a model that cannot be loaded raises ValueError (the CLI prints it as one line, exit 2)."""
    from .models import load_model

    model, _ = load_model(args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    result = check_model(model)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_report(result))
    sys.stdout.flush()
    return 0 if result.exact_under_trainer else 1
