"""Checkpoints saved without stalling training, and when to save them.

A save first takes a *snapshot* (checkpoint.snapshot) -- private CPU copies of the weights, the
optimizer/scheduler/accumulator state and the RNG states, taken on the training thread between steps --
and hands it to a background thread that does the slow part: serialising, hashing, fsync and the atomic
rename (checkpoint.write). Training waits only for the copies. One save is in flight at a time (the next
save waits for the previous one), and an error of the background writer is raised on the training
thread at the next save, `wait()` or `close()`, never lost. `SaveCadence` decides when a save is due:
every N steps, or by wall time with the time training waits for saves held under a fraction of the run.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import CheckpointWriteError, FrozenBase, Snapshot, _Copier, find_latest, snapshot, write

__all__ = ["AsyncSaver", "SaveCadence", "CheckpointWriteError"]


class AsyncSaver:
    """Checkpoints written in the background, so that training waits only for an in-memory copy.

        saver = AsyncSaver(output_dir, keep=2)
        for step ...:
            if due: saver.save(step, model, training_state, state)   # returns once the copies are taken
        saver.close()   # waits for the last write; raises its error if it failed

    `save` first waits for the previous save (one in flight at a time) and raises its error if it
    failed, then snapshots (see `snapshot`) and starts the writer thread. The written folder is the
    same as `save()` writes, atomically: a kill during a background write leaves a temporary folder
    (deleted by `remove_partial`) and the previous checkpoints intact. An error of the writer is
    raised as CheckpointWriteError by the next `save`, `wait` or `close`, on the calling thread.

    Memory: while a save is in flight its snapshot holds the weights and optimizer state once more in
    CPU memory (`last_snapshot_bytes`; with `frozen`, only the trainable weights and buffers); a run's peak includes it (memory.find_micro_batch_size's
    `reserved_bytes`). `reuse_buffers` (default) keeps those buffers for the next save, which then
    copies into memory it already owns instead of page-faulting fresh memory (SmolLM2-135M's 1.6 GB
    on a loaded 2-core CPU: ~1.1 s instead of 2-10 s; for accelerator state they are pinned host
    memory, costly to allocate). The peak is the same either way; between saves the process keeps the
    copy resident. `reuse_buffers=False` frees it after each write.

    The writer thread runs at the lowest CPU priority (Linux): on a machine whose cores the training
    keeps busy it takes idle cycles, so the steps it overlaps are not slowed (it may take longer).
    """

    def __init__(self, output_dir: str | Path, keep: int | None = None, *, reuse_buffers: bool = True):
        self.output_dir = Path(output_dir)
        self.keep = keep
        self._reuse_buffers = reuse_buffers
        self._copier: _Copier | None = None
        self._thread: threading.Thread | None = None
        self._failure: tuple[int, BaseException] | None = None
        self.last_stall_seconds = 0.0  # the training thread's wait in the last save: previous write + copies
        self.last_copy_seconds = 0.0  # the snapshot alone
        self.last_write_seconds = 0.0  # the background write of the last finished save
        self.total_stall_seconds = 0.0
        self.last_snapshot_bytes = 0
        self.num_saves = 0

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(self, step: int, model: torch.nn.Module | None, training_state: dict[str, Any], state: dict[str, Any],
             model_state: dict[str, torch.Tensor] | None = None, *, fresh: bool = False,
             frozen: FrozenBase | None = None) -> float:
        """Snapshot now, write `checkpoint-<step>/` in the background; returns the seconds training waited.
        `frozen` (checkpoint.frozen_base): the frozen base is neither copied nor written."""
        start = time.perf_counter()
        self.wait()
        copied = time.perf_counter()
        if self._copier is None:
            self._copier = _Copier(self._reuse_buffers)
        snap = snapshot(step, model, training_state, state, model_state, fresh=fresh, copier=self._copier,
                        frozen=frozen)
        self.last_snapshot_bytes = snap.num_bytes
        # Not a daemon: an interpreter that exits (an exception on the training thread) finishes the
        # write first, so a save that was started still lands as a complete checkpoint.
        self._thread = threading.Thread(target=self._write, args=(snap,), name=f"gradaccum-save-{step}")
        self._thread.start()
        end = time.perf_counter()
        self.last_copy_seconds, self.last_stall_seconds = end - copied, end - start
        self.total_stall_seconds += self.last_stall_seconds
        self.num_saves += 1
        return self.last_stall_seconds

    def _write(self, snap: Snapshot) -> None:
        start = time.perf_counter()
        _lower_priority()
        try:
            write(self.output_dir, snap, self.keep)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self._failure = (snap.step, exc)
        finally:
            self.last_write_seconds = time.perf_counter() - start

    def wait(self) -> None:
        """Block until the save in flight is written; raise CheckpointWriteError if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            step, exc = self._failure
            self._failure = None
            previous = find_latest(self.output_dir, warn=lambda _: None)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise CheckpointWriteError(f"could not write {self.output_dir}/checkpoint-{step}: {reason}; the previous "
                                       f"checkpoint is intact: {previous.path if previous else 'none'}", step) from exc

    def close(self) -> None:
        """Wait for the last save (raising its error) and free the snapshot buffers."""
        try:
            self.wait()
        finally:
            self._copier = None

    def __enter__(self) -> "AsyncSaver":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: let the save in flight land, but do not hide the original error behind its own.
        try:
            self.close()
        except CheckpointWriteError:
            pass


def _lower_priority() -> None:
    """Give the calling (writer) thread the lowest CPU priority (Linux: nice is per thread), so that hashing
    and serialising take idle cycles rather than the training's intra-op threads, which all wait for
    the slowest of them. Best effort: elsewhere the thread keeps its priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class SaveCadence:
    """When the loop saves a checkpoint: every `every_steps` steps when given; otherwise when
    `every_seconds` of wall time have passed since the last save (or the start), provided the time
    training has waited for saves, the next one included (estimated by the last), stays within
    `max_overhead` of the wall time so far. Never at the last step: final/ is written then.

    The clock starts when the cadence is made (make it when the loop starts).
    """

    def __init__(self, every_steps: int | None = None, every_seconds: float | None = 1800.0,
                 max_overhead: float = 0.05, clock: Callable[[], float] = time.monotonic):
        self.every_steps = every_steps or None
        self.every_seconds = every_seconds or None
        self.max_overhead = max_overhead
        self.clock = clock
        self.start = self.last_save = clock()
        self.stall_seconds = 0.0
        self.last_stall = 0.0

    def due(self, step: int, total_steps: int) -> bool:
        if step >= total_steps:
            return False
        if self.every_steps:
            return step % self.every_steps == 0
        if not self.every_seconds:
            return False
        now = self.clock()
        if now - self.last_save < self.every_seconds:
            return False
        return self.stall_seconds + self.last_stall <= self.max_overhead * (now - self.start)

    def saved(self, stall_seconds: float) -> None:
        """Record a save and the seconds training waited for it."""
        self.last_save = self.clock()
        self.stall_seconds += stall_seconds
        self.last_stall = stall_seconds
