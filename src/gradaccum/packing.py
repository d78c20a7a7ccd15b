"""Does a model keep packed documents apart? `gradaccum train --packing` is exact only when it does.

`data.pack` puts a micro-batch's examples end to end in one row, position_ids restarting at 0 for each
and no attention_mask. That row is the big batch's rows only if every token attends within its own
example. HF models do so when their mask builder reads the restarting position_ids as document
boundaries (transformers >= 4.53, the attention implementations in PACKING_ATTENTION). But not every
model asks that builder: some ignore position_ids (BART-style decoders, learned absolute positions),
some build their own causal mask (OPT, Bloom, MPT, Falcon), some carry a recurrent state along the row
(Mamba hybrids). So the attention implementation is only the fast first filter: the model is then run
on two documents packed in one row and on the second alone, and the second's logits must not change.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .errors import first_line
from .models import _is_peft_model, ordinary_token_ids

__all__ = ["PACKING_ATTENTION", "attention_reason", "packed_document_change", "packing_unsupported_reason"]

# Attention implementations whose HF mask builders (transformers >= 4.53) turn position_ids that restart
# at 0 into per-sequence blocks when there is no attention_mask: packed rows attend within each sequence.
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# Packed and alone, a document that keeps to itself goes through matmuls of other shapes: its logits
# differ by float rounding (~1e-6 of their size in float32). A document that sees another moves by
# 1e-2 and more, even in a random-init model.
PACKING_TOLERANCE = 1e-3
DOCUMENT_LENGTHS = (5, 5)  # tokens of the two probe documents


def packing_unsupported_reason(model: nn.Module) -> str | None:
    """None when `data.pack` batches are exact for this model, else why not (for an error message).

    Costs two no-grad forwards of a few tokens (milliseconds on a small model, well under a second
    on a 135M one on the CPU); the model is left in the mode it was in.
    """
    reason = attention_reason(model)
    if reason is not None:
        return reason
    name, attention = _describe(model)
    try:
        change = packed_document_change(model)
    except Exception as error:  # noqa: BLE001 - a packed micro-batch would fail the same way in training
        return f"{name}'s forward fails on a packed row (position_ids, no attention_mask): {first_line(error)}"
    if change > PACKING_TOLERANCE:
        return (f"{name} with {attention} attention lets a packed document attend to the one before it (in a "
                f"two-document probe, the second's logits change by {change:.1e} of their size)")
    return None


def attention_reason(model: nn.Module) -> str | None:
    """The fast filter, from the transformers version and the attention implementation alone: a reason
    when packing cannot be exact, None when it may be (the probe decides)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return "this transformers version does not read packed position_ids (need >= 4.53)"
    base = model.get_base_model() if _is_peft_model(model) else model
    if getattr(base, "config", None) is None or not type(base).__module__.startswith("transformers.models."):
        return f"{type(base).__name__} is not a transformers model"
    name, attention = _describe(model)
    if attention not in PACKING_ATTENTION:
        return f"attention implementation {attention!r} is not one of {', '.join(PACKING_ATTENTION)}"
    return None


def packed_document_change(model: nn.Module, seed: int = 0) -> float:
    """Two made-up documents packed in one row as `data.pack` sends them, then the second alone: the
    largest change of the second's logits, relative to their largest magnitude (0: kept apart).

    Runs in eval mode (dropout, random per forward, would hide the answer) and without a KV cache (HF
    reads position_ids as packed documents only when no cache is passed, as in training). Raises
    whatever the forward raises.
    """
    allowed = ordinary_token_ids(model)
    generator = torch.Generator().manual_seed(seed)
    first, second = (allowed[torch.randint(0, len(allowed), (length,), generator=generator)]
                     for length in DOCUMENT_LENGTHS)
    device = next(model.parameters()).device
    packed = {"input_ids": torch.cat([first, second])[None],
              "position_ids": torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None]}
    alone = {"input_ids": second[None], "position_ids": torch.arange(len(second))[None]}
    extra = {"use_cache": False} if _takes(model, "use_cache") else {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = _logits(model(**{k: v.to(device) for k, v in packed.items()}, **extra))
            reference = _logits(model(**{k: v.to(device) for k, v in alone.items()}, **extra))
    finally:
        model.train(was_training)
    seen, own = together[0, len(first):].double(), reference[0].double()
    return float((seen - own).abs().max()) / (float(own.abs().max()) or 1.0)


def _describe(model: nn.Module) -> tuple[str, str | None]:
    base = model.get_base_model() if _is_peft_model(model) else model
    return type(base).__name__, getattr(getattr(base, "config", None), "_attn_implementation", None)


def _takes(model: nn.Module, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]
