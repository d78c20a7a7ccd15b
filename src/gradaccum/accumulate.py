"""Exact gradient accumulation: K micro-batches that add up to exactly one big batch.

A *window* is the set of micro-batches that make one optimizer step, on every
data-parallel rank. Let S_k be the summed token loss of micro-batch k and n_k its
number of target tokens (labels != ignore_index, after the causal shift). Then

    naive:  L = (1/K) * sum_k S_k / n_k       right only when every n_k is equal
    exact:  L = sum_k S_k / N,   N = sum_k n_k over every micro-batch of the window
                                              on every rank (the big-batch mean)

So micro-batch k backpropagates  S_k / N,  times W when the data-parallel wrapper
(DDP, FSDP1, FSDP2/HSDP) averages gradients over W ranks, because their mean must come
out as a sum; N and W are over the ranks the wrapper reduces over (its own group or mesh).
N is counted from the labels *before* the first forward: one all-reduce per window.

normalize="samples" is the same equation one level up: S_k is the sum over
sequences of each sequence's mean token loss and N the number of sequences that
have at least one target.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from . import distributed as dist_utils
from .losses import count_target_sequences, count_targets, sequence_mean_sum, token_loss_sum
from .precision import LOW_PRECISION, FP32GradAccumulation


@dataclass
class StepStats:
    """What one window did. `loss` is the exact window loss over all ranks (sum S / N)."""

    step: int  # optimizer steps taken so far, this one included when it was taken
    loss: float  # nats per target token (or per sequence with normalize="samples"); nan if N == 0
    num_targets: int  # N: global target tokens (or target sequences) in the window
    grad_norm: float | None  # total gradient norm before clipping; None when the step was skipped
    lr: float | None  # learning rate of the first param group used for this step
    num_micro_batches: int  # micro-batches this rank ran in the window
    skipped: bool = False
    skip_reason: str | None = None  # "no_targets" or "nonfinite"


def default_labels(batch: Any) -> torch.Tensor:
    """Labels of a batch: `batch["labels"]` for dicts, the last element for tuples."""
    if isinstance(batch, Mapping) and "labels" in batch:
        return batch["labels"]
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[-1]):
        return batch[-1]
    raise ValueError(
        "cannot find labels in the batch: use dicts with a 'labels' key, tuples ending "
        "with the labels, or pass count_fn= to Accumulator"
    )


class Accumulator:
    """Drives exact gradient accumulation around any model, optimizer and scheduler."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        scheduler: Any = None,
        normalize: str = "tokens",
        ignore_index: int = -100,
        shift_labels: bool = True,
        accumulation: str = "exact",
        count_fn: Callable[[Any], int] | None = None,
        process_group: Any = None,
        skip_nonfinite: bool = True,
        accumulate_dtype: torch.dtype | str | None = "auto",
        gradient_average: bool | None = None,
    ):
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if normalize not in ("tokens", "samples"):
            raise ValueError(f"normalize must be 'tokens' or 'samples', got {normalize!r}")
        if accumulation not in ("exact", "naive"):
            raise ValueError(f"accumulation must be 'exact' or 'naive', got {accumulation!r}")
        _refuse_accelerate_accumulation(optimizer)
        self.model = model
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.scheduler = scheduler
        self.normalize = normalize
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.accumulation = accumulation
        self.count_fn = count_fn
        self.process_group = process_group
        self.gradient_average = gradient_average
        # Which ranks the gradients are reduced over, and whether averaged: read from the wrapper
        # (DDP, FSDP1, FSDP2/HSDP, also compiled) or from the two arguments; refused if unknown.
        self._reduction = dist_utils.describe(model, process_group, gradient_average)
        self._sync, self._factor = self._reduction.syncs, self._reduction.factor
        self.skip_nonfinite = skip_nonfinite
        self.step = 0  # optimizer steps taken
        self.num_skipped = 0  # windows whose optimizer step was skipped
        self.fp32_grads = self._fp32_accumulation(accumulate_dtype)
        self._loop: object | None = None  # the running windows() loop; a newer one or close() ends it
        self._warned_batch_statistics = False

    def _fp32_accumulation(self, accumulate_dtype: torch.dtype | str | None) -> FP32GradAccumulation | None:
        """Float32 sums for bf16/fp16 parameters' gradients (one rounding per window, not K).

        "auto" (the default) does it whenever the optimizer holds low-precision parameters and the
        model is not FSDP2-sharded (FSDP2 keeps its own sharded gradients: give it float32 parameters
        with a bf16 MixedPrecisionPolicy instead). None keeps autograd's native `.grad` sums.
        Its hooks live only while a windows() loop runs (see `grouped_windows`).
        """
        if accumulate_dtype is None:
            return None
        explicit = accumulate_dtype != "auto"
        dtype = torch.float32 if accumulate_dtype == "auto" else accumulate_dtype
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"accumulate_dtype must be a torch dtype, 'auto' or None, got {accumulate_dtype!r}")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not any(p.requires_grad and p.dtype in LOW_PRECISION for p in params):
            return None
        if dist_utils.shards_gradients(self.model):
            if explicit:
                raise ValueError("accumulate_dtype is not supported under FSDP: keep float32 parameters "
                                 "and pass MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
                                 "reduce_dtype=torch.float32) to fully_shard (FSDP1: "
                                 "MixedPrecision(param_dtype=..., reduce_dtype=torch.float32))")
            return None
        return FP32GradAccumulation(params, dtype, attach=False)

    # -- counting -------------------------------------------------------------
    def count(self, batch: Any) -> int:
        """Targets in one micro-batch: tokens, or sequences with normalize="samples"."""
        if self.count_fn is not None:
            return int(self.count_fn(batch))
        labels = default_labels(batch)
        self._check_shift(labels)
        if self.normalize == "samples":
            return count_target_sequences(labels, self.ignore_index, self.shift_labels)
        return count_targets(labels, self.ignore_index, self.shift_labels)

    def _check_shift(self, labels: torch.Tensor) -> None:
        # Labels of shape [batch] are one class per sample; the causal shift would silently
        # drop the first sample of every micro-batch from the count and the loss.
        if self.shift_labels and labels.dim() < 2:
            raise ValueError(f"labels of shape {tuple(labels.shape)} hold one target per sample (class ids), "
                             "but shift_labels=True shifts them as token sequences: pass shift_labels=False "
                             "to Accumulator")

    def _collective_device(self) -> torch.device:
        # NCCL only reduces CUDA tensors; gloo and single-process are happy on the CPU.
        param = next(self.model.parameters(), None)
        if param is not None and param.device.type == "cuda":
            return param.device
        return torch.device("cpu")

    # -- the loop ---------------------------------------------------------------
    def windows(self, batches: Iterable[Any]) -> Iterator["Window"]:
        """Group `batches` into windows of `accumulation_steps`; the last may be partial."""
        iterator = iter(batches)
        groups = iter(lambda: list(itertools.islice(iterator, self.accumulation_steps)), [])
        return self.grouped_windows(groups)

    def grouped_windows(self, groups: Iterable[list[Any]]) -> Iterator["Window"]:
        """One window per list of micro-batches, for loops that form windows themselves.

        Under data parallelism every rank runs the same number of windows: a rank whose
        data ran out while others still have some gets a fully-masked micro-batch, so its
        backward still joins the gradient all-reduce and adds exactly zero. Under FSDP1 and
        FSDP2, whose forward gathers weights collectively, every rank is padded with such
        micro-batches to the same number of micro-batches.

        The float32 gradient hooks (bf16/fp16 parameters) are attached, with empty sums, when the
        loop starts and removed when it ends -- exhausted, broken out of, or left by an exception --
        so an abandoned window's partial sums never reach a later step, and a later Accumulator on
        the same parameters gets their gradients. Two loops live at once on the same parameters
        (two Accumulators) are refused with a ValueError; a newer loop of the same Accumulator ends
        the older one.
        """
        self._warn_batch_statistics()
        fp32 = self.fp32_grads
        if fp32 is not None:
            fp32.attach()  # empty sums; refuses parameters another live loop accumulates
        loop = self._loop = object()
        windows = self._grouped_windows(groups)
        try:
            for window in windows:
                if fp32 is not None:
                    # DDP(find_unused_parameters=True) may reduce sums the last backward does not reach and
                    # tells used from unused parameters by their `.grad`; a manual reduction may miss them too.
                    fp32.find_unused_parameters = self._sync and getattr(self.model, "find_unused_parameters", True)
                yield window
                if self._loop is not loop:
                    raise RuntimeError("this windows() loop was closed: Accumulator.close(), the end of its "
                                       "`with` block, or a newer windows() loop of the same Accumulator")
        finally:
            windows.close()
            if self._loop is loop:
                self.close()

    def _warn_batch_statistics(self) -> None:
        # Checked when a loop starts, not in __init__: model.train() / .eval() usually come later.
        if self._warned_batch_statistics:
            return
        across_ranks = self._sync and self._reduction.num_ranks > 1
        names = batch_statistics_layers(self.model, self.accumulation_steps > 1, across_ranks)
        if not names:
            return
        self._warned_batch_statistics = True
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        seen = (f"one micro-batch (accumulation_steps={self.accumulation_steps})" if self.accumulation_steps > 1
                else "one rank's share of the batch (no SyncBatchNorm)")
        warnings.warn(
            f"the model has BatchNorm layers that normalise with the statistics of the batch they are given "
            f"({shown}); each sees {seen}, not the whole window, so no gradient accumulation (exact included) "
            "reproduces the big batch through them, and their running statistics are updated once per "
            "micro-batch. For an exact big batch use GroupNorm or LayerNorm, or keep the BatchNorm layers in "
            "eval mode (frozen running statistics: call .eval() on them after model.train())",
            stacklevel=3,
        )

    def close(self) -> None:
        """End the running windows() loop's float32 hooks and sums (also on leaving a `with` block)."""
        self._loop = None
        if self.fp32_grads is not None:
            self.fp32_grads.detach()

    def __enter__(self) -> "Accumulator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _grouped_windows(self, groups: Iterable[list[Any]]) -> Iterator["Window"]:
        iterator = iter(groups)
        self.optimizer.zero_grad(set_to_none=True)
        template, sync, reduction = None, self._sync, self._reduction
        num_ranks, my_rank = (reduction.num_ranks, reduction.rank) if sync else (1, 0)
        same_length = sync and reduction.collective_forward
        for index in itertools.count():
            micro_batches = list(next(iterator, []))
            if len(micro_batches) > self.accumulation_steps:
                raise ValueError(f"a window of {len(micro_batches)} micro-batches exceeds "
                                 f"accumulation_steps={self.accumulation_steps}")
            counts = [self.count(batch) for batch in micro_batches]
            # One collective per window: [targets, micro-batches of rank 0, ..., of rank W-1].
            totals = torch.zeros(1 + num_ranks, dtype=torch.float64, device=self._collective_device())
            totals[0], totals[1 + my_rank] = sum(counts), len(micro_batches)
            if sync:
                reduction.all_reduce_sum(totals)
            num_targets, per_rank = int(totals[0]), totals[1:].long().tolist()
            if sum(per_rank) == 0:
                return
            template = micro_batches[-1] if micro_batches else template
            num_real = len(micro_batches)
            needed = max(per_rank) if same_length else max(1, len(micro_batches))
            while len(micro_batches) < needed:
                micro_batches.append(self._masked_copy(template))
                counts.append(0)
            window = Window(self, index, micro_batches, counts, num_targets, num_real)
            yield window
            if not window.stepped:
                raise RuntimeError("call window.step() before moving on to the next window")

    def _masked_copy(self, batch: Any) -> Any:
        if isinstance(batch, Mapping) and "labels" in batch:
            return {**batch, "labels": torch.full_like(batch["labels"], self.ignore_index)}
        raise ValueError(
            f"rank {dist_utils.rank()} has no micro-batch in a window where other ranks do; "
            "give every rank data, or use dict batches with 'labels' so it can join with a masked one"
        )

    # -- checkpointing ------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step, self.num_skipped = int(state["step"]), int(state["num_skipped"])


