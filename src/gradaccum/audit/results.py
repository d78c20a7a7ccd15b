"""What an audit measures and finds: the result dataclasses, and the gate on exact accumulation.

The gate is a bound on exact accumulation's first-step gradient error against the full batch,
derived from the run's own rounding (`gradient_bound`), never a constant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

# The gate: exact's first-step gradient error against the full batch may be ROUNDING_FACTOR times
# the full batch's own rounding in the audit's dtype, plus FLOOR_EPS x eps(dtype). Why these, in
# `gradient_bound`.
ROUNDING_FACTOR = 10.0
FLOOR_EPS = 10.0


@dataclass
class TargetSpread:
    """Target tokens per micro-batch: the n_k that naive accumulation divides by, one at a time."""

    min: int
    max: int
    mean: float
    cv: float  # coefficient of variation: std / mean (0 when all micro-batches hold the same count)
    # A target token's weight under naive accumulation relative to the full batch, N / (K n_k),
    # over the micro-batches that have targets: 1.0 everywhere would mean naive == exact.
    naive_weight_min: float | None
    naive_weight_max: float | None


@dataclass
class GradientBound:
    """The gate on the first-step gradient error, derived from this run's own rounding."""

    dtype: str
    float32_error: float  # ||g_full(float32) - g_full(float64)|| / ||g_full(float64)||, window 0
    rounding: float  # the full batch's own rounding in `dtype`: float32_error x eps(dtype) / eps(float32)
    factor: float  # how many times that rounding exact accumulation may show
    floor: float  # FLOOR_EPS x eps(dtype): for a run whose measured rounding is zero by chance
    tolerance: float  # factor x rounding + floor
    how: str  # where the bound comes from, in words


def gradient_bound(dtype: str, float32_error: float) -> GradientBound:
    """The largest first-step gradient error (relative L2, against the full batch) that is rounding.

    `float32_error` is this run's float32 full-batch gradient against the float64 one (same weights,
    same window). Why a bound from the run and why this one:

    - Rounding in a gradient is relative to its norm, and a gradient that is small against the
      per-token terms it sums (tokens that disagree, a model near a minimum of the window's loss)
      carries a large relative error. No constant fits every run: 1e-5 in float32 failed a correct
      SmolLM2 LoRA audit at 9.1e-5, cosine 0.999999996, which passed at 6.4e-16 in float64.
    - The full batch in float32 is itself `float32_error` from the exact (float64) gradient. Exact
      accumulation is the same arithmetic summed in another order, so rounding keeps it within a
      small multiple of that from the full batch: measured 0.05x to 1.1x on tiny Llamas (random or
      trained near a minimum, LoRA or not, micro-batches 1 to 8). A bug moves the gradient by a
      fraction of the gradient itself, whatever the precision (one micro-batch of 8 weighted 2%
      off: 2.8e-3; one lost: 14%; naive accumulation: 10% to 100s of %), far above 10x rounding,
      and both grow together when the gradient is small against its parts.
    - float64 has no wider type to measure against. Rounding error scales with the unit roundoff
      (error ~ conditioning x eps), so its scale is the float32 measurement x eps64 / eps32 = 2^-29;
      measured exact errors sat at 0.04x to 2.2x of that scale.
    - The floor, 10 eps of the dtype, only matters where the measured rounding is ~0 by chance.
    """
    eps, eps32 = torch.finfo(getattr(torch, dtype)).eps, torch.finfo(torch.float32).eps
    finite = math.isfinite(float32_error)
    rounding = float32_error * eps / eps32 if finite else 0.0
    floor = FLOOR_EPS * eps
    tolerance = ROUNDING_FACTOR * rounding + floor
    allowed = (f"Exact accumulation may show {ROUNDING_FACTOR:g}x that plus {FLOOR_EPS:g} eps ({floor:.1e}): "
               f"{tolerance:.1e}.")
    if not finite:
        how = (f"The float32 full batch's gradient was not finite, so no rounding was measured. Only the floor "
               f"of {FLOOR_EPS:g} eps applies: {floor:.1e}.")
    elif dtype == "float32":
        how = (f"The float32 full batch's first-step gradient is {float32_error:.1e} (relative L2) from the same "
               f"gradient computed in float64. That is float32 rounding on this model and data. {allowed}")
    else:
        how = (f"A float32 copy's full-batch gradient is {float32_error:.1e} (relative L2) from the float64 one. "
               f"Rounding scales with eps, so float64 rounding here is about {float32_error:.1e} x 2^-29 = "
               f"{rounding:.1e}. {allowed}")
    return GradientBound(dtype=dtype, float32_error=float32_error, rounding=rounding, factor=ROUNDING_FACTOR,
                         floor=floor, tolerance=tolerance, how=how)


