"""`gradaccum audit`: full batch vs exact vs naive accumulation, on your own model and data.

Every run starts from the same initial weights and trains on the same windows (the data order
depends only on the seed and the effective batch B, see `gradaccum.train`):

    full batch       micro-batch B, accumulation 1       the reference
    exact, m         micro-batch m, accumulation B/m     must equal the reference up to rounding
    naive, m         the same split, each micro-batch's own mean averaged (the 2024 bug)

The runs are `gradaccum.train.train` itself, one per folder under `DIR/runs/`: there is no second
training loop here. Next to them the audit takes the first window and computes its gradient for
every split with the same `Accumulator` and `CausalLMLoss` the loop uses (no optimizer step), and
counts the target tokens of every micro-batch, which is where the two equations part:

    naive:  (1/K) * sum_k S_k / n_k        exact:  sum_k S_k / sum_k n_k

A token in micro-batch k gets weight 1/(K n_k) under naive accumulation instead of 1/N, so the
gradient is off whenever the n_k differ, in a direction set by what the short micro-batches hold.

Exit status 1 when exact accumulation departs from the full batch beyond float rounding: a CI
gate. The bound is derived from the run (see `gradient_bound`): the full batch's first-step
gradient is also computed in the other precision (a float64 copy of a float32 model, a float32
copy of a float64 one), and their distance is this model's and data's float32 rounding.

Each run keeps its final weights in memory for the report; `--save-models` also writes them.

    result = gradaccum.audit.run(batch_size=16, micro_batch_sizes=[1, 4], steps=5)
    result.passed, result.verdict, result.micro_batches[0].naive.gradient_error

The package: `experiment.py` runs it, `hf_trainer.py` is `--against hf-trainer`, `results.py` holds
what it finds and the gate, `report.py` writes report.md / report.json (plots.py draws audit.png).
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..config import AuditConfig
from ..errors import ConfigError
from .results import (AuditResult, GradientBound, HFCase, HFComparison, MicroBatchAudit, RunAudit, TargetSpread,
                      gradient_bound)

__all__ = [
    "AuditConfig",
    "AuditResult",
    "RunAudit",
    "MicroBatchAudit",
    "TargetSpread",
    "HFCase",
    "HFComparison",
    "GradientBound",
    "gradient_bound",
    "run",
    "main",
]


def run(config: AuditConfig | None = None, **kwargs: Any) -> AuditResult:
    """Run the audit and write `report.md`, `report.json` and `audit.png` into the output folder.

    `run(batch_size=16, micro_batch_sizes=[1, 4], steps=5)` or `run(AuditConfig(...))`. Returns the
    figures; `result.passed` is False (and `result.exit_code` 1) when exact accumulation departs
    from the full batch beyond float tolerance.
    """
    from .experiment import run_audit

    if config is None:
        config = AuditConfig(**kwargs)
    elif kwargs:
        raise ConfigError("pass an AuditConfig or keyword arguments, not both")
    # The audit prints one line per run; transformers' own load/save bars would bury them.
    with _no_progress_bars():
        return run_audit(config)


def main(args: Any) -> int:
    """`gradaccum audit` from parsed arguments; the exit status: 0 passed, 1 exact departs."""
    return run(AuditConfig.from_args(args)).exit_code


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
