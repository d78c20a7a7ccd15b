"""Activation checkpointing, one non-reentrant checkpoint per decoder layer (models re-exports these).

    enable_gradient_checkpointing(model)    # after LoRA, before fully_shard
    gradient_checkpointing_enabled(model)
    disable_gradient_checkpointing(model)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ModelError


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _hf_model(model: nn.Module) -> nn.Module | None:
    """The transformers model (under peft, the base) when it checkpoints its own layers, else None."""
    base = model.get_base_model() if is_peft_model(model) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        return None
    if not (hasattr(base, "activation_checkpointing_enable") or hasattr(base, "gradient_checkpointing_enable")):
        return None
    return base


class _CheckpointedForward:
    """Put in front of a layer's class: while training with grad, its forward runs under a non-reentrant
    checkpoint. The layer keeps its attributes and state-dict names (no wrapper module in between); the
    forward, not __call__, is checkpointed, so module hooks (FSDP2's gathers) run once, outside."""

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            _refuse_running_statistics(self, f"{type(self).__name__.removeprefix('Checkpointed')}'s ")
            # preserve_rng_state (the default): the recompute draws the same dropout masks, and the
            # global RNG advances exactly as without checkpointing.
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


def _refuse_running_statistics(layer: nn.Module, where: str) -> None:
    """ModelError naming the first module in `layer` (`where` + its name) whose training forward updates running
    statistics (BatchNorm's running mean and variance, num_batches_tracked; InstanceNorm's with
    track_running_stats): the recompute in backward would update them a second time, and the buffers would
    differ from a plain run's."""
    for name, module in layer.named_modules():
        if module.training and (getattr(module, "track_running_stats", False) is True
                                or isinstance(getattr(module, "running_mean", None), torch.Tensor)):
            raise ModelError(f"--gradient-checkpointing: {(where + name).strip('. ')} ({type(module).__name__}) "
                             "updates running statistics in every training forward, and its recompute in backward "
                             "would update them twice; freeze them (call .eval() on it) or train without "
                             "--gradient-checkpointing")


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED_CLASSES:
        _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_CheckpointedForward, cls),
                                          {"__module__": cls.__module__})
    return _CHECKPOINTED_CLASSES[cls]


def _repeated_layers(module: nn.Module) -> list[nn.Module]:
    """The elements of the outermost nn.ModuleLists (decoder layers), not looking inside them (experts)."""
    found = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            found.extend(layer for layer in child if any(True for _ in layer.parameters()))
        else:
            found.extend(_repeated_layers(child))
    return found


def enable_gradient_checkpointing(model: nn.Module) -> str:
    """Switch on activation checkpointing, one non-reentrant checkpoint per decoder layer; say how, in words.

    Each layer keeps only its input from the forward and recomputes its activations in backward, so
    activation memory drops from every layer's intermediates to one layer's plus the layer inputs, for
    about one more forward of compute. The gradients are those of the plain model (the recompute
    replays the same arithmetic and the same dropout masks), so accumulation stays exact.

    transformers models (under peft too: the base is switched) use their own implementation with
    `use_reentrant=False`, which also disables the KV cache in training. Other models get the elements
    of their outermost nn.ModuleLists checkpointed. The LM head is outside every layer: the chunked
    head of `CausalLMLoss` runs once, after the body, never inside a recompute. Under FSDP2, call this
    before `fully_shard`. Raises ModelError for a model with neither.
    """
    base = _hf_model(model)
    if base is not None:
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        checkpointed = {name: module for name, module in base.named_modules()
                        if getattr(module, "gradient_checkpointing", False) is True}
        try:
            for name, module in checkpointed.items():
                _refuse_running_statistics(module, f"{name}.")
        except ModelError:
            disable_gradient_checkpointing(model)
            raise
        layers = len(checkpointed)
        return f"activation checkpointing: transformers' own, non-reentrant ({layers} modules)"
    layers = _repeated_layers(model)
    if not layers:
        raise ModelError(f"--gradient-checkpointing: {type(model).__name__} is not a transformers model with "
                         "checkpointing support and has no nn.ModuleList of layers to checkpoint")
    names = {id(module): name for name, module in model.named_modules()}
    for layer in layers:  # all checked before any is switched: a refusal changes nothing
        _refuse_running_statistics(layer, f"{names[id(layer)]}.")
    for layer in layers:
        if not isinstance(layer, _CheckpointedForward):
            layer.__class__ = _checkpointed_class(type(layer))
    return f"activation checkpointing: each of {len(layers)} layers (nn.ModuleList elements), non-reentrant"


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo `enable_gradient_checkpointing` (before any fully_shard)."""
    base = _hf_model(model)
    if base is not None:
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
        if hasattr(base, "disable_input_require_grads"):
            # transformers' enable hooks the input embeddings (for frozen bases); its disable leaves it
            # on for a model without peft config.
            base.disable_input_require_grads()
        return
    originals = {checkpointed: cls for cls, checkpointed in _CHECKPOINTED_CLASSES.items()}
    for layer in model.modules():
        if isinstance(layer, _CheckpointedForward):
            if type(layer) not in originals:
                raise ModelError(f"cannot switch checkpointing off on {type(layer).__name__}: it was wrapped "
                                 "again (fully_shard?) after checkpointing was switched on")
            layer.__class__ = originals[type(layer)]


def gradient_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether a training forward of `model` recomputes (some of) its layers in backward."""
    return any(isinstance(m, _CheckpointedForward) or getattr(m, "gradient_checkpointing", False) is True
               for m in model.modules())
