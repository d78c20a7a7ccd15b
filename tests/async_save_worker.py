"""A small training loop that checkpoints every step through async_save.AsyncSaver (test_checkpoint.py).

    python async_save_worker.py OUT STEPS [--resume]

float64 BlockLM with dropout (so the RNG state matters), AdamW, the Accumulator; step t trains on
batches drawn from a generator seeded with t. Appends "t" to OUT/steps.log after each step and
writes OUT/final.safetensors at the end. With --resume it continues from the newest checkpoint
that loads, as `gradaccum train --resume` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from gradaccum import Accumulator, async_save, checkpoint
from gradaccum.losses import token_loss_sum
from test_gradient_checkpointing import block_lm


def batches(step: int):
    g = torch.Generator().manual_seed(step)
    for _ in range(2):
        ids = torch.randint(0, 48, (2, 12), generator=g)
        yield {"input_ids": ids, "labels": ids}


def main() -> None:
    out, steps, resume = Path(sys.argv[1]), int(sys.argv[2]), "--resume" in sys.argv
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = block_lm(dropout=0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = Accumulator(model, optimizer, accumulation_steps=2)
    start = 0
    if resume:
        checkpoint.remove_partial(out)

        def restore(path):
            training_state, state = checkpoint.load(path, model)
            optimizer.load_state_dict(training_state["optimizer"])
            acc.load_state_dict(training_state["accumulator"])
            return state["step"]

        start = checkpoint.load_latest(out, restore)[1]
    out.mkdir(parents=True, exist_ok=True)
    with async_save.AsyncSaver(out, keep=2) as saver:
        for step in range(start, steps):
            for window in acc.grouped_windows([list(batches(step))]):
                for batch in window:
                    window.scale(token_loss_sum(model(batch["input_ids"]), batch["labels"])).backward()
                window.step()
            with open(out / "steps.log", "a") as log:
                log.write(f"{step + 1}\n")
            if step + 1 < steps:
                training_state = {"optimizer": optimizer.state_dict(), "accumulator": acc.state_dict()}
                saver.save(step + 1, model, training_state, {"step": step + 1})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))


if __name__ == "__main__":
    main()
