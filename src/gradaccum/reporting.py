"""`--report-to tensorboard,wandb`: every metrics.jsonl record also goes to a tracker.

Each record's numbers are logged at its step (the optimizer step, as in metrics.jsonl) as the global
step: `train/loss`, `train/grad_norm`, ... and, on eval steps, `eval/loss`, `eval/accuracy`. The
run config goes along as TensorBoard hparams (and a text summary) or as wandb's run config.

- Only the main process (rank 0 under torchrun) reports; the others get `Trackers([])`.
- `check` imports the trackers' packages in set-up, before the run writes anything, so a missing
  package is one line and an untouched --output.
- What the trackers write lives in --output under `FOLDERS` (tensorboard/, wandb/), which
  run_folder lets `--overwrite` delete together with the rest of a run.
- `open_trackers` is a context manager: the trackers are flushed and closed however the loop ends
  (an exception, a second Ctrl-C), and wandb hears whether the run failed.
- A resumed run's TensorBoard writer drops the events logged after the checkpoint (they are redone).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

from .config import TrainConfig, trackers
from .errors import ConfigError, TrainingError, first_line

FOLDERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> what it writes in --output
_INSTALL = {"tensorboard": "pip install tensorboard (or pip install 'gradaccum[tensorboard]')",
            "wandb": "pip install wandb"}
_NOT_SCALARS = {"step", "skipped", "skip_reason"}  # the step is the x axis; skipping shows as a gap


def check(report_to: str) -> None:
    """Refuse a tracker whose package does not import; writes nothing."""
    for name in trackers(report_to):
        try:
            if name == "tensorboard":
                import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            else:
                import wandb  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"--report-to {name}: the {name} package cannot be imported ({first_line(exc)}); "
                              f"{_INSTALL[name]}, or leave {name} out of --report-to") from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: eval_x -> eval/x, any other number -> train/x."""
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue  # a skipped window's loss; metrics.jsonl keeps it
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


class Trackers:
    """The run's trackers as one: `log(record)` sends a metrics record to each, `close(failed)` ends them."""

    def __init__(self, opened: list[Any]):
        self.opened = opened

    def log(self, record: dict[str, Any]) -> None:
        if self.opened and (values := scalars(record)):
            for tracker in self.opened:
                tracker.log(values, record["step"])

    def close(self, failed: bool) -> None:
        for tracker in self.opened:
            tracker.close(failed)
        self.opened = []


@contextlib.contextmanager
def open_trackers(config: TrainConfig, output: Path, start_step: int, is_main: bool) -> Iterator[Trackers]:
    """The trackers of --report-to (none off the main process), closed when the block ends."""
    names = trackers(config.report_to) if is_main else ()
    opened = Trackers([])
    try:
        for name in names:
            opened.opened.append(_TensorBoard(config, output, start_step) if name == "tensorboard"
                                 else _WandB(config, output))
        yield opened
    except BaseException:
        opened.close(failed=True)
        raise
    opened.close(failed=False)


class _TensorBoard:
    def __init__(self, config: TrainConfig, output: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: a resumed run redoes the steps after its checkpoint; their old events go.
        self.writer = SummaryWriter(log_dir=str(output / FOLDERS["tensorboard"]),
                                    purge_step=start_step + 1 if start_step else None)
        if not start_step:
            settings = {k: v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)
                        for k, v in config.to_dict().items()}
            experiment, session_start, _ = hparams(settings, {"train/loss": None, "eval/loss": None})
            self.writer.file_writer.add_summary(experiment)
            self.writer.file_writer.add_summary(session_start)
            self.writer.add_text("run_config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool) -> None:
        self.writer.flush()
        self.writer.close()


class _WandB:
    def __init__(self, config: TrainConfig, output: Path):
        import wandb

        # wandb reads WANDB_MODE (offline, disabled), WANDB_DISABLED, WANDB_API_KEY, ... itself.
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gradaccum"), dir=str(output),
                                  config=config.to_dict())
        except Exception as exc:  # noqa: BLE001 - not logged in, no network: the user's setting, one line
            raise TrainingError(f"--report-to wandb: wandb.init failed: {first_line(exc)} (WANDB_MODE=offline "
                                "logs without an account)") from None

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
