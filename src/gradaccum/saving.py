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
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, distributed
from .async_save import AsyncSaver, SaveCadence
from .errors import ConfigError
from .layer_checkpointing import is_peft_model

DEFAULT_SAVE_SECONDS = 1800.0  # --save-every's default: every 30 minutes of wall time
MAX_SAVE_OVERHEAD = 0.05  # ... skipped while waiting for saves would exceed 5% of the run


def snapshot_bytes(model: torch.nn.Module) -> int:
    """CPU memory a save's snapshot holds beside the run: the weights it stores (all but a frozen base)
    and AdamW's two moments, once more (for memory.find_micro_batch_size's reserved_bytes)."""
    frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
    stored = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()
              if t.data_ptr() not in frozen}
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(stored.values()) + 2 * trainable


def lora_settings(model: torch.nn.Module) -> dict[str, Any] | None:
    """The LoRA settings the model was built with (its peft config), as state.json records them; None without."""
    config = getattr(model, "peft_config", {}).get("default") if is_peft_model(model) else None
    if config is None:
        return None
    targets = config.target_modules
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": targets if isinstance(targets, str) or targets is None else sorted(targets)}


# How each recorded setting is named to the user (dropout and targets have no flag: they follow from the model).
_LORA_SETTINGS = {"r": "--lora-r", "alpha": "--lora-alpha", "dropout": "LoRA dropout",
                  "target_modules": "LoRA target modules"}


def _resume_mismatch(resumed: dict[str, Any], model: torch.nn.Module, config: Any) -> tuple[str, Any, Any] | None:
    """(what, in the checkpoint, now) for the first setting of the model that differs from the checkpoint's
    run: --lora and its settings (state.json's 'lora'; older checkpoints: their run config) and --dtype."""
    recorded_config = resumed.get("config") if isinstance(resumed.get("config"), dict) else {}
    if "dtype" in recorded_config and recorded_config["dtype"] != config.dtype:
        return "--dtype", recorded_config["dtype"], config.dtype
    if "lora" in resumed:
        recorded = resumed["lora"]
    elif "lora" in recorded_config:
        recorded = {"r": recorded_config.get("lora_r"), "alpha": recorded_config.get("lora_alpha")} \
            if recorded_config["lora"] else None
    else:
        return None
    now = lora_settings(model)
    if (recorded is None) != (now is None) or not (isinstance(recorded, dict) or recorded is None):
        return "--lora", recorded is not None, now is not None
    for key, name in _LORA_SETTINGS.items():
        if recorded is not None and key in recorded and recorded[key] != now[key]:
            return name, recorded[key], now[key]
    return None


def resumable_base(resumed: dict[str, Any], model: torch.nn.Module, output: Path,
                   config: Any) -> checkpoint.FrozenBase | None:
    """At --resume, before anything is written: refuse a model built with other LoRA settings or --dtype than the
    checkpoint's run (another rank or alpha is another run, not a damaged checkpoint), then return the frozen base's
    fingerprint when the checkpoint left the base out (LoRA), refusing a base that is not the one it was trained on
    (the checkpoint cannot rebuild it, only tell it apart)."""
    where = f"--resume: {output}/checkpoint-{resumed['step']}"
    if (mismatch := _resume_mismatch(resumed, model, config)) is not None:
        name, then, now = mismatch
        if name == "--lora":
            how = "with" if then else "without"
            raise ConfigError(f"{where} was trained {how} --lora; resume it {how} --lora or start a new run")
        raise ConfigError(f"{where} was trained with {name} {then}, and this run has {now}; resume with {name} "
                          f"{then} or start a new run")
    if "frozen_base" not in resumed:
        return None
    frozen = checkpoint.frozen_base(model)
    if (reason := checkpoint.frozen_base_mismatch(resumed["frozen_base"], frozen)) is not None:
        raise ConfigError(f"{where} {reason}; resume with the --model {config.model} files, --seed, --dtype and "
                          "--lora settings of the run that wrote it")
    return frozen


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
        self._frozen_known = False

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
                 "lora": lora_settings(run.model), "config": run.config.to_dict()}
        if self.saver is not None:
            self.saver.save(step, run.model, training_state, state, model_state, frozen=self._frozen_base())
            if wait:
                self.saver.wait()
        distributed.barrier()
        self.cadence.saved(time.perf_counter() - start)

    def _frozen_base(self) -> checkpoint.FrozenBase | None:
        """The frozen base that checkpoints leave out (LoRA's), fingerprinted at the first save: nothing in
        training writes a parameter the optimizer does not hold, so it is the base the run was built with."""
        run = self.run
        if run.fsdp:  # full state dicts of every parameter (FSDP2 refuses --lora)
            return None
        if run.frozen_base is None and not self._frozen_known:
            run.frozen_base = checkpoint.frozen_base(run.model)
        self._frozen_known = True
        return run.frozen_base

    def close(self) -> None:
        """Wait for the write in flight; CheckpointWriteError if it failed."""
        if self.saver is not None:
            self.saver.close()

    def __enter__(self) -> "Checkpointing":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.saver is not None:  # the saver's own exit: an error already raised wins over its write's
            self.saver.__exit__(exc_type, exc, tb)
