"""The output folder of a training run: when a run may write into it, and what --overwrite may delete.

A folder that a run created holds a marker file, `.gradaccum-run`. `--overwrite` deletes only the
names a run writes (metrics.jsonl, loss.png, run_config.json, trackers.json, the marker, final/,
checkpoint-N/), the --report-to trackers' tensorboard/ and wandb/ only when that run reported to
them (its run_config.json's report_to or its trackers.json names them: a folder of that name may be
the user's), and only in a folder that holds the marker: a folder gradaccum did not create is never
emptied, whatever it holds (run_config.json alone proves nothing: any tool may write a file of that name).

`check` only reads; `claim` is the first write, and `train` calls it once every other check
(arguments, data, model, batch geometry, the checkpoint to resume) has passed, so a run that is
refused leaves the folder as it found it. The run that --overwrite replaces is set aside, not
deleted, until the new run has started (its trackers open: wandb.init can fail): a start that fails
puts it back.

run_config.json records the run's settings, with --resume and --overwrite false: they act on the
folder at the time, and `--config run_config.json` must not act again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from .config import RESUMABLE_CHANGES, TrainConfig, trackers
from .errors import ConfigError, GradaccumError
from .reporting import FOLDERS as TRACKER_FOLDERS, RECORD as TRACKER_RECORD, read_record

MARKER = ".gradaccum-run"
PREVIOUS = ".gradaccum-previous"  # the run that --overwrite replaces, until the new one has started
RUN_FILES = ("metrics.jsonl", "loss.png", "run_config.json", "run_config.json.tmp", TRACKER_RECORD, MARKER)
_RUN_DIRS = re.compile(r"^(final|checkpoint-\d+|\.checkpoint-\d+\.tmp|%s)$" % re.escape(PREVIOUS))


def resolve(config: TrainConfig) -> Path:
    return Path(config.output or f"runs/{datetime.now():%Y%m%d-%H%M%S}")


def is_run(output: Path) -> bool:
    return (output / MARKER).is_file()


def check(output: Path, config: TrainConfig, has_checkpoint: bool) -> None:
    """Refuse an --output this run must not write into; read only, write nothing."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output}: is a file, not a folder")
    ancestor = output
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--output {output}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: {ancestor} is not writable")
    if config.resume:
        if not has_checkpoint:
            raise ConfigError(f"--resume: no checkpoint in {output}/ to resume from")
    elif output.is_dir() and _has_entries(output) and not is_run(output):
        raise ConfigError(f"--output {output}/ is not empty and is not a gradaccum run folder (it has no {MARKER}); "
                         "gradaccum neither writes into nor deletes from it: choose a new or empty folder")
    run_file = output / "run_config.json"
    if not run_file.is_file():
        return
    old, damage = _read_run_config(run_file)
    if damage is not None:
        if config.resume:
            raise ConfigError(f"{run_file}: {damage}, so --resume cannot check that these settings are the run's; "
                              "restore it, or drop --resume to start over (with --overwrite)")
        if not config.overwrite:
            raise ConfigError(f"{run_file}: {damage}; {output}/ holds a run whose settings cannot be read: use "
                              "another --output, or --overwrite to replace that run")
        return
    new = config.recorded()
    changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if changed:
        k = changed[0]
        different = f"{output}/ holds a different run ({k}: {old.get(k)!r} there, {new[k]!r} now)"
        if config.resume:  # --overwrite deletes nothing under --resume: the run would go on with new settings
            raise ConfigError(f"{different}; --resume goes on with the run's own settings: "
                              f"give its --{k.replace('_', '-')}, or drop --resume to start over (with --overwrite)")
        if not config.overwrite:
            raise ConfigError(f"{different}; use another --output or --overwrite")
    elif not config.resume and not config.overwrite:
        raise ConfigError(f"{output}/ already holds a run; pass --resume to continue it or --overwrite")