class Window:
    """One optimizer step's micro-batches. Iterate it, backpropagate `loss()`, then `step()`."""

    def __init__(self, acc: Accumulator, index: int, batches: list, counts: list[int], num_targets: int,
                 num_real: int):
        self.acc = acc
        self.index = index  # 0-based window number within this `windows()` loop
        self.batches = batches  # this rank's micro-batches
        self.num_targets = num_targets  # N, global, known before the first forward
        self.micro_step: int | None = None  # index of the micro-batch being run
        self.stepped = False
        self._counts = counts  # n_k of this rank's micro-batches
        self._num_real = num_real  # micro-batches of this rank's own data (masked fillers excluded)
        self._factor = acc._factor
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=acc._collective_device())

    @property
    def num_micro_batches(self) -> int:
        return len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        last = len(self.batches) - 1
        for micro_step, batch in enumerate(self.batches):
            self.micro_step = micro_step
            # Gradients are reduced over ranks only on the last backward of the window, so that
            # backward must find the whole float32 sum in .grad.
            if self.acc.fp32_grads is not None and micro_step == last and self.acc._sync:
                self.acc.fp32_grads.prepare_reduction()
            with dist_utils.gradient_sync(self.acc.model, enabled=micro_step == last):
                yield batch
        self.micro_step = None

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This micro-batch's exact share of the window loss, ready for `.backward()`."""
        acc = self.acc
        acc._check_shift(labels)
        if acc.normalize == "samples":
            summed = sequence_mean_sum(logits, labels, acc.ignore_index, acc.shift_labels)
            num_local = count_target_sequences(labels, acc.ignore_index, acc.shift_labels)
        else:
            summed = token_loss_sum(logits, labels, acc.ignore_index, acc.shift_labels)
            num_local = count_targets(labels, acc.ignore_index, acc.shift_labels)
        return self.scale(summed, num_micro_targets=num_local)

    def scale(self, summed_loss: torch.Tensor, num_micro_targets: int | None = None) -> torch.Tensor:
        """Turn a *summed* loss of this micro-batch into its exact share: S_k * W / N.

        `num_micro_targets` (n_k) only matters for accumulation="naive"; it defaults to
        the count taken for the current micro-batch.
        """
        self._loss_sum += summed_loss.detach().to(self._loss_sum)
        if self.acc.accumulation == "naive":
            # The bug on purpose: each micro-batch's own mean, averaged over micro-batches,
            # and left to DDP to average over ranks.
            if num_micro_targets is None:
                if self.micro_step is None:
                    raise ValueError("naive scale() outside the window loop needs num_micro_targets")
                num_micro_targets = self._counts[self.micro_step]
            if num_micro_targets == 0:
                return summed_loss * 0.0
            return summed_loss / (num_micro_targets * max(1, self._num_real))
        if self.num_targets == 0:
            return summed_loss * 0.0  # keeps the graph (DDP needs the backward) without 0/0
        return summed_loss * (self._factor / self.num_targets)

    def step(self) -> StepStats:
        """Clip once, step the optimizer and scheduler once, zero the gradients."""
        if self.stepped:
            raise RuntimeError("window.step() was already called for this window")
        self.stepped = True
        acc = self.acc
        params = [p for group in acc.optimizer.param_groups for p in group["params"]]
        lr = acc.optimizer.param_groups[0].get("lr") if acc.optimizer.param_groups else None
        loss_sum = self._loss_sum.clone()
        if acc._sync:
            acc._reduction.all_reduce_sum(loss_sum)
        loss = float(loss_sum) / self.num_targets if self.num_targets else math.nan

        def skip(reason: str, grad_norm: float | None) -> StepStats:
            if acc.fp32_grads is not None:
                acc.fp32_grads.zero()
            acc.optimizer.zero_grad(set_to_none=True)
            acc.num_skipped += 1
            return StepStats(acc.step, loss, self.num_targets, grad_norm, lr, len(self.batches), True, reason)

        if self.num_targets == 0:
            warnings.warn(f"window {self.index} has no target tokens: optimizer step skipped", stacklevel=2)
            return skip("no_targets", None)
        if acc.fp32_grads is not None:  # norm and clipping on the float32 sums, then one cast to bf16
            grad_norm = acc.fp32_grads.flush(acc.max_grad_norm, params)
        else:
            grad_norm = _clip_grad_norm(params, acc.max_grad_norm, acc._reduction.clip_module)
        if acc.skip_nonfinite and not math.isfinite(grad_norm):
            warnings.warn(f"window {self.index}: gradient norm is {grad_norm}: optimizer step skipped",
                          stacklevel=2)
            return skip("nonfinite", grad_norm)
        gradient_state = getattr(acc.optimizer, "gradient_state", None)  # Accelerate's AcceleratedOptimizer
        if gradient_state is not None and not gradient_state.sync_gradients:
            # Inside accelerator.accumulate() its step() is a silent no-op: the window would be lost.
            raise RuntimeError("window.step() inside accelerator.accumulate(): Accelerate would skip the "
                               "optimizer step; do not wrap the Accumulator's loop in accelerator.accumulate()")
        acc.optimizer.step()
        if acc.scheduler is not None:
            acc.scheduler.step()
        acc.optimizer.zero_grad(set_to_none=True)
        acc.step += 1
        return StepStats(acc.step, loss, self.num_targets, grad_norm, lr, len(self.batches))


