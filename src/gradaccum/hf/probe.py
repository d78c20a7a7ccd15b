"""Which objective a trainer trains: checked on its own loss once, before the first window.

The trainer's own loss of the first micro-batch (its `compute_loss` without a count, eval mode, no
grad; its row with the most targets, where rows can be cut apart, so that the probe holds one row of
logits at a time) is compared with the candidates computed from the logits: the token mean with the causal
shift, without it (encoder-decoders; BART/XLNet-style heads that expect shifted labels), with
the label smoothing of the arguments, or the sequence-level loss of the head's problem type. One
crafted label, placed where the two alignments disagree most, settles the shift. A loss that
matches none (an auxiliary loss, a custom loss) is refused: accumulation cannot rebuild it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from dataclasses import replace

import torch

from .. import distributed as dist_utils
from ..errors import DataError, ModelError
from .objective import IGNORE_INDEX, Objective, base_model, candidates_for, logits_of, upcast

_PROBE_POSITIONS = 64  # the crafted label is placed among this many positions of one row (memory: 64 x vocab)


def _close(a: float, b: float, logits_dtype: torch.dtype) -> bool:
    # transformers computes causal-LM losses in float32 even for float64 logits; half-precision
    # heads that compute their loss in bf16 (inline CrossEntropyLoss) are good to ~1e-2.
    tolerance = 1e-5 if logits_dtype in (torch.float32, torch.float64) else 2e-2
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tolerance * max(abs(a), abs(b), 1.0)


def _crafted_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Labels with one target, where "logits[t] predicts label[t+1]" and "logits[t] predicts label[t]"
    give the most different losses (None when the sequences are too short to tell)."""
    window = logits[0, : _PROBE_POSITIONS + 1]
    if window.shape[0] < 2:
        return None
    log_probs = upcast(window).log_softmax(dim=-1)
    gap = (log_probs[:-1] - log_probs[1:]).abs()  # [t, v]: target v at position t + 1
    position, token = divmod(int(gap.argmax()), gap.shape[-1])
    crafted = torch.full_like(labels, IGNORE_INDEX)
    crafted[0, position + 1] = token
    return crafted


@contextlib.contextmanager
def _probing(trainer, model):
    """Eval mode (no dropout) and no grad, with SFTTrainer's metric buffers left as they were."""
    was_training = model.training
    metrics = copy.deepcopy(getattr(trainer, "_metrics", None))
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if metrics is not None:
            trainer._metrics = metrics


def one_row(inputs: dict) -> dict:
    """The micro-batch's row with the most targets, as a batch of one, where every tensor in it has a
    row per sequence (padded batches); the whole micro-batch otherwise (e.g. padding-free rows with
    flash-attention lengths). The probe then holds one row of logits, not the micro-batch's."""
    labels = inputs.get("labels")
    if not torch.is_tensor(labels) or labels.dim() == 0 or labels.shape[0] <= 1:
        return inputs
    rows = labels.shape[0]
    if any(torch.is_tensor(v) and (v.dim() == 0 or v.shape[0] != rows) for v in inputs.values()):
        return inputs
    targets = torch.ones(rows) if labels.is_floating_point() else \
        (labels != IGNORE_INDEX).reshape(rows, -1).sum(dim=1)
    row = int(targets.argmax())
    return {k: v[row:row + 1] if torch.is_tensor(v) else v for k, v in inputs.items()}


def _own_loss(trainer, model, inputs: dict) -> float:
    """The trainer's own loss of one micro-batch, as it trains it with no accumulation."""
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=None)
    return float(loss.detach().float().mean())


def _verdicts(trainer, model, inputs: dict, normalize: str) -> tuple[list[Objective], torch.Tensor, str]:
    """The candidate objectives, whether each reproduces the trainer's own loss ([shift, no shift]
    flags), and the numbers, for the message."""
    if "labels" not in inputs or not torch.is_tensor(inputs["labels"]):
        raise DataError("make_exact: the training batches have no 'labels' tensor; it counts targets from them")
    if "shift_labels" in inputs:
        raise DataError("make_exact: batches with 'shift_labels' (context/sequence parallelism) are not supported")
    inner = base_model(model)
    smoothing = float(getattr(getattr(trainer, "label_smoother", None), "epsilon", 0.0) or 0.0)
    base = Objective("token", smoothing=smoothing,
                     labels_to_model=bool(getattr(inner.config, "is_encoder_decoder", False)),
                     use_cache_off="use_cache" in inspect.signature(type(inner).forward).parameters)
    with _probing(trainer, model):
        logits = logits_of(model(**base.model_inputs(inputs)))
        candidates = candidates_for(inner, logits, inputs["labels"], normalize, base)
        probes = [inputs]
        crafted = _crafted_labels(logits, inputs["labels"]) if len(candidates) == 2 else None
        if crafted is not None:  # one target where the two alignments disagree most
            probes.append({**inputs, "labels": crafted})
        # Checked as the token mean: normalize="samples" is the user's choice, not the trainer's loss.
        values = [[(replace(c, normalize="tokens") if c.level == "token" else c).mean(logits, probe)
                   for probe in probes] for c in candidates]
        dtype = logits.dtype
        del logits  # freed before the trainer's own forward: the probe holds one set of logits at a time
        owns = [_own_loss(trainer, model, probe) for probe in probes]
    flags = torch.zeros(2, dtype=torch.int64)
    report = "its own loss " + ", ".join(f"{own:.6g}" for own in owns)
    for candidate, candidate_values in zip(candidates, values):
        # A micro-batch without targets has no loss to compare (nan); the crafted labels always have one.
        flags[0 if candidate.shift else 1] = int(all(
            _close(own, value, dtype) or (math.isnan(value) and probe is inputs)
            for own, value, probe in zip(owns, candidate_values, probes)))
        what = "sequence-level loss" if candidate.level == "sequence" else \
            f"token mean {'with' if candidate.shift else 'without'} the causal shift"
        report += f"; {what}: " + ", ".join(f"{value:.6g}" for value in candidate_values)
    return candidates, flags, report


def resolve_objective(trainer, batch: dict | None, normalize: str, trainer_name: str) -> Objective:
    """The objective whose per-micro-batch mean is the trainer's own loss, agreed by every rank."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    candidates, report = [], "no micro-batch on this rank"
    flags = torch.ones(2, dtype=torch.int64)  # a rank with no batch agrees with the others
    if batch is not None:
        candidates, flags, report = _verdicts(trainer, model, one_row(trainer._prepare_inputs(batch)), normalize)
    if dist_utils.is_distributed():
        flags = flags.to(trainer.args.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    flags = flags.cpu()
    matching = [c for c in candidates if int(flags[0 if c.shift else 1]) == 1]
    if len(matching) != 1:
        why = ("both alignments of labels with logits fit it" if matching else
               "it is not a mean of per-target losses of the logits (an auxiliary loss? a custom compute_loss?)")
        raise ModelError(f"make_exact: cannot make {trainer_name} with {type(base_model(model)).__name__} "
                         f"exact: on the first micro-batch, {report}; {why}. For a custom loss, train with "
                         "gradaccum.Accumulator and window.scale(summed_loss)")
    return matching[0]


