"""`gradaccum check`: does gradient accumulation with this model equal the big batch? Seconds, no training.

    gradaccum check --model DIR|HUB_ID|FILE.gguf [--json]      # exit 0: exact under HF Trainer as-is

    result = check_model(model)          # any transformers model: causal LM, seq2seq LM, sequence classifier
    print(format_report(result)); result.exact_under_trainer

The answer is measured on two crafted micro-batches of unequal size, never read from a list of known
models:

- the model's own loss is compared with the sum of its token losses, computed here from its logits,
  divided by each candidate count (next-token shifted labels, unshifted labels, sequences): that says
  what one target is for this model;
- the forward is called with `num_items_in_batch` = n and 2n: a loss that honours the count halves;
- a real `transformers.Trainer` is built around the model, and its own `compute_loss` and target count
  give each micro-batch's share of the step; its weight relative to the big batch (sum of all
  summed losses / total count) is 1 exactly when Trainer accumulates exactly;
- the rows of the two micro-batches are run as one batch: a row whose output changes with its
  neighbours (BatchNorm, capacity-limited expert routing) makes every micro-batch a different model;
- causal LMs: two documents packed in one row (position_ids restarting, no attention_mask, as Trainer's
  padding-free collators and `gradaccum train --packing` send them) are compared with each run alone.

Dropout is switched off for the probe (it is random per micro-batch, but the same in expectation as in
the big batch, so it is no departure); everything else runs in training mode.

The package: `probes` (inputs, the loss, the count, Trainer), `structure` (BatchNorm, experts, rows that
depend on each other, packing), `report` (the result, the fix, the text), `run` (`check_model`: all of
them on one model). This file holds the command; it imports no torch until the command runs, so
`gradaccum check --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import CheckResult, TrainerFacts, format_report
    from .run import check_model

__all__ = ["CheckResult", "TrainerFacts", "check_model", "format_report", "add_arguments", "main"]


def __getattr__(name: str) -> Any:
    """The probe's names, imported (with torch and transformers) on first use."""
    if name == "check_model":
        from .run import check_model

        return check_model
    if name in ("CheckResult", "TrainerFacts", "format_report"):
        from .report import CheckResult, TrainerFacts, format_report

        return {"CheckResult": CheckResult, "TrainerFacts": TrainerFacts, "format_report": format_report}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", metavar="MODEL",
                        help="tiny | a local HF model directory | a hub id | a .gguf file (default: tiny)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own code from its repository (off by default)")


def main(args: argparse.Namespace) -> int:
    """Load, probe, print. Exit 0 when accumulation under HF Trainer as-is is exact, 1 otherwise; a
    model that cannot be loaded raises ModelError (the CLI prints it as one line, exit 2)."""
    import torch

    from ..models import load_model
    from .report import format_report
    from .run import check_model

    model, _ = load_model(args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    result = check_model(model)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_report(result))
    sys.stdout.flush()
    return 0 if result.exact_under_trainer else 1
