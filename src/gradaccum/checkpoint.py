"""Atomic, verifiable checkpoints and exact resume.

A checkpoint is a folder `checkpoint-<step>/` holding:
    model.safetensors   the model's state dict (tied weights handled by safetensors)
    optimizer.pt        optimizer + scheduler + accumulator state, tensors only
                        (read back with torch.load(weights_only=True): no pickle code runs)
    rng.safetensors     CPU (and CUDA) generator states
    state.json          step, epoch, data position and the run config
    manifest.json       sha256 of every file above; written last

It is written into `.checkpoint-<step>.tmp/`, every file fsynced, then renamed into
place, so a kill at any moment leaves either the previous checkpoint or the new one,
never half of one. `find_latest` verifies checksums and falls back to an older
checkpoint when the newest is damaged; `load_latest` also falls back when a checkpoint
verifies but does not load (a file that was already bad when it was signed).

Saving without stalling training: `snapshot` takes private CPU copies of everything a checkpoint holds
and `write` writes one; async_save.AsyncSaver runs the write in a background thread.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .errors import CheckpointError, TrainingError

MANIFEST = "manifest.json"
# Every checkpoint holds exactly these; the manifest is built from this list, not from whatever the
# folder happens to contain, so a file a save forgot cannot make a checkpoint that still verifies.
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json")
_NAME = re.compile(r"^checkpoint-(\d+)$")
T = TypeVar("T")


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (disk full, permissions...); the message names it and the
    newest checkpoint that is intact. Raised on the training thread for a background save too."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class Checkpoint:
    path: Path
    step: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import, while the process has a single thread (os.umask sets while it reads).
_FILE_MODE = 0o666 & ~_umask()


def normal_permissions(paths) -> None:
    """Give files the mode an ordinary `open` would (0644 under umask 022): safetensors writes 0600."""
    for path in paths:
        os.chmod(path, _FILE_MODE)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("torch_cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class Snapshot:
    """Everything a checkpoint holds, as private CPU copies that training can no longer change."""

    step: int
    model_state: dict[str, torch.Tensor]  # tied names share one tensor, as in the model
    from_model: bool  # names as in the model's state dict (safetensors drops tied duplicates as for the model)
    training_state: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, torch.Tensor]

    @property
    def num_bytes(self) -> int:
        return _tensor_bytes(self.model_state) + _tensor_bytes(self.training_state)


class _StateDictOf:
    """A stand-in model for safetensors' save_model, which only calls state_dict()."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)


class _Copier:
    """Copies tensors to the CPU, into buffers kept for the next snapshot when `reuse` (pinned when the
    source is on an accelerator, so that the copy is one DMA and the buffer is not allocated again)."""

    def __init__(self, reuse: bool):
        self.reuse = reuse
        self.buffers: dict[str, torch.Tensor] = {}
        self.asynchronous = False

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2 shard): the caller gathers full state first
            raise ValueError("snapshot: got a sharded DTensor; pass full state dicts (distributed.full_state_dicts)")
        on_device = tensor.device.type != "cpu"
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = on_device and torch.cuda.is_available()
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            if self.reuse:
                self.buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=on_device and buffer.is_pinned())
        self.asynchronous |= on_device
        return buffer

    def finish(self) -> None:
        if self.asynchronous and torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies have landed
        self.asynchronous = False


