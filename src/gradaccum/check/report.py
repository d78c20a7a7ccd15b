"""The check's answer: its result as data (`CheckResult`, `to_json`), the fix, and the report text."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FIX_TRAINER = "trainer = gradaccum.hf.make_exact(trainer)  (or train with `gradaccum train`)"


@dataclass
class TrainerFacts:
    """What transformers.Trainer does with this model, as its own code decides it."""

    verdict: str  # exact | count-dropped | count-mismatch | mean-of-means | count-rejected | no-loss | ...
    passes_count: bool | None = None  # Trainer.model_accepts_loss_kwargs
    divides_by_accumulation_steps: bool | None = None
    counts: str | None = None  # what Trainer counts: "shifted" | "unshifted" labels, or a number we cannot place
    count_ratio: float | None = None  # model's own window count / Trainer's count (1 = same targets)
    weights: list[float] = field(default_factory=list)  # each micro-batch's share / the big batch's (1 = exact)
    why: str = ""


@dataclass
class CheckResult:
    model_class: str
    task: str
    transformers_version: str
    attention: str | None
    loss_targets: str  # "shifted" | "unshifted" | "sequences" | "none" (no loss from labels) | "other"
    forward_takes_kwargs: bool
    forward_names_num_items: bool
    count_honoured: str  # "yes" | "no" | "partly" | "rejected" (forward raises) | "untested"
    trainer: TrainerFacts
    ours: str  # gradaccum train / Accumulator: exact | not exact
    ours_why: str
    departures: list[str] = field(default_factory=list)  # beyond the count: they hold under any loop
    notes: list[str] = field(default_factory=list)
    packing: str = "n/a"
    exact_under_trainer: bool = False
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fix_for(result: CheckResult) -> str:
    """What to do, from the verdict and the departures ('' when nothing needs doing)."""
    fixes = []
    if result.trainer.verdict in ("count-dropped", "count-mismatch", "mean-of-means", "inexact"):
        fixes.append(FIX_TRAINER)
    if any(d.startswith("BatchNorm") for d in result.departures):
        fixes.append("freeze BatchNorm statistics (eval-mode BatchNorm) or replace it with GroupNorm/LayerNorm")
    if any(d.startswith("router aux loss") for d in result.departures):
        fixes.append("set output_router_logits=False, or accept a balancing loss taken per micro-batch")
    if any(d.startswith("a row's") for d in result.departures):
        fixes.append("do not accumulate with this model: one micro-batch per optimizer step")
    if result.trainer.verdict == "unknown-loss" and not fixes:
        fixes.append("compute the loss from the logits as a sum over targets and divide it by the window's "
                     "count (gradaccum.Accumulator: window.scale)")
    return "; ".join(fixes)


LOSS_WORDS = {
    "shifted": "mean over next-token targets (labels shifted by one)",
    "unshifted": "mean over unshifted labels (logit t scores label t)",
    "sequences": "mean over sequences",
    "none": "none returned from labels",
    "other": "not a mean over targets of the logits (an extra term?)",
}
TRAINER_HEADLINES = {
    "exact": "EXACT",
    "count-dropped": "NOT EXACT: count passed, model drops it (~K x gradient)",
    "count-mismatch": "NOT EXACT: Trainer counts other targets than the loss",
    "mean-of-means": "NOT EXACT: mean of micro-batch means",
    "count-rejected": "FAILS: forward rejects num_items_in_batch",
    "no-loss": "no loss from labels",
    "unknown-loss": "CANNOT TELL: loss is not a mean over targets of the logits",
    "inexact": "NOT EXACT",
    "fails": "FAILS",
    "unavailable": "not checked",
}


def format_report(result: CheckResult) -> str:
    """The human-readable answer: facts, the two verdicts with reasons, departures, packing, fix."""
    t = result.trainer
    yes = {True: "yes", False: "no", None: "?"}
    lines = [
        f"gradaccum check: {result.model_class} ({result.task}; transformers {result.transformers_version}; "
        f"attention {result.attention})",
        f"  loss: {LOSS_WORDS[result.loss_targets]}",
        f"  num_items_in_batch: forward takes **kwargs: {yes[result.forward_takes_kwargs]}; "
        f"loss honours it (n -> 2n halves): {result.count_honoured}",
        f"  Trainer: passes the count: {yes[t.passes_count]}; counts: {t.counts or '-'}; "
        f"divides by accumulation steps: {yes[t.divides_by_accumulation_steps]}"
        + (f"; micro-batch weights vs big batch: {', '.join(f'{w:.3f}' for w in t.weights)}" if t.weights else ""),
        f"HF Trainer as-is, loss scaling: {TRAINER_HEADLINES.get(t.verdict, t.verdict)}",
        f"  why: {t.why}",
        f"gradaccum (train / Accumulator): {result.ours.upper()}: {result.ours_why}",
        "other departures: " + ("none (no BatchNorm, no router aux loss, rows independent)"
                                if not result.departures else ""),
        *[f"  - {departure}" for departure in result.departures],
        *([f"packing: {result.packing}"] if result.task == "causal-lm" else []),
        *[f"note: {note}" for note in result.notes],
        "verdict: " + ("exact under HF Trainer as-is" if result.exact_under_trainer else
                       "NOT exact under HF Trainer as-is") + f"; {result.ours} under gradaccum",
    ]
    if result.fix:
        lines.append(f"fix: {result.fix}")
    return "\n".join(lines)
