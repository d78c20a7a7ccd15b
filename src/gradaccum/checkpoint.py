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

Saving without stalling training (`AsyncSaver`): a save first takes a *snapshot* -- private CPU
copies of the weights, the optimizer/scheduler/accumulator state and the RNG states, taken on the
training thread between steps -- and hands it to a background thread that does the slow part:
serialising, hashing, fsync and the atomic rename. Training waits only for the copies. One save is
in flight at a time (the next save waits for the previous one), and an error of the background
writer is raised on the training thread at the next save, `wait()` or `close()`, never lost.
`SaveCadence` decides when a save is due: every N steps, or by wall time with the time training
waits for saves held under a fraction of the run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import threading
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
    CPU memory (`last_snapshot_bytes`); a run's peak includes it (memory.find_micro_batch_size's
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
             model_state: dict[str, torch.Tensor] | None = None, *, fresh: bool = False) -> float:
        """Snapshot now, write `checkpoint-<step>/` in the background; returns the seconds training waited."""
        start = time.perf_counter()
        self.wait()
        copied = time.perf_counter()
        if self._copier is None:
            self._copier = _Copier(self._reuse_buffers)
        snap = snapshot(step, model, training_state, state, model_state, fresh=fresh, copier=self._copier)
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
