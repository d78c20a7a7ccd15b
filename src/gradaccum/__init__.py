"""gradaccum: gradient accumulation that is exactly a big batch.

    acc = gradaccum.Accumulator(model, optimizer, accumulation_steps=8)
    for window in acc.windows(dataloader):
        for batch in window:
            loss = window.loss(model(**inputs).logits, batch["labels"])
            loss.backward()
        stats = window.step()
"""

from .accumulate import Accumulator, StepStats, Window

__version__ = "0.1.0"
__all__ = ["Accumulator", "StepStats", "Window", "__version__"]
