"""`--report-to tensorboard,wandb`: every metrics.jsonl record also goes to a tracker.

Each record's numbers are logged at its step (the optimizer step, as in metrics.jsonl) as the global
step: `train/loss`, `train/grad_norm`, ... and, on eval steps, `eval/loss`, `eval/accuracy`. The
run config goes along as TensorBoard hparams (and a text summary) or as wandb's run config.

- Only the main process (rank 0 under torchrun) reports; the others get `Trackers([])`.
- `check` imports the trackers' packages in set-up, before the run writes anything, so a missing
  package is one line and an untouched --output.
- What the trackers write lives in --output under `FOLDERS` (tensorboard/, wandb/); each tracker
  that opens there is noted in `RECORD` (trackers.json, with wandb's run id), and run_folder lets
  `--overwrite` delete the folders of the trackers a run noted (or named in its report_to).
- `open_trackers` opens them (train does so while its claim on --output can still be undone: a
  wandb.init that fails leaves the folder, and the run --overwrite would replace, as they were);
  the `Trackers` it returns is a context manager: the trackers are flushed and closed however the
  loop ends (an exception, a second Ctrl-C), and wandb hears whether the run failed.
- A resumed run's TensorBoard writer drops the events logged after the checkpoint (they are redone);
  its wandb run goes on with the run id noted in trackers.json (`resume="allow"`).
- wandb reads its own settings (WANDB_MODE=offline logs without an account, WANDB_MODE=disabled
  turns it off, WANDB_API_KEY, ...); WANDB_DISABLED=true, HF Trainer's switch, which wandb itself
  ignores, is passed on as mode="disabled".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from .config import TrainConfig, trackers
from .errors import ConfigError, TrainingError, first_line

FOLDERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> what it writes in --output
RECORD = "trackers.json"  # in --output: {tracker: {...}} for each tracker that opened there; wandb: its run id
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


def read_record(output: Path) -> dict[str, dict[str, Any]]:
    """`RECORD` in `output`: the trackers that opened there ({} when there is none, or it cannot be read)."""
    try:
        record = json.loads((output / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if isinstance(v, dict)} if isinstance(record, dict) else {}


def _note(output: Path, name: str, **values: Any) -> None:
    record = read_record(output)
    (output / RECORD).write_text(json.dumps({**record, name: {**record.get(name, {}), **values}}, indent=2) + "\n")


class Trackers:
    """The run's trackers as one: `log(record)` sends a metrics record to each, `close(failed)` ends them;
    as a context manager, they are closed when the block ends, as failed if it raised."""

    def __init__(self, opened: list[Any]):
        self.opened = opened

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)

    def log(self, record: dict[str, Any]) -> None:
        if self.opened and (values := scalars(record)):
            for tracker in self.opened:
                tracker.log(values, record["step"])

    def close(self, failed: bool) -> None:
        for tracker in self.opened:
            tracker.close(failed)
        self.opened = []


def open_trackers(config: TrainConfig, output: Path, start_step: int, is_main: bool) -> Trackers:
    """The trackers of --report-to, open (none off the main process); if one fails to open, those
    opened before it are closed."""
    opened = Trackers([])
    with contextlib.ExitStack() as failing:
        failing.callback(opened.close, failed=True)
        for name in trackers(config.report_to) if is_main else ():
            opened.opened.append(_TensorBoard(config, output, start_step) if name == "tensorboard"
                                 else _WandB(config, output))
            _note(output, name, **getattr(opened.opened[-1], "noted", {}))
        failing.pop_all()
    return opened


class _TensorBoard:
    def __init__(self, config: TrainConfig, output: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: a resumed run redoes the steps after its checkpoint; their old events go.
        self.writer = SummaryWriter(log_dir=str(output / FOLDERS["tensorboard"]),
                                    purge_step=start_step + 1 if start_step else None)
        if not start_step:
            settings = {k: v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)
                        for k, v in config.recorded().items()}
            experiment, session_start, _ = hparams(settings, {"train/loss": None, "eval/loss": None})
            self.writer.file_writer.add_summary(experiment)
            self.writer.file_writer.add_summary(session_start)
            self.writer.add_text("run_config", "```\n" + json.dumps(config.recorded(), indent=2) + "\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool) -> None:
        self.writer.flush()
        self.writer.close()


class _WandB:
    def __init__(self, config: TrainConfig, output: Path):
        import wandb

        # wandb reads WANDB_MODE (offline, disabled), WANDB_API_KEY, ... itself; not WANDB_DISABLED.
        settings: dict[str, Any] = dict(project=os.environ.get("WANDB_PROJECT", "gradaccum"), dir=str(output),
                                        config=config.recorded())
        if os.environ.get("WANDB_DISABLED", "").strip().upper() in ("1", "TRUE", "YES", "ON"):
            settings["mode"] = "disabled"  # as HF Trainer reads WANDB_DISABLED
        run_id = read_record(output).get("wandb", {}).get("id") if config.resume else None
        if isinstance(run_id, str):
            settings.update(id=run_id, resume="allow")  # the same wandb run goes on
        try:
            self.run = wandb.init(**settings)
        except Exception as exc:  # noqa: BLE001 - not logged in, no network: the user's setting, one line
            raise TrainingError(f"--report-to wandb: wandb.init failed: {first_line(exc)} (WANDB_MODE=offline "
                                "logs without an account)") from None
        run_id = getattr(self.run, "id", None)
        self.noted = {"id": run_id} if isinstance(run_id, str) else {}

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