def _refuse_accelerate_accumulation(optimizer: Any) -> None:
    """Accelerate's own accumulation divides the loss by its K and skips steps: two accumulators in one loop."""
    gradient_state = getattr(optimizer, "gradient_state", None)
    num_steps = getattr(gradient_state, "num_steps", 1) if gradient_state is not None else 1
    if num_steps != 1:
        raise ValueError(f"the optimizer comes from an Accelerator with gradient_accumulation_steps={num_steps}: "
                         "Accelerate would divide each loss by it and skip optimizer steps; create the "
                         "Accelerator with gradient_accumulation_steps=1 and let the Accumulator accumulate")


def batch_statistics_layers(model: nn.Module, per_micro_batch: bool = True,
                            across_ranks: bool = False) -> list[str]:
    """Names of the BatchNorm layers whose forward normalises with the statistics of its own batch.

    That is any `_BatchNorm` in training mode, or in eval mode without running statistics
    (track_running_stats=False). Accumulation splits that batch into micro-batches
    (`per_micro_batch`); data parallelism splits it into ranks (`across_ranks`), which
    SyncBatchNorm alone joins up again.
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if not (module.training or module.running_mean is None):
            continue
        if per_micro_batch or (across_ranks and not isinstance(module, nn.SyncBatchNorm)):
            names.append(f"{name or 'model'}: {type(module).__name__}")
    return names


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float | None, fsdp1_root: Any = None) -> float:
    """Total L2 norm of the gradients before clipping; clip to `max_norm` if given."""
    if fsdp1_root is not None:  # sharded flat gradients: the norm is summed over the shards
        return dist_utils.fsdp1_clip_grad_norm(fsdp1_root, params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if hasattr(nn.utils, "get_total_norm"):  # torch >= 2.6: norm without touching the grads
        total = nn.utils.get_total_norm(grads)
        if hasattr(total, "full_tensor"):  # FSDP2: a partial norm over shards
            total = total.full_tensor()
        if max_norm is not None:
            nn.utils.clip_grads_with_norm_(params, max_norm, total)
    else:
        total = nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
        if hasattr(total, "full_tensor"):
            total = total.full_tensor()
    return float(total)