def _copy_tree(value: Any, copier: _Copier | None, key: str, seen: dict) -> Any:
    """A private copy of a state dict tree: tensors through `copier` (None: kept as they are); aliases
    stay aliases. Containers and plain values are always copied: they are cheap, and a live list
    (a scheduler's) may change while the writer serialises it."""
    if torch.is_tensor(value):
        if copier is None:
            return value
        alias = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                 tuple(value.stride()), value.dtype)
        if alias not in seen:
            seen[alias] = copier(key, value)
        return seen[alias]
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _copy_tree(v, copier, f"{key}/{k}", seen)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(_copy_tree(v, copier, f"{key}/{i}", seen) for i, v in enumerate(value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return copy.deepcopy(value)


def _tensor_bytes(value: Any) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def snapshot(step: int, model: torch.nn.Module | None, training_state: dict[str, Any], state: dict[str, Any],
             model_state: dict[str, torch.Tensor] | None = None, *, fresh: bool = False,
             copier: _Copier | None = None) -> Snapshot:
    """Copy what `checkpoint-<step>/` will hold, now: weights, training state, RNG states.

    `fresh=True`: the tensors of `model_state` and `training_state` are already private copies that
    nothing will change (e.g. full state dicts gathered from FSDP2 shards onto the CPU); they are kept
    as they are, without another copy.
    """
    rng = rng_state()  # the generators as they are between these steps, not when the writer gets to them
    from_model = model_state is None
    tensors = model.state_dict() if from_model else model_state
    copier = None if fresh else copier or _Copier(reuse=False)
    seen: dict = {}
    snap = Snapshot(step, _copy_tree(dict(tensors), copier, "model", seen), from_model,
                    _copy_tree(training_state, copier, "training", seen), copy.deepcopy(state), rng)
    if copier is not None:
        copier.finish()
    return snap


def save(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    training_state: dict[str, Any],
    state: dict[str, Any],
    keep: int | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `checkpoint-<step>/` atomically and prune to the newest `keep` checkpoints (blocking).

    `training_state` holds tensors and plain values (optimizer, scheduler, accumulator
    state dicts); `state` is JSON (step, data position, config). `model_state`, when
    given, is saved instead of `model` (e.g. a full state dict gathered from FSDP shards).
    """
    # Written straight from the live tensors: nothing runs while this writes, so no copy is needed.
    return write(output_dir, snapshot(step, model, training_state, state, model_state, fresh=True), keep)


def _write_delay() -> None:
    """Tests only: GRADACCUM_TEST_SAVE_DELAY=<seconds> holds every save after it created its temporary
    folder and before it reads anything to write, so that a test can kill the process in the middle of
    a (background) save, and see that the writer reads nothing that training has changed since."""
    delay = os.environ.get("GRADACCUM_TEST_SAVE_DELAY")
    if delay:
        time.sleep(float(delay))


def write(output_dir: str | Path, snap: Snapshot, keep: int | None = None) -> Path:
    """Write a snapshot as `checkpoint-<step>/`: into a temporary folder, fsynced, then renamed into place."""
    output_dir = Path(output_dir)
    step = snap.step
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_delay()
        if snap.from_model:
            save_model(_StateDictOf(snap.model_state), str(tmp / "model.safetensors"))
        else:
            save_file(_drop_shared(snap.model_state), str(tmp / "model.safetensors"))
        torch.save(snap.training_state, tmp / "optimizer.pt")
        save_file(snap.rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(snap.state, indent=2, sort_keys=True))
        manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in REQUIRED_FILES}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        normal_permissions(tmp / name for name in REQUIRED_FILES)
        for name in (*REQUIRED_FILES, MANIFEST):
            _fsync(tmp / name)
        _fsync(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def _drop_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per storage (tied embeddings): safetensors refuses shared tensors."""
    seen, kept = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            kept[name] = tensor.contiguous()
    return kept


def list_checkpoints(output_dir: str | Path) -> list[Checkpoint]:
    """Checkpoint folders in `output_dir`, oldest first (unverified)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def remove_partial(output_dir: str | Path) -> list[Path]:
    """Delete temporary folders of saves that never finished (the process died mid-save)."""
    removed = []
    for tmp in Path(output_dir).glob(".checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def verify(path: str | Path) -> None:
    """Raise CheckpointError unless every file in the manifest is present and intact."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: no readable {MANIFEST} ({exc.__class__.__name__})") from None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: {MANIFEST} has no table of files")
    for name in files:
        # Only names inside this folder: a manifest must not make us read (or trust) any other file.
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise CheckpointError(f"{path}: {MANIFEST} lists {name!r}, which is not a plain file name")
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{path}: {name} is missing from {MANIFEST}")
    for name, digest in files.items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(path / name) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum")


def find_latest(output_dir: str | Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged newer ones are reported and skipped."""
    for checkpoint in reversed(list_checkpoints(output_dir)):
        try:
            verify(checkpoint.path)
            return checkpoint
        except CheckpointError as exc:
            warn(f"skipping damaged checkpoint: {exc}")
    return None


def load_latest(output_dir: str | Path, restore: Callable[[Path], T], warn=print) -> tuple[Checkpoint, T] | None:
    """The newest checkpoint that verifies and that `restore(path)` loads, with what `restore` returned.

    Any failure (a checksum, a truncated file, bad JSON, a missing key, a tensor that does not fit) is
    reported through `warn` and the previous checkpoint is tried; None when none loads. `restore`
    must load everything it loads from scratch, since a failed attempt may have loaded part of it.
    """
    for checkpoint in reversed(list_checkpoints(output_dir)):
        try:
            verify(checkpoint.path)
            return checkpoint, restore(checkpoint.path)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, an older checkpoint may load
            reason = str(exc) if isinstance(exc, CheckpointError) else \
                f"{checkpoint.path}: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            warn(f"skipping damaged checkpoint: {reason}")
    return None


def read_state(path: str | Path) -> dict[str, Any]:
    """state.json of a checkpoint; CheckpointError unless it is a JSON object with an integer step."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: state.json is unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: state.json has no integer 'step'")
    return state


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint, by name (tied weights appear once)."""
    return load_file(str(Path(path) / "model.safetensors"))


def load(path: str | Path, model: torch.nn.Module | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `model` (when given) and RNG; return (training_state, state)."""
    path = Path(path)
    verify(path)
    state = read_state(path)
    if model is not None:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: model does not match the checkpoint "
                                  f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    training_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    set_rng_state(load_file(str(path / "rng.safetensors")))
    return training_state, state
