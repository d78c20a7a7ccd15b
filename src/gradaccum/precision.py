"""fp32 gradient accumulation for bf16 (or fp16) parameters.

The problem. With parameters stored in bf16, autograd accumulates `.grad` in bf16: micro-batch k's
gradient is added to a bf16 running sum and the sum is rounded to 8 significant bits after every
addition. Over K micro-batches those roundings pile up (each addition can lose up to half an ulp of
the running sum, which grows with k), and small contributions added to a large sum are lost outright.
The big batch computes its gradient as one sum; accumulation should not be the lossy part.

The design. `FP32GradAccumulation(params)` registers a `Tensor.register_post_accumulate_grad_hook`
on every low-precision trainable parameter. The hook runs once per backward, right after autograd
has put this micro-batch's gradient in `p.grad` (bf16, since nothing was there to add it to):

    buffer[p] += p.grad   (in float32; the first micro-batch just upcasts)
    p.grad = None         (the bf16 gradient is freed at once)

so `.grad` never holds a running sum, and each micro-batch's bf16 gradient lives only from its
accumulation until the hook, one parameter at a time. (A tensor hook before the accumulation empties
whatever `.grad` shows next to a float32 sum, so autograd never adds a gradient to it.) Before the
optimizer step, `flush()` writes the float32 sums back into `.grad`. PyTorch forbids a `.grad` of
another dtype than its parameter, so for a bf16 parameter the sum is cast to bf16 *once* -- one
rounding instead of K.
`flush(max_norm, all_params)` stands in for `clip_grad_norm_(all_params, max_norm)`: it computes the
total norm from the float32 sums and clips them *before* that cast (the norm of bf16 gradients is
itself a bf16 number, 3 significant digits, and clipping bf16 gradients rounds them once more).
Optimizers that can use float32 gradients directly (e.g. one keeping float32 master weights) read
`grads()` instead of `.grad`.

What it gains, measured on a bf16 tiny Llama (tests/test_precision.py): benchmarks/README.md,
"fp32 gradient accumulation". What remains is the one cast to bf16.

Memory: 4 bytes per trainable parameter for the float32 buffers (bf16 `.grad` would take 2), held from
the first backward of a window until `flush()`, which frees them. Parameters already in float32 (or
float64) are left alone: their `.grad` accumulates at full precision anyway.

Lifetime. The hooks live from `attach()` (at construction unless attach=False) to `detach()` (or the
end of a `with` block); `Accumulator` attaches them when a windows() loop starts and detaches them when
it ends, so sums of an abandoned window never reach a later step and a later Accumulator on the same
model gets its gradients. One instance at a time may be attached to a parameter: a second one raises
ValueError (the two would each take part of every gradient).

Data parallel: under DDP the gradient reduction happens inside the last backward of a window, so
that backward must find the whole sum in `.grad`. `prepare_reduction()` before the last micro-batch
switches to `write_through`: the hook adds the micro-batch to the float32 sum and writes the sum, cast
once, into `.grad` (the post-accumulate-grad hook runs before DDP's reducer hook), so DDP reduces the
accumulated gradient (in the parameter dtype, as DDP's buckets are). Checked with 2 gloo ranks x 4
micro-batches: 5.4e-3 from the float32 big batch, against 0.98 if only the last micro-batch were
reduced.
A parameter the last backward does not reach (an MoE expert, a branch only earlier micro-batches took)
needs two more things under DDP(find_unused_parameters=True), which `find_unused_parameters = True`
turns on. DDP reduces such a parameter from its `.grad` when the backward starts, so
`prepare_reduction()` casts every sum into `.grad` beforehand, keeping the float32 sums for the
parameters the backward does reach: these still get `sum + gradient` added in float32 and cast once
(the cast of the sum is dropped unread); every gradient gets exactly one rounding. The cost is 2 bytes
per parameter with a sum for the last micro-batch's forward and backward (cast and float32 sum both
held). And DDP counts a parameter as used in a no-sync backward only if `.grad` is defined after it:
parameters used by no rank are left out of the reduction, `.grad` untouched. So after each
accumulating backward `.grad` is a placeholder, one zero broadcast to the parameter's shape (no
memory), instead of None. Checked with 2 gloo ranks x 3 micro-batches, a branch used only by the first
micro-batch and one also by rank 0's last: the ranks stay bit-identical and the branches' gradients are
4.4e-3 to 5.5e-3 from the float32 big batch, as with native bf16 `.grad` (without these, 0.7 to 1.07,
and the ranks drift apart).
FSDP2 is not supported (it reduce-scatters and accumulates sharded gradients itself; untested here):
there, keep float32 sharded parameters with MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=torch.float32).

    with FP32GradAccumulation(model.parameters()) as fp32:   # hooks on; off at the end of the block
        for k, batch in enumerate(micro_batches):
            loss(batch).backward()      # .grad stays None: the sum lives in fp32 buffers
        norm = fp32.flush(max_norm=1.0, all_params=model.parameters())  # clip in fp32, cast once
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Iterable

import torch

__all__ = ["FP32GradAccumulation"]

LOW_PRECISION = (torch.bfloat16, torch.float16)

# id(parameter) -> (the parameter, the attached FP32GradAccumulation), both weakly: one owner per parameter.
_ATTACHED: dict[int, tuple[weakref.ref, weakref.ref]] = {}


class FP32GradAccumulation:
    """Accumulate the gradients of low-precision parameters in float32 buffers across backwards."""

    def __init__(self, params: Iterable[torch.Tensor], accumulate_dtype: torch.dtype = torch.float32,
                 attach: bool = True):
        if not accumulate_dtype.is_floating_point or torch.finfo(accumulate_dtype).bits < 32:
            raise ValueError(f"accumulate_dtype must be float32 or float64, got {accumulate_dtype}")
        self.accumulate_dtype = accumulate_dtype
        seen: set[int] = set()
        self.params: list[torch.Tensor] = []
        for p in params:
            if isinstance(p, dict):  # an optimizer's param group
                raise ValueError("FP32GradAccumulation takes parameters, not param groups: pass "
                                 "[p for g in optimizer.param_groups for p in g['params']]")
            if p.requires_grad and p.dtype in LOW_PRECISION and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self._buffers: dict[int, torch.Tensor] = {}
        self._zeros: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._handles: list = []
        self.write_through = False  # the backward that a data-parallel wrapper reduces: see prepare_reduction()
        # The reducing backward may miss parameters that have a sum, and the wrapper learns which
        # parameters were used from `.grad` (DDP(find_unused_parameters=True)): see the module docstring.
        self.find_unused_parameters = False
        if attach:
            self.attach()

    # -- lifetime --------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Register the hooks (a no-op when attached) and start from empty sums.

        Refuses parameters whose gradients another attached instance is accumulating: the two would
        split every gradient between their buffers."""
        if not self._handles:
            for p in self.params:
                entry = _ATTACHED.get(id(p))
                other = entry[1]() if entry is not None and entry[0]() is p else None
                if other is not None and other is not self:
                    raise ValueError(
                        "these bf16/fp16 parameters already accumulate their gradients in float32 for another "
                        "Accumulator (its windows() loop is still running) or FP32GradAccumulation: finish that "
                        "loop or call its close() (or detach()) first; two at once would each get part of "
                        "every gradient")
            for p in self.params:
                _ATTACHED[id(p)] = (weakref.ref(p), weakref.ref(self))
                self._handles.append(p.register_hook(self._before_accumulation(p)))
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        self.zero()

    def detach(self) -> None:
        """Remove the hooks and drop the sums; `.grad` accumulates natively again."""
        self.zero()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p in self.params:
            entry = _ATTACHED.get(id(p))
            if entry is not None and entry[1]() is self:
                del _ATTACHED[id(p)]

    def __enter__(self) -> "FP32GradAccumulation":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- the hooks -------------------------------------------------------------------
    def _before_accumulation(self, p: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            # Whatever `.grad` holds next to a float32 sum is ours (a placeholder, the sum cast for the
            # reduction, or a DDP bucket view of either): the incoming gradient must not be added to it.
            if id(p) in self._buffers:
                p.grad = None
        return hook

    def _hook(self, p: torch.Tensor) -> None:
        grad = p.grad  # this backward's gradient alone: `_before_accumulation` emptied `.grad`
        if grad is None:  # pragma: no cover - autograd calls the hook only after accumulating a grad
            return
        key = id(p)
        buffer = self._buffers.get(key)
        if self.write_through:
            if buffer is not None:  # else the window's only gradient is already in .grad, exactly
                p.grad = buffer.add_(grad).to(p.dtype)
                del self._buffers[key]
            return
        if buffer is None:
            self._buffers[key] = grad.to(self.accumulate_dtype, copy=True)  # bf16 -> fp32 is exact
        else:
            buffer.add_(grad)  # the addition rounds in fp32
        p.grad = self._placeholder(p) if self.find_unused_parameters else None

    def _placeholder(self, p: torch.Tensor) -> torch.Tensor:
        """A `.grad` that is defined but holds nothing: one zero, broadcast to the parameter's shape."""
        key = (p.dtype, p.device)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros((), dtype=p.dtype, device=p.device)
        return self._zeros[key].expand_as(p)

    # -- the window's last backward ----------------------------------------------------
    def prepare_reduction(self) -> None:
        """The next backward is the one a data-parallel wrapper reduces: leave every sum in `.grad`.

        Parameters that backward reaches get `sum + gradient`, added in float32 and cast once, just
        before the wrapper's hook reads `.grad`. With `find_unused_parameters`, the parameters it does not
        reach (a branch only earlier micro-batches took) are reduced too, from `.grad`: their sums are
        cast into `.grad` now, and the float32 sums kept until the backward shows who needs them.
        """
        self.write_through = True
        if self.find_unused_parameters:
            for p in self.params:
                buffer = self._buffers.get(id(p))
                if buffer is not None:
                    p.grad = buffer.to(p.dtype)

    # -- reading and writing back ----------------------------------------------------
    def grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """The float32 sums by parameter (parameters with no gradient yet are absent)."""
        return {p: self._buffers[id(p)] for p in self.params if id(p) in self._buffers}

    def flush(self, max_norm: float | None = None, all_params: Iterable[torch.Tensor] = ()) -> float:
        """Write the sums into `.grad` (cast once to each parameter's dtype) and free the buffers.

        Returns the total L2 norm before clipping, computed from the float32 sums (float64 across
        tensors) -- over this helper's parameters, plus the `.grad` of any other `all_params` (e.g. the
        optimizer's float32 parameters), so it can stand in for `clip_grad_norm_(all_params, max_norm)`.
        With `max_norm`, every one of those gradients is scaled by max_norm / (norm + 1e-6) when the
        norm exceeds it, the float32 sums before their cast. After a reducing backward (`write_through`)
        `.grad` holds every sum, reduced over ranks, and the norm is taken from it; otherwise a `.grad`
        set from outside the hooks is added to the float32 sum first.
        """
        mine = {id(p) for p in self.params}
        for p in self.params:
            buffer = self._buffers.get(id(p))
            if buffer is None or p.grad is None:
                continue
            if self.write_through:  # cast into .grad by prepare_reduction(), and reduced since
                del self._buffers[id(p)]
            else:
                buffer.add_(p.grad)
                p.grad = None
        self.write_through = False
        outside = [p.grad for p in self.params if id(p) not in self._buffers and p.grad is not None]
        outside += [p.grad for p in all_params if id(p) not in mine and p.grad is not None]
        norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in [*self._buffers.values(), *outside]]
        norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        scale = None
        if max_norm is not None and math.isfinite(norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)  # the same epsilon as torch.nn.utils.clip_grad_norm_
            for grad in outside:
                grad.mul_(scale)
        for p in self.params:
            buffer = self._buffers.pop(id(p), None)
            if buffer is None:
                continue
            if scale is not None:
                buffer.mul_(scale)
            p.grad = buffer.to(p.dtype) if buffer.dtype != p.dtype else buffer
            del buffer
        return norm

    def zero(self) -> None:
        """Drop the accumulated sums (a skipped step, an abandoned window) and what `.grad` shows of them."""
        for p in self.params:
            if id(p) in self._buffers:
                p.grad = None
        self._buffers.clear()
        self.write_through = False
