"""gradaccum: gradient accumulation that is exactly a big batch.

    acc = gradaccum.Accumulator(model, optimizer, accumulation_steps=8)
    for window in acc.windows(dataloader):
        for batch in window:
            loss = window.loss(model(**inputs).logits, batch["labels"])
            loss.backward()
        stats = window.step()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Accumulator", "StepStats", "Window", "__version__"]

if TYPE_CHECKING:
    from .accumulate import Accumulator, StepStats, Window


def __getattr__(name: str) -> Any:
    # Loaded on first use, so that `gradaccum.cli` can set torch's allocator options before torch loads.
    if name in ("Accumulator", "StepStats", "Window"):
        from . import accumulate

        return getattr(accumulate, name)
    raise AttributeError(f"module 'gradaccum' has no attribute {name!r}")
