"""Atomic, verifiable checkpoints and exact resume.

A checkpoint is a folder `checkpoint-<step>/` holding:
    model.safetensors   the model's state dict (tied weights handled by safetensors); with `frozen`
                        (LoRA) every entry but the frozen parameters: the adapters and the buffers
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

A model whose base is frozen (LoRA) is checkpointed without it: nothing in training writes a
parameter the optimizer does not hold, so the base is rebuilt the way the run built it and the
checkpoint's tensors are loaded on top. Buffers are kept (they are small, and some change in training:
BatchNorm's running statistics). state.json records a sha256 of the frozen tensors (`FrozenBase`), and
loading onto a base with another fingerprint is refused instead of making a different model.

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
from safetensors import safe_open
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


class CheckpointMismatchError(CheckpointError):
    """A checkpoint holds tensors of other shapes than the model built now: another model (other --lora-r,
    --model ...), not damage. Raised as it is: an older checkpoint of the same run would not fit either."""


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


@dataclass(frozen=True)
class FrozenBase:
    """The frozen parameters that checkpoints leave out, and a fingerprint of their values."""

    names: frozenset[str]  # state-dict names, tied aliases included
    sha256: str  # over the sorted names, dtypes, shapes and bytes
    num_bytes: int

    def record(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "num_tensors": len(self.names), "num_bytes": self.num_bytes}


def frozen_base(model: torch.nn.Module) -> FrozenBase | None:
    """The model's frozen parameters (requires_grad False) and their fingerprint; None when all train.

    Reads every frozen byte once (a copy to the CPU, one tensor at a time): call it once per run.
    """
    named = [(name, p) for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]
    if not named:
        return None
    digest, first_name, num_bytes = hashlib.sha256(), {}, 0
    for name, tensor in sorted(named, key=lambda item: item[0]):
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard: each rank would fingerprint another part
            raise ValueError("frozen_base: sharded (DTensor) parameters are not supported")
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        owner = first_name.setdefault((tensor.device, tensor.data_ptr(), tuple(tensor.shape)), name)
        if owner != name:  # a tie: its bytes are hashed once, under the first name
            digest.update(f"={owner}|".encode())
            continue
        data = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(data.numpy()))
        num_bytes += data.numel()
    return FrozenBase(frozenset(name for name, _ in named), digest.hexdigest(), num_bytes)


def frozen_base_mismatch(recorded: Any, frozen: FrozenBase | None) -> str | None:
    """Why a checkpoint recorded with `recorded` (state.json's 'frozen_base') cannot load onto a model
    whose frozen base is `frozen`; None when it can."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return "has an unreadable 'frozen_base' in state.json"
    if frozen is None:
        return ("holds only the trained parameters of a model with a frozen base (LoRA), and the model built now "
                "has no frozen parameters")
    if frozen.sha256 != recorded["sha256"]:
        return (f"holds only the trained parameters (LoRA), saved over a frozen base with sha256 "
                f"{recorded['sha256'][:12]}..., and the frozen base built now has {frozen.sha256[:12]}...")
    return None


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
             copier: _Copier | None = None, frozen: FrozenBase | None = None) -> Snapshot:
    """Copy what `checkpoint-<step>/` will hold, now: weights, training state, RNG states.

    `fresh=True`: the tensors of `model_state` and `training_state` are already private copies that
    nothing will change (e.g. full state dicts gathered from FSDP2 shards onto the CPU); they are kept
    as they are, without another copy. `frozen` (from `frozen_base`): leave those parameters out (they
    are neither copied nor written) and record their fingerprint in state.json.
    """
    rng = rng_state()  # the generators as they are between these steps, not when the writer gets to them
    from_model = model_state is None
    tensors = model.state_dict() if from_model else model_state
    state = copy.deepcopy(state)
    if frozen is not None:
        tensors = {name: tensor for name, tensor in tensors.items() if name not in frozen.names}
        state["frozen_base"] = frozen.record()
    copier = None if fresh else copier or _Copier(reuse=False)
    seen: dict = {}
    snap = Snapshot(step, _copy_tree(dict(tensors), copier, "model", seen), from_model,
                    _copy_tree(training_state, copier, "training", seen), state, rng)
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
    *,
    frozen: FrozenBase | None = None,
) -> Path:
    """Write `checkpoint-<step>/` atomically and prune to the newest `keep` checkpoints (blocking).

    `training_state` holds tensors and plain values (optimizer, scheduler, accumulator
    state dicts); `state` is JSON (step, data position, config). `model_state`, when
    given, is saved instead of `model` (e.g. a full state dict gathered from FSDP shards).
    `frozen`: leave the frozen base out (see `snapshot`).
    """
    # Written straight from the live tensors: nothing runs while this writes, so no copy is needed.
    return write(output_dir, snapshot(step, model, training_state, state, model_state, fresh=True, frozen=frozen),
                 keep)


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

    Any failure (a checksum, a truncated file, bad JSON, a missing key) is reported through `warn` and the
    previous checkpoint is tried; None when none loads. A CheckpointMismatchError (tensors of other shapes
    than the model's) is raised: the model is not the one the run trained. `restore`
    must load everything it loads from scratch, since a failed attempt may have loaded part of it.
    """
    for checkpoint in reversed(list_checkpoints(output_dir)):
        try:
            verify(checkpoint.path)
            return checkpoint, restore(checkpoint.path)
        except CheckpointMismatchError:
            raise
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


def load(path: str | Path, model: torch.nn.Module | None = None,
         frozen: FrozenBase | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `model` (when given) and RNG; return (training_state, state).

    A checkpoint without its frozen base loads only onto a model whose frozen base has the recorded
    fingerprint (`frozen`: `frozen_base(model)`, computed here when not given).
    """
    path = Path(path)
    verify(path)
    state = read_state(path)
    if model is not None:
        left_out: frozenset[str] = frozenset()
        if "frozen_base" in state:
            frozen = frozen or frozen_base(model)
            if (reason := frozen_base_mismatch(state["frozen_base"], frozen)) is not None:
                raise CheckpointError(f"{path}: {reason}")
            left_out = frozen.names
        check_shapes(path, model)
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        missing = set(missing) - left_out
        if missing or unexpected:
            raise CheckpointError(f"{path}: model does not match the checkpoint "
                                  f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    training_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    set_rng_state(load_file(str(path / "rng.safetensors")))
    return training_state, state


def check_shapes(path: str | Path, model: torch.nn.Module) -> None:
    """CheckpointMismatchError naming the model's first tensor whose shape in the checkpoint differs (global
    shapes: an FSDP2 model's DTensors too). Reads only the file's header."""
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as stored:
        shapes = {name: tuple(stored.get_slice(name).get_shape()) for name in stored.keys()}
    for name, tensor in model.state_dict().items():
        if shapes.get(name, tuple(tensor.shape)) != tuple(tensor.shape):
            raise CheckpointMismatchError(f"{path}: does not fit the model built now: {name!r} is {shapes[name]} in "
                                          f"the checkpoint and {tuple(tensor.shape)} in the model; resume with the "
                                          "--model, --lora settings and --dtype of the run that wrote it")
