"""The output folder of a training run: when a run may write into it, and what --overwrite may delete.

A folder that a run created holds a marker file, `.gradaccum-run`. `--overwrite` deletes only the
names a run writes (metrics.jsonl, loss.png, run_config.json, the marker, final/, checkpoint-N/, and
the --report-to trackers' tensorboard/ and wandb/), and only in a folder that holds the marker: a
folder gradaccum did not create is never emptied, whatever it holds (run_config.json alone proves
nothing: any tool may write a file of that name).

`check` only reads; `claim` is the first write, and `train` calls it once every other check
(arguments, data, model, batch geometry, the checkpoint to resume) has passed, so a run that is
refused leaves the folder as it found it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from .config import RESUMABLE_CHANGES, TrainConfig
from .errors import ConfigError
from .reporting import FOLDERS as TRACKER_FOLDERS

MARKER = ".gradaccum-run"
RUN_FILES = ("metrics.jsonl", "loss.png", "run_config.json", MARKER)
_RUN_DIRS = re.compile(r"^(final|checkpoint-\d+|\.checkpoint-\d+\.tmp|%s)$" % "|".join(TRACKER_FOLDERS.values()))


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
    try:
        old = json.loads(run_file.read_text())
    except (OSError, ValueError) as exc:
        old = {"<unreadable>": type(exc).__name__}
    new = config.to_dict()
    changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if changed and not config.overwrite:
        k = changed[0]
        raise ConfigError(f"{output}/ holds a different run ({k}: {old.get(k)!r} there, {new[k]!r} now); "
                         "use another --output or --overwrite")
    if not config.resume and not config.overwrite:
        raise ConfigError(f"{output}/ already holds a run; pass --resume to continue it or --overwrite")


def _has_entries(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except OSError as exc:
        raise ConfigError(f"--output {folder}: cannot list it: {exc.strerror or exc}") from None


def remove_run_files(output: Path) -> list[Path]:
    """Delete what a run writes in `output` (see the module doc); leave every other name alone."""
    removed = []
    for child in sorted(output.iterdir()):
        if _RUN_DIRS.match(child.name) and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        elif child.name in RUN_FILES and not child.is_dir():
            child.unlink()
        else:
            continue
        removed.append(child)
    return removed


def claim(output: Path, config: TrainConfig) -> None:
    """The run's first write: clear the previous run (--overwrite), create and mark the folder."""
    if config.overwrite and not config.resume and is_run(output):
        remove_run_files(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("A gradaccum training run writes here; --overwrite deletes only the files and "
                                 "folders a run writes (metrics.jsonl, loss.png, run_config.json, final/, "
                                 "checkpoint-N/, tensorboard/, wandb/) and this marker.\n")
    (output / "run_config.json").write_text(json.dumps(config.to_dict(), indent=2))
