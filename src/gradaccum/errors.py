"""The user's mistakes: the only exceptions the CLI prints as one line (exit 2).

Every message names what to fix: the flag, or the file, line and field. Anything else that
escapes a command keeps its traceback, because it is our bug. `GradaccumError` is a `ValueError`,
so code that catches ValueError (and `pytest.raises(ValueError)`) keeps working.
"""

from __future__ import annotations


class GradaccumError(ValueError):
    """A user's mistake; the message is one line, ready for the CLI."""


class ConfigError(GradaccumError):
    """A flag, a combination of flags, or the --output folder."""


class DataError(GradaccumError):
    """A problem in the user's data file; the message starts with `file:line:` and names the field."""


class ModelError(GradaccumError):
    """A model spec or option the user got wrong (--model, --lora, ...)."""


class CheckpointError(GradaccumError):
    """A checkpoint is missing, incomplete or corrupt."""


class TrainingError(GradaccumError):
    """The run cannot go on (non-finite losses or weights, disk full, ...); the message says why."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a message that names it (its type when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
