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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .errors import CheckpointError

MANIFEST = "manifest.json"
# Every checkpoint holds exactly these; the manifest is built from this list, not from whatever the
# folder happens to contain, so a file a save forgot cannot make a checkpoint that still verifies.
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json")
_NAME = re.compile(r"^checkpoint-(\d+)$")
T = TypeVar("T")


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


def save(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    training_state: dict[str, Any],
    state: dict[str, Any],
    keep: int | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `checkpoint-<step>/` atomically and prune to the newest `keep` checkpoints.

    `training_state` holds tensors and plain values (optimizer, scheduler, accumulator
    state dicts); `state` is JSON (step, data position, config). `model_state`, when
    given, is saved instead of `model` (e.g. a full state dict gathered from FSDP shards).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if model_state is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_file(_drop_shared(model_state), str(tmp / "model.safetensors"))
        torch.save(training_state, tmp / "optimizer.pt")
        save_file(rng_state(), str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
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
