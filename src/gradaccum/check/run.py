"""`check_model`: every probe on one model, gathered into a `CheckResult`."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..accumulate import batch_statistics_layers
from ..errors import ConfigError
from .probes import (TASKS, count_honoured, forward, logits_of, loss_targets, probe_batches, quiet, summed_loss,
                     target_count, task_of, trainer_facts)
from .report import CheckResult, fix_for
from .structure import ROW_TOLERANCE, Restore, configs, moe_facts, packing_probe, row_dependence, switch_off_dropout


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
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    restore = Restore()
    statistics = {name: buffer.clone() for name, buffer in model.named_buffers() if "running" in name
                  or name.endswith("num_batches_tracked")}
    was_training = model.training
    try:
        with quiet():
            model.train()
            switch_off_dropout(model, restore)
            for config in configs(model):
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
    outputs = [forward(model, batch) for batch in batches]
    targets = loss_targets(model, task, batches, outputs)
    takes_kwargs, names_count = _forward_accepts(model)
    if targets == "none":
        honoured = "untested"
    else:
        known = targets != "other"
        count = (summed_loss(logits_of(outputs[0]), batches[0]["labels"], targets, model.config)[1]
                 if known else target_count(batches[0]["labels"], "unshifted"))
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
        result.packing = packing_probe(model)
    result.exact_under_trainer = trainer.verdict == "exact" and not result.departures
    result.fix = fix_for(result)
    return result


def _add_departures(result: CheckResult, model: nn.Module, task: str, batches: list[dict], outputs: list) -> None:
    norms = batch_statistics_layers(model)  # the model is in training mode: every BatchNorm
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