def compare_gradients(gradient: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(relative L2 error, cosine similarity) of two gradients over all trainable parameters."""
    diff = dot = norm = norm_ref = 0.0
    for g, r in zip(gradient, reference):
        g, r = g.double(), r.double()
        diff += float((g - r).pow(2).sum())
        dot += float((g * r).sum())
        norm += float(g.pow(2).sum())
        norm_ref += float(r.pow(2).sum())
    error = math.sqrt(diff / norm_ref) if norm_ref else math.nan
    cosine = dot / math.sqrt(norm * norm_ref) if norm and norm_ref else math.nan
    return error, cosine


@dataclass
class RunAudit:
    """One accumulated run (exact or naive) against the full batch."""

    accumulation: str
    gradient_error: float  # ||g - g_full|| / ||g_full||, first window, all trainable parameters
    gradient_cosine: float
    gradient_error_vs_float64: float  # ||g - g_64|| / ||g_64||: against the full batch computed in float64
    weight_distance: float  # ||w - w_full|| / ||w_full|| after the last step (all saved weights)
    weight_distance_vs_update: float | None  # ||w - w_full|| / ||w_full - w_0||: error per unit of training
    losses: list[float | None]  # exact window loss of every step (nats per target token)
    max_loss_difference: float  # max over steps of |loss - loss_full|
    final_loss_difference: float  # loss - loss_full at the last step (its sign is data-dependent)
    departs: bool  # gradient error above the tolerance
    output: str  # the run's folder: metrics.jsonl, loss.png (and final/ with --save-models)


@dataclass
class MicroBatchAudit:
    micro_batch_size: int
    accumulation_steps: int
    exact: RunAudit
    naive: RunAudit
    targets_first_window: TargetSpread
    targets_all_windows: TargetSpread
    targets_per_micro_batch_first_window: list[int]


@dataclass
class HFCase:
    name: str
    description: str
    model_accepts_loss_kwargs: bool  # as the Trainer decided it (what it passes num_items_in_batch on)
    gradient_error: float  # first-step gradient, GA=k against GA=1
    gradient_cosine: float
    weight_distance: float  # trainable weights, relative to the GA=1 run's
    weight_distance_vs_update: float | None
    logged_losses: list[float | None]  # what Trainer logged per step
    departs: bool


@dataclass
class HFComparison:
    transformers_version: str
    micro_batch_size: int
    accumulation_steps: int  # k
    steps: int
    tolerance: float  # this run's float32 bound: HF's causal-LM loss upcasts logits to float32
    aligned: bool  # the model as is: GA=k within tolerance of GA=1
    reference_logged_losses: list[float | None]
    cases: list[HFCase]
    note: str


@dataclass
class AuditResult:
    passed: bool  # exact within tolerance (and, with --against hf-trainer, HF's own GA aligned)
    exit_code: int  # 0 passed, 1 departs
    verdict: str  # one sentence
    tolerance: float  # gate.tolerance: the bound on exact's gradient error
    gate: GradientBound
    max_exact_gradient_error: float
    max_naive_gradient_error: float
    naive_departs: bool
    setup: dict[str, Any]
    full_losses: list[float | None]
    first_window_consistency: float  # |first-step loss of the gradient check - of the full run|
    micro_batches: list[MicroBatchAudit]
    hf_trainer: HFComparison | None
    output: str
    files: dict[str, str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value
