"""Departures that no loss scaling fixes, and the probe's hold on the model while it runs.

A micro-batch is a slice of the big batch only when each row's output is independent of the rows
beside it: BatchNorm (statistics of its own batch) and capacity-limited expert routing break that,
and a router aux loss takes its load-balancing statistics per micro-batch. Packed rows (causal LMs)
must keep their documents apart. Dropout and its kin are switched off for the probe: random per
micro-batch, but the same in expectation as in the big batch, so no departure.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..data import IGNORE_INDEX
from ..errors import first_line
from ..packing import PACKING_TOLERANCE, attention_reason, packed_document_change
from .probes import forward, logits_of

# Batched against unbatched matmuls drift a little more than repeated identical forwards.
ROW_TOLERANCE = 1e-3
MOE_CONFIG_FLAGS = ("output_router_logits", "router_aux_loss_coef", "router_z_loss_coef", "aux_loss_alpha",
                    "aux_loss_coef", "moe_aux_loss_coeff", "router_aux_loss_factor")
CAPACITY_CONFIG_FLAGS = ("expert_capacity", "capacity_factor", "moe_capacity_factor")


class Restore:
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


def configs(model: nn.Module) -> list:
    """The model's config and every sub-config (text, vision, encoder, decoder)."""
    found, stack = [], [getattr(model, "config", None)]
    while stack:
        config = stack.pop()
        if config is None or any(config is seen for seen in found):
            continue
        found.append(config)
        stack.extend(value for value in vars(config).values() if _is_config(value))
    return found


def switch_off_dropout(model: nn.Module, restore: Restore) -> None:
    """Dropout, LayerDrop, stochastic depth and router jitter to zero: random per micro-batch, but the
    same in expectation as in the big batch, so not a departure; off, the probe's forwards repeat."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            restore.set(module, "p", 0.0)
        for owner in (module, *(configs(model) if module is model else ())):
            for name, value in list(vars(owner).items()):
                if type(value) is float and value > 0 and _RANDOM_RATE.search(name):
                    restore.set(owner, name, 0.0)


def moe_facts(model: nn.Module) -> tuple[bool, bool, bool]:
    """(is a mixture of experts, router aux loss switched on, expert capacity per batch)."""
    flags = {name: value for config in configs(model) for name, value in vars(config).items()}
    routed = any(name in flags for name in MOE_CONFIG_FLAGS) or any(
        re.search(r"Router|SparseMoe|MoE|Moe|Experts", type(module).__name__) for module in model.modules())
    aux_on = bool(flags.get("output_router_logits")) and routed
    capacity = any(flags.get(name) for name in CAPACITY_CONFIG_FLAGS)
    return routed, aux_on, capacity


def _valid_rows(out, batch: dict, task: str) -> list[torch.Tensor]:
    """Each row's outputs at the positions that mean something (no padding)."""
    logits = logits_of(out).float()
    if task == "sequence-classification":
        return list(logits)
    keep = batch["attention_mask"].bool() if task == "causal-lm" else batch["labels"] != IGNORE_INDEX
    return [row[mask] for row, mask in zip(logits, keep)]


def row_dependence(model: nn.Module, task: str, batches: list[dict], outputs: list) -> float | None:
    """Largest change of a row's outputs when the micro-batches run as one batch, relative to the
    outputs' size; None when the forward is random even with dropout off (the test would mean nothing)."""
    again = forward(model, batches[0], seed=1)
    if not torch.equal(logits_of(again), logits_of(outputs[0])):
        return None
    whole = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
    together = _valid_rows(forward(model, whole), whole, task)
    alone = [row for out, batch in zip(outputs, batches) for row in _valid_rows(out, batch, task)]
    scale = max(float(row.abs().max()) for row in alone) or 1.0
    return max(float((a - b).abs().max()) for a, b in zip(alone, together)) / scale


def packing_probe(model: nn.Module) -> str:
    """Two documents in one row, position_ids restarting, no attention_mask (how Trainer's padding-free
    collators and `gradaccum train --packing` send them): does the second see the first? The measure is
    the one `gradaccum train --packing` refuses by (`packing.packing_unsupported_reason`)."""
    attention = getattr(model.config, "_attn_implementation", None)
    try:
        change = packed_document_change(model)
    except Exception as error:  # noqa: BLE001 - the forward cannot take packed rows, whatever the reason
        return (f"not possible: the forward fails with position_ids ({first_line(error)}); "
                "gradaccum train --packing refuses it")
    if change > PACKING_TOLERANCE:
        return (f"leaks with {attention} attention: a packed document attends to the one before it "
                f"(logits change by {change:.1e}): pad instead of packing; gradaccum train --packing refuses it")
    filtered = attention_reason(model)
    ours = f"gradaccum train --packing refuses it ({filtered})" if filtered else "gradaccum train --packing accepts it"
    return f"exact with {attention} attention: packed documents stay apart; {ours}"