def _read_run_config(path: Path) -> tuple[dict, str | None]:
    """run_config.json's settings, or ({}, what is wrong with it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return {}, f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    if not text.strip():
        return {}, "is empty"
    try:
        old = json.loads(text)
    except json.JSONDecodeError as exc:
        return {}, f"not valid JSON (line {exc.lineno}: {exc.msg})"
    return (old, None) if isinstance(old, dict) else ({}, "not a JSON object")


def _has_entries(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except OSError as exc:
        raise ConfigError(f"--output {folder}: cannot list it: {exc.strerror or exc}") from None


def remove_run_files(output: Path, keep: Path | None = None) -> list[Path]:
    """Delete what a run writes in `output` (see the module doc), but `keep`; leave every other name alone."""
    removed = [child for child in _run_entries(output) if child != keep]
    for child in removed:
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    return removed


def _run_entries(output: Path) -> list[Path]:
    """The names in `output` that a run wrote (see the module doc)."""
    folders = _tracker_folders(output)
    entries = []
    for child in sorted(output.iterdir()):
        if child.is_dir() and not child.is_symlink():
            if _RUN_DIRS.match(child.name) or child.name in folders:
                entries.append(child)
        elif child.name in RUN_FILES and not child.is_dir():
            entries.append(child)
    return entries


def _tracker_folders(output: Path) -> set[str]:
    """The tracker folders the run in `output` wrote: its trackers.json's, and its run_config.json's report_to."""
    names = set(read_record(output))
    old, damage = _read_run_config(output / "run_config.json")
    if damage is None:
        with contextlib.suppress(GradaccumError, TypeError):
            names.update(trackers(old.get("report_to", "none")))
    return {TRACKER_FOLDERS[name] for name in names if name in TRACKER_FOLDERS}


class Claim:
    """A run's hold on its --output, from `claim`. As a context manager around the rest of the start:
    if the block fails, the folder is put back as `claim` found it (the run it replaces included);
    if it succeeds, the run that --overwrite replaces is deleted."""

    def __init__(self, output: Path, undoable: bool, created: bool, previous: Path | None):
        self.output, self.undoable, self.created, self.previous = output, undoable, created, previous

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            if self.previous is not None:
                shutil.rmtree(self.previous)
        elif self.undoable:  # (a --resume changed nothing that needs putting back)
            remove_run_files(self.output, keep=self.previous)
            if self.previous is not None:
                for child in sorted(self.previous.iterdir()):
                    os.rename(child, self.output / child.name)
                self.previous.rmdir()
            if self.created:
                with contextlib.suppress(OSError):
                    self.output.rmdir()
        self.previous = None


def claim(output: Path, config: TrainConfig) -> Claim:
    """The run's first write: set the previous run aside (--overwrite), create and mark the folder, write
    run_config.json. Use the result as a context manager around the rest of the start (see `Claim`)."""
    created, previous = not output.exists(), None
    if config.overwrite and not config.resume and is_run(output):
        previous = _set_aside(output)
    # Undone, what the run wrote goes: only where no run is left in --output but this one.
    undoable = not config.resume and not is_run(output)
    held = Claim(output, undoable=undoable, created=created, previous=previous)
    try:
        _write(output, config)
    except BaseException as exc:
        held.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return held


def _write(output: Path, config: TrainConfig) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("A gradaccum training run writes here; --overwrite deletes only the files and "
                                 "folders a run writes (metrics.jsonl, loss.png, run_config.json, trackers.json, "
                                 "final/, checkpoint-N/, and tensorboard/ and wandb/ when the run reported to "
                                 "them) and this marker.\n")
    temporary = output / "run_config.json.tmp"  # a kill leaves the old file or the new one, not a part
    temporary.write_text(json.dumps(config.recorded(), indent=2))
    os.replace(temporary, output / "run_config.json")


def _set_aside(output: Path) -> Path:
    """Move the run in `output` into `output/PREVIOUS`, which `Claim` deletes or puts back."""
    previous = output / PREVIOUS
    if previous.is_dir():  # a run replaced before, whose successor never started: the user replaced it then
        shutil.rmtree(previous)
    entries = _run_entries(output)
    previous.mkdir()
    for child in entries:
        os.rename(child, previous / child.name)
    return previous
