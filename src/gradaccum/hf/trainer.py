"""The Trainer overrides, shared by `make_exact` (a dynamic subclass) and `ExactTrainer`."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer

from .. import distributed as dist_utils
from ..errors import ConfigError
from .head import choose_head, chunked_loss_sum
from .objective import Objective, logits_of
from .probe import resolve_objective

NORMALIZE_CHOICES = ("tokens", "samples", "auto")


@dataclass
class _State:
    normalize: str
    chunked: bool = True
    objective: Objective | None = None
    head: torch.nn.Linear | None = None  # the LM head swapped for the chunked loss (None: full logits)
    head_path: str = ""  # "chunked", or "full logits: <why>"
    world_factor: float = 1
    reduction: dist_utils.GradientReduction | None = None  # how DDP (or nothing) reduces the gradients
    window_targets: int = -1  # global targets of the current window; -1 before the first
    in_training_step: bool = False
    last_loss: torch.Tensor | None = None
    checked_scaling: bool = False
    guarded: list = field(default_factory=list)  # optimizers whose step skips empty windows


class _ExactMixin:
    """Trainer methods that make each optimizer step the big batch (see the module docstring)."""

    _gradaccum: _State

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        # Trainer's own window (fewer batches at the end of an epoch); its count is replaced by ours.
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        state = self._gradaccum
        if state.objective is None:
            state.reduction = _reduction_of(self)
            state.world_factor = state.reduction.factor
            first = batches[0] if batches else None
            state.objective = resolve_objective(self, first, state.normalize, _trainer_name(self))
            state.head, state.head_path = choose_head(self, first, state.objective, state.chunked)
        local = torch.zeros((), dtype=torch.int64)
        for batch in batches:
            local = local + state.objective.count(batch).to("cpu")
        total = state.reduction.all_reduce_sum(local.to(self.args.device))
        state.window_targets = int(total)
        _guard_optimizer_step(self)
        if state.window_targets == 0 and batches:
            # The step Trainer is about to count logs nothing: the next log divides by fewer steps.
            self._globalstep_last_logged += 1
            warnings.warn(f"gradaccum: window {self.state.global_step + 1} has no targets on any rank: "
                          "no forward, no optimizer or scheduler step", stacklevel=2)
        return batches, total

    def training_step(self, model, inputs, *args, **kwargs):
        state = self._gradaccum
        if state.window_targets == 0:
            return torch.zeros((), device=self.args.device)
        accepts = self.model_accepts_loss_kwargs
        # Trainer divides by the accumulation steps unless it believes the loss already used the count;
        # both flags say so (loss_is_scaled_for_ga in recent transformers, the older rule otherwise).
        self.model_accepts_loss_kwargs, self.loss_is_scaled_for_ga = True, True
        state.in_training_step = True
        try:
            loss = super().training_step(model, inputs, *args, **kwargs)
        finally:
            state.in_training_step = False
            self.model_accepts_loss_kwargs = accepts
        if not state.checked_scaling:
            if state.last_loss is None or not torch.equal(loss.detach().reshape(()), state.last_loss.reshape(())):
                raise RuntimeError("make_exact: Trainer.training_step rescaled the exact loss (this transformers "
                                   "version divides it again); please report it with your transformers version")
            state.checked_scaling = True
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        state = self._gradaccum
        if not state.in_training_step:  # evaluation and prediction keep the trainer's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        objective = state.objective
        if state.head is not None:  # the model's forward with the chunked LM-head loss: no full logits
            summed, outputs = chunked_loss_sum(model, state.head, objective, inputs)
        else:
            outputs = model(**objective.model_inputs(inputs))
            summed = objective.loss_sum(logits_of(outputs), inputs)
        loss = summed * (state.world_factor / state.window_targets)
        state.last_loss = loss.detach()
        return (loss, outputs) if return_outputs else loss


def _guard_optimizer_step(trainer) -> None:
    """Make the (accelerate-wrapped) optimizer skip its step in a window without targets.

    Marking the step as skipped (accelerate's overflow flag, as for an fp16 overflow) also makes
    Trainer leave the learning-rate scheduler alone, as the big batch, which has no such window, would.
    """
    optimizer, state = trainer.optimizer, trainer._gradaccum
    if optimizer is None or any(o is optimizer for o in state.guarded):
        return
    original = optimizer.step

    @functools.wraps(original)  # keeps the LR scheduler's mark on the step it wrapped
    def step(*args, **kwargs):
        if hasattr(optimizer, "_is_overflow"):
            optimizer._is_overflow = state.window_targets == 0
        if state.window_targets == 0:
            # No backward ran, so torch's optimizers would skip every parameter anyway; others may not.
            return None
        return original(*args, **kwargs)

    optimizer.step = step
    state.guarded.append(optimizer)


def _reduction_of(trainer) -> dist_utils.GradientReduction:
    """At the first window, when the model is wrapped: how its gradients are reduced over ranks; DDP
    (or one process) only, which we can verify."""
    if getattr(trainer.accelerator, "gradient_accumulation_steps", 1) != 1:
        raise ConfigError("make_exact: accelerate's gradient_accumulation_steps must be 1 (Trainer sets it so); "
                         "set the accumulation with TrainingArguments.gradient_accumulation_steps")
    wrapped = dist_utils.unwrap_compiled(trainer.model_wrapped)
    if dist_utils.world_size() > 1 and not isinstance(wrapped, DistributedDataParallel):
        raise ConfigError(f"make_exact: {dist_utils.world_size()} processes but the model is a "
                         f"{type(wrapped).__name__}, not DistributedDataParallel; launch with torchrun so that "
                         "Trainer wraps it")
    try:
        return dist_utils.describe(trainer.model_wrapped)
    except ValueError as exc:  # e.g. a DDP communication hook that may not average
        raise ConfigError(f"make_exact: {exc}") from exc


def _check_supported(trainer) -> None:
    """Refuse, before training, what make_exact cannot make the big batch."""
    args = trainer.args
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ConfigError("make_exact: compute_loss_func is set; gradaccum computes the training loss itself and "
                         "cannot verify a custom one. Remove it, or train with gradaccum.Accumulator and "
                         "window.scale(summed_loss)")
    if getattr(args, "n_gpu", 1) > 1:
        raise ConfigError(f"make_exact: {args.n_gpu} GPUs in one process (nn.DataParallel); launch one process per "
                         "GPU with torchrun, which make_exact supports (DDP)")
    for flag, what in (("is_deepspeed_enabled", "DeepSpeed"), ("is_fsdp_enabled", "FSDP"),
                       ("is_fsdp_xla_enabled", "FSDP on XLA")):
        if getattr(trainer, flag, False):
            raise ConfigError(f"make_exact: {what} is not supported (how it reduces gradients is not verified "
                             "here); use DDP (torchrun) or one process")
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    for kind in ("tp", "cp", "sp"):
        if parallelism is not None and getattr(parallelism, f"{kind}_enabled", False):
            raise ConfigError(f"make_exact: {kind.upper()} parallelism is not supported; use DDP (torchrun)")
    loss_type = getattr(args, "loss_type", None)
    if loss_type not in (None, "nll"):
        raise ConfigError(f"make_exact: {type(args).__name__}.loss_type={loss_type!r} is not a token cross-entropy; "
                         "make_exact handles loss_type='nll' only")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ConfigError("make_exact: the MoE router auxiliary loss is a per-micro-batch statistic that no "
                         "accumulation reproduces; set router_aux_loss_coef=0.0 to train without it")


def _trainer_name(trainer) -> str:
    return next(cls.__name__ for cls in type(trainer).__mro__ if not issubclass(cls, _ExactMixin))


_EXACT_CLASSES: dict[type, type] = {}


def _exact_class(cls: type) -> type:
    if issubclass(cls, _ExactMixin):
        return cls
    if cls not in _EXACT_CLASSES:
        _EXACT_CLASSES[cls] = type(f"Exact{cls.__name__}", (_ExactMixin, cls),
                                   {"__module__": __name__, "__doc__": cls.__doc__})
    return _EXACT_CLASSES[cls]


def _set_up(trainer, normalize: str, chunked: bool) -> None:
    if normalize not in NORMALIZE_CHOICES:
        raise ConfigError(f"make_exact: normalize must be one of {', '.join(NORMALIZE_CHOICES)}; got {normalize!r}")
    if not isinstance(chunked, bool):
        raise ConfigError(f"make_exact: chunked must be True or False; got {chunked!r}")
    _check_supported(trainer)
    trainer._gradaccum = _State(normalize=normalize, chunked=chunked)
    trainer.loss_is_scaled_for_ga = True


def make_exact(trainer, normalize: str = "auto", chunked: bool = True):
    """Patch `trainer` (transformers.Trainer or a subclass, TRL's SFTTrainer included) in place so that
    every optimizer step is exactly the big batch; returns the same object.

    normalize: "tokens" (the mean over the window's target tokens, what HF trains), "samples" (the
    mean over sequences of each sequence's token mean), or "auto" (tokens for token-level heads; one
    target per label for sequence classification/regression). chunked: for plain causal LMs (Llama,
    Mistral, Qwen2/3, Phi, Gemma 1, OLMo, ... see `losses._chunkable_parts`), bare or with LoRA, the
    training loss comes from a chunked LM head that never builds the [tokens, vocab] logits; other
    models, and chunked=False, use the full logits (`trainer._gradaccum.head_path` says which).
    Raises ValueError for what it cannot make exact (see `_check_supported`); the loss itself is
    checked at the first window.
    """
    if not isinstance(trainer, Trainer):
        raise ConfigError(f"make_exact: expected a transformers.Trainer (or subclass) instance, got "
                         f"{type(trainer).__name__}")
    _set_up(trainer, normalize, chunked)
    trainer.__class__ = _exact_class(type(trainer))
    return trainer


class ExactTrainer(_ExactMixin, Trainer):
    """transformers.Trainer whose gradient accumulation is exactly the big batch, for any model.

    Takes Trainer's arguments plus normalize ("auto", "tokens" or "samples") and chunked (see `make_exact`).
    """

    def __init__(self, *args, normalize: str = "auto", chunked: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        _set_up(self, normalize, chunked)
