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
accumulation until the hook, one parameter at a time. Before the optimizer step, `flush()` writes
the float32 sums back into `.grad`. PyTorch forbids a `.grad` of another dtype than its parameter,
so for a bf16 parameter the sum is cast to bf16 *once* -- one rounding instead of K.
`flush(max_norm, all_params)` stands in for `clip_grad_norm_(all_params, max_norm)`: it computes the
total norm from the float32 sums and clips them *before* that cast (the norm of bf16 gradients is
itself a bf16 number, 3 significant digits, and clipping bf16 gradients rounds them once more).
Optimizers that can use float32 gradients directly (e.g. one keeping float32 master weights) read
`grads()` instead of `.grad`.

Measured (tests/test_precision.py: a bf16 tiny Llama, K=16 micro-batches of different sizes),
relative L2 error of the window's gradient against the exact float64 sum of the same bf16
micro-batch gradients: bf16 `.grad` accumulation 4.5e-3; float32 accumulation cast once 1.7e-3 (the
rounding of one cast to bf16); the float32 sums themselves 7e-10. Against the float32 model's
gradient (bf16 forward/backward error included): 6.4e-3, 4.9e-3 and 4.6e-3.

Memory: 4 bytes per trainable parameter for the float32 buffers (bf16 `.grad` would take 2), held from
the first backward of a window until `flush()`, which frees them. Parameters already in float32 (or
float64) are left alone: their `.grad` accumulates at full precision anyway.

Data parallel: under DDP the gradient reduction happens inside the last backward of a window, so
that backward must find the whole sum in `.grad`. `write_through = True` before the last micro-batch
makes the hook do exactly that (the post-accumulate-grad hook runs before DDP's reducer hook): it adds
the micro-batch to the float32 sum, writes the sum, cast once, into `.grad` and empties the buffer, so
DDP reduces the accumulated gradient (in the parameter dtype, as DDP's buckets are). Checked with 2
gloo ranks x 4 micro-batches: 2.5e-3 from the exact mean, against 0.85 if only the last micro-batch
were reduced. FSDP2 is not supported (it reduce-scatters and accumulates sharded gradients itself;
untested here): there, keep float32 sharded parameters with MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=torch.float32).

    fp32 = FP32GradAccumulation(model.parameters())
    for k, batch in enumerate(micro_batches):
        loss(batch).backward()          # .grad stays None: the sum lives in fp32 buffers
    norm = fp32.flush(max_norm=1.0, all_params=model.parameters())  # clip in fp32, cast once
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    fp32.detach()                       # when done: removes the hooks
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["FP32GradAccumulation"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


class FP32GradAccumulation:
    """Accumulate the gradients of low-precision parameters in float32 buffers across backwards."""

    def __init__(self, params: Iterable[torch.Tensor], accumulate_dtype: torch.dtype = torch.float32):
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
        self.write_through = False  # set for the last backward of a window under DDP/FSDP
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    # -- the hook ------------------------------------------------------------------
    def _hook(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:  # pragma: no cover - autograd calls the hook only after accumulating a grad
            return
        key = id(p)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = grad.to(self.accumulate_dtype, copy=True)
        else:
            buffer.add_(grad)  # bf16 -> fp32 is exact; the addition rounds in fp32
        if self.write_through:
            p.grad = buffer.to(p.dtype)
            self._buffers.pop(key, None)
        else:
            self._buffers[key] = buffer
            p.grad = None

    # -- reading and writing back ----------------------------------------------------
    @property
    def active(self) -> bool:
        """True while float32 sums are held that `.grad` does not show yet."""
        return bool(self._buffers)

    def grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """The float32 sums by parameter (parameters with no gradient yet are absent)."""
        return {p: self._buffers[id(p)] for p in self.params if id(p) in self._buffers}

    def flush(self, max_norm: float | None = None, all_params: Iterable[torch.Tensor] = ()) -> float:
        """Write the sums into `.grad` (cast once to each parameter's dtype) and free the buffers.

        Returns the total L2 norm before clipping, computed from the float32 sums (float64 across
        tensors) -- over this helper's parameters, plus the `.grad` of any other `all_params` (e.g. the
        optimizer's float32 parameters), so it can stand in for `clip_grad_norm_(all_params, max_norm)`.
        With `max_norm`, every one of those gradients is scaled by max_norm / (norm + 1e-6) when the
        norm exceeds it, the float32 sums before their cast. A `.grad` already set (a write-through
        backward, or one from outside the hook) is added to the float32 sum first.
        """
        mine = {id(p) for p in self.params}
        for p in self.params:
            if p.grad is not None and id(p) in self._buffers:
                self._buffers[id(p)].add_(p.grad)
                p.grad = None
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
        """Drop the accumulated sums (a skipped step)."""
        self._buffers.clear()

    def detach(self) -> None:
        """Remove the hooks and drop the buffers; `.grad` accumulates natively again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._buffers.clear()

    def __enter__(self) -> "FP32GradAccumulation":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
