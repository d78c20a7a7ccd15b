"""`--report-to`: metrics.jsonl's records also go to TensorBoard / wandb, at their steps; refusals write nothing."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from gradaccum import reporting, run_folder
from gradaccum.cli import main
from gradaccum.config import TrainConfig


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"copy: w{i} =", "completion": f" w{i}" * (1 + i % 3)}) + "\n"
                            for i in range(8)))
    return path


def _train(tmp_path: Path, *extra: str, output: str = "out") -> int:
    """3 steps of the tiny preset on 8 examples, evaluated at steps 2 and 3 (a few seconds)."""
    data = _data(tmp_path)
    return main(["train", "--data", str(data), "--eval-data", str(data), "--eval-examples", "2", "--eval-every",
                 "2", "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "32",
                 "--no-progress", "--no-save-final", "--output", str(tmp_path / output), *extra])


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


class FakeWandb(types.ModuleType):
    """A `wandb` module that records what it is told."""

    def __init__(self):
        super().__init__("wandb")
        self.calls: list[tuple] = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, values, step):
        self.calls.append(("log", step, dict(values)))

    def finish(self, exit_code=0):
        self.calls.append(("finish", exit_code))


def test_tensorboard_events_hold_the_metrics_at_their_steps(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard (make install)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert _train(tmp_path, "--report-to", "tensorboard") == 0, capsys.readouterr().err[-2000:]
    metrics = _metrics(tmp_path / "out")
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)  # float32 events
    assert [e.value for e in events.Scalars("train/num_targets")] == [m["num_targets"] for m in metrics]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 3]
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx(
        [m["eval_loss"] for m in metrics if "eval_loss" in m], rel=1e-6)
    assert "eval/accuracy" in events.Tags()["scalars"] and "train/step" not in events.Tags()["scalars"]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert "run_config" in str(events.Tags()["tensors"])


def test_wandb_receives_the_records_and_the_run_config(tmp_path, capsys, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert _train(tmp_path, "--report-to", "wandb") == 0, capsys.readouterr().err[-2000:]
    output = tmp_path / "out"
    metrics = _metrics(output)
    (kind, init), *logs, finish = fake.calls
    assert kind == "init" and init == {"project": "gradaccum", "dir": str(output),
                                       "config": json.loads((output / "run_config.json").read_text())}
    assert [call[1] for call in logs] == [1, 2, 3] and finish == ("finish", 0)
    assert [call[2]["train/loss"] for call in logs] == [m["loss"] for m in metrics]
    assert [call[2].get("eval/loss") for call in logs] == [m.get("eval_loss") for m in metrics]
    assert [call[2].get("eval/accuracy") for call in logs] == [m.get("eval_accuracy") for m in metrics]


def test_trackers_are_closed_when_the_run_fails(tmp_path, capsys, monkeypatch):
    """A failure (here a second Ctrl-C at step 2) still finishes the wandb run, as failed, after step 1."""
    import gradaccum.train as train_module

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real = train_module.log_step

    def interrupted(run, progress, record, bar):
        if record["step"] == 2:
            raise KeyboardInterrupt
        real(run, progress, record, bar)

    monkeypatch.setattr(train_module, "log_step", interrupted)
    assert _train(tmp_path, "--report-to", "wandb") == 130
    assert [call[0] for call in fake.calls] == ["init", "log", "finish"] and fake.calls[-1] == ("finish", 1)


@pytest.mark.parametrize("value, fragment", [
    ("mlflow", "--report-to: unknown value 'mlflow' (choose none, tensorboard, wandb"),
    ("none,wandb", "'none' cannot be combined"),
    ("", "--report-to: unknown value ''"),
])
def test_unknown_report_to_is_refused(tmp_path, capsys, value, fragment):
    assert main(["train", "--report-to", value, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_comma_list_is_read_in_order_once():
    assert TrainConfig(report_to="wandb, tensorboard,wandb").report_to == "wandb,tensorboard"
    assert TrainConfig().report_to == "none"


@pytest.mark.parametrize("name", ["wandb", "tensorboard"])
def test_a_missing_tracker_package_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, name):
    """Even with --overwrite, the previous run in --output is left as it was."""
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    previous = tmp_path / "out"
    run_folder.claim(previous, TrainConfig(output=str(previous)))
    (previous / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted((p.name, p.read_bytes()) for p in previous.iterdir())
    assert _train(tmp_path, "--report-to", f"{name}", "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install {name}" in err, err
    assert sorted((p.name, p.read_bytes()) for p in previous.iterdir()) == before


def test_overwrite_deletes_the_tracker_folders_and_nothing_else(tmp_path):
    output = tmp_path / "run"
    run_folder.claim(output, TrainConfig(output=str(output)))
    for folder in ("tensorboard", "wandb", "mine"):
        (output / folder).mkdir()
        (output / folder / "f").write_text("x")
    (output / "notes.txt").write_text("mine")
    run_folder.remove_run_files(output)
    assert sorted(p.name for p in output.iterdir()) == ["mine", "notes.txt"]


def test_only_the_main_process_reports(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = TrainConfig(report_to="wandb")
    with reporting.open_trackers(config, tmp_path, 0, is_main=False) as trackers:
        trackers.log({"step": 1, "loss": 1.0})
    assert fake.calls == [] and not any(tmp_path.iterdir())
    with reporting.open_trackers(config, tmp_path, 0, is_main=True) as trackers:
        trackers.log({"step": 1, "loss": 1.0, "skipped": False, "skip_reason": None, "eval_loss": float("nan")})
    assert fake.calls[1] == ("log", 1, {"train/loss": 1.0}) and fake.calls[-1] == ("finish", 0)


def test_a_resumed_run_replaces_the_tensorboard_steps_it_redoes(tmp_path):
    """Killed after logging step 3, resumed from the checkpoint of step 1: steps 2-3 are logged again, once."""
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard (make install)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(report_to="tensorboard")
    with reporting.open_trackers(config, tmp_path, 0, is_main=True) as trackers:
        for step in (1, 2, 3):
            trackers.log({"step": step, "loss": float(step)})
    with reporting.open_trackers(config, tmp_path, 1, is_main=True) as trackers:
        for step in (2, 3, 4):
            trackers.log({"step": step, "loss": 10.0 * step})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 20.0), (3, 30.0), (4, 40.0)]
