"""The LM head's loss without the `[tokens, vocab]` logits, inside the model's own forward.

For a causal LM whose forward is `logits = lm_head(decoder(...))` (`losses._chunkable_parts`), the
head is swapped, for one forward, for `linear_cross_entropy_sum` on the target positions only: the
chunked cross-entropy that holds one `chunk x vocab` block of logits at a time and forms the
gradient during the forward. Everything else is the model's own forward, called as the trainer
calls it: through DDP (which must see the head's weight used in its forward), accelerate's autocast
wrapper, peft and gradient checkpointing. The model hands back a 1x1x1 placeholder as its "logits".

It is used only where it computes the trainer's loss: the objective is the plain shifted token
cross-entropy (no label smoothing), and on the first micro-batch the chunked sum equals the sum
from the full logits. Everything else keeps the full-logits path, which is exact too.
"""

from __future__ import annotations

import contextlib

import torch

from .. import distributed as dist_utils
from ..losses import DEFAULT_CHUNK_SIZE, _chunkable_parts, linear_cross_entropy_sum
from .objective import Objective, logits_of
from .probe import _close, _probing, one_row

CHUNK_SIZE = DEFAULT_CHUNK_SIZE  # tokens per block of logits (memory: CHUNK_SIZE x vocab in the loss dtype)


def why_not_chunked(trainer, model: torch.nn.Module, objective: Objective) -> str | None:
    """Why the chunked head cannot stand in for this model's logits (None: it can)."""
    if objective.level != "token" or not objective.shift or objective.labels_to_model:
        return "the loss is not the shifted token cross-entropy of a causal LM"
    if objective.smoothing:
        return "label smoothing needs the whole softmax"
    if getattr(trainer.args, "torch_compile", False):
        return "torch_compile: the compiled forward would not see the swapped head"
    parts = _chunkable_parts(model)
    if isinstance(parts, str):
        return parts
    head = parts[1]
    if "forward" in vars(head):  # e.g. accelerate's device-map hooks patch the instance's forward
        return "the LM head's forward is patched"
    return None


def head_of(model: torch.nn.Module) -> torch.nn.Linear:
    parts = _chunkable_parts(model)
    assert not isinstance(parts, str), parts
    return parts[1]


@contextlib.contextmanager
def _swapped(head: torch.nn.Linear, objective: Objective, batch: dict, chunk_size: int):
    """For the forward run inside: the head returns a placeholder and leaves the summed loss in the
    yielded dict ("loss_sum"); hidden states that do not line up with the labels get the real head."""
    found: dict = {}

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        labels = batch["labels"]
        if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
            return torch.nn.Linear.forward(head, hidden)  # e.g. a sliced logits_to_keep: the plain path
        rows, cols, targets, weights = objective.targets(batch)
        selected = hidden[:, :-1][rows.to(hidden.device), cols.to(hidden.device)]
        found["loss_sum"] = linear_cross_entropy_sum(selected, head.weight, targets.to(hidden.device), head.bias,
                                                     weights, chunk_size)
        return found["loss_sum"].reshape(1, 1, 1)

    head.forward = forward
    try:
        yield found
    finally:
        del head.forward


def chunked_loss_sum(model, head: torch.nn.Linear, objective: Objective, inputs: dict,
                     chunk_size: int = CHUNK_SIZE):
    """The model's forward with the chunked head: (summed loss of the micro-batch's targets, outputs)."""
    with _swapped(head, objective, inputs, chunk_size) as found:
        outputs = model(**objective.model_inputs(inputs))
    if "loss_sum" in found:
        return found["loss_sum"], outputs
    return objective.loss_sum(logits_of(outputs), inputs), outputs


def agrees_with_logits(model, head: torch.nn.Linear, objective: Objective, inputs: dict) -> tuple[bool, str]:
    """On one micro-batch (eval, no grad): does the chunked sum equal the sum from the full logits?"""
    logits = logits_of(model(**objective.model_inputs(inputs)))
    full, dtype = float(objective.loss_sum(logits, inputs)), logits.dtype  # bf16 under autocast
    del logits
    chunked = float(chunked_loss_sum(model, head, objective, inputs)[0])
    return _close(full, chunked, dtype), f"chunked head {chunked:.9g} vs full logits {full:.9g}"


def choose_head(trainer, batch: dict | None, objective: Objective, chunked: bool):
    """(the LM head to swap for the chunked loss, or None; which path, in words), agreed by every rank."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    reason = "chunked=False" if not chunked else why_not_chunked(trainer, model, objective)
    if reason is None and batch is not None:
        with _probing(trainer, model):
            inputs = one_row(trainer._prepare_inputs(batch))
            close, numbers = agrees_with_logits(model, head_of(model), objective, inputs)
        reason = None if close else f"on the first micro-batch, {numbers}"
    flag = torch.tensor([int(reason is None)], dtype=torch.int64)
    if dist_utils.is_distributed():
        flag = flag.to(trainer.args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    if int(flag) == 1:
        return head_of(model), "chunked"
    return None, f"full logits: {reason or 'another rank could not use the chunked head'}"
