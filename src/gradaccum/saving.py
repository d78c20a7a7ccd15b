"""How `gradaccum train` saves checkpoints: in the background, on a cadence, and when stopped.

A save takes an in-memory snapshot between steps and writes it in a background thread
(async_save.AsyncSaver), one write in flight; training waits only for the copies. When: every
--save-every N steps, or by default every DEFAULT_SAVE_SECONDS of wall time while the time training
waits for saves stays under MAX_SAVE_OVERHEAD of the run (so a short run, e.g. `make demo`, writes
no intermediate checkpoint), and always at SIGINT/SIGTERM (waited for: the checkpoint is complete
when the run says so). A failed background write surfaces at the next save or at the end as one
line naming the checkpoint that is intact (CheckpointWriteError, a TrainingError: exit 2).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import distributed
from .async_save import AsyncSaver, SaveCadence
from .checkpoint import CheckpointWriteError

DEFAULT_SAVE_SECONDS = 1800.0  # --save-every's default: every 30 minutes of wall time
MAX_SAVE_OVERHEAD = 0.05  # ... skipped while waiting for saves would exceed 5% of the run


def snapshot_bytes(model: torch.nn.Module) -> int:
    """CPU memory a save's snapshot holds beside the run: the weights and AdamW's two moments, once more
    (for memory.find_micro_batch_size's reserved_bytes)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(storages.values()) + 2 * trainable


class Checkpointing:
    """The run's saves: `due(step)` says when (every rank agrees), `save(step)` snapshots and hands
    the write to the background; use as a context manager, which waits for the last write."""

    def __init__(self, run: Any):
        self.run = run
        every_steps = run.config.save_every
        self.cadence = SaveCadence(every_steps=every_steps or None,
                                   every_seconds=DEFAULT_SAVE_SECONDS if every_steps is None else None,
                                   max_overhead=MAX_SAVE_OVERHEAD)
        self.saver = AsyncSaver(run.output, keep=run.config.keep_checkpoints) if run.is_main else None

    def due(self, step: int) -> bool:
        due = self.cadence.due(step, self.run.total_steps)
        if self.cadence.every_seconds and self.run.world_size > 1:
            # Wall clocks differ between ranks, and FSDP2's gather is collective: all save, or none.
            due = distributed.any_rank(1 if due else None) is not None
        return due

    def save(self, step: int, *, wait: bool = False) -> None:
        """Snapshot `checkpoint-<step>/` now and write it in the background (`wait`: until written)."""
        run, start = self.run, time.perf_counter()
        # FSDP2: gather full tensors (a collective on every rank), then snapshot them; otherwise rank 0
        # holds them all and the snapshot copies them from the live model and optimizer.
        model_state, optimizer_state = distributed.full_state_dicts(run.model, run.optimizer) if run.fsdp \
            else (None, run.optimizer.state_dict())
        training_state = {"optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(),
                          "accumulator": run.acc.state_dict()}
        state = {"step": step, "epoch": step // run.windows_per_epoch,
                 "window_in_epoch": step % run.windows_per_epoch, "batch_size": run.batch_size,
                 "seed": run.config.seed, "fsdp": run.fsdp, "world_size": run.world_size,
                 "config": run.config.to_dict()}
        if self.saver is not None:
            self.saver.save(step, run.model, training_state, state, model_state)
            if wait:
                self.saver.wait()
        distributed.barrier()
        self.cadence.saved(time.perf_counter() - start)

    def close(self) -> None:
        """Wait for the write in flight; CheckpointWriteError if it failed."""
        if self.saver is not None:
            self.saver.close()

    def __enter__(self) -> "Checkpointing":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: let the write in flight land, without hiding the original error
            self.close()
        except CheckpointWriteError:
            pass
