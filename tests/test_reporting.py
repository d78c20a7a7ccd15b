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

ROOT = Path(__file__).resolve().parent.parent


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
        self.id = "fake-run-1"  # the run's id (wandb.init returns this module as its run)

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
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
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


def _folders(output: Path) -> None:
    for folder in ("tensorboard", "wandb", "mine"):
        (output / folder).mkdir()
        (output / folder / "f").write_text("x")
    (output / "notes.txt").write_text("mine")


@pytest.mark.parametrize("report_to, deleted", [("none", set()), ("tensorboard", {"tensorboard"}),
                                                ("wandb,tensorboard", {"tensorboard", "wandb"})])
def test_overwrite_deletes_only_the_tracker_folders_the_run_reported_to(tmp_path, report_to, deleted):
    """A tensorboard/ or wandb/ folder in a run's --output is the user's unless the run reported there."""
    output = tmp_path / "run"
    run_folder.claim(output, TrainConfig(output=str(output), report_to=report_to))
    _folders(output)
    run_folder.remove_run_files(output)
    assert sorted(p.name for p in output.iterdir()) == sorted({"tensorboard", "wandb", "mine", "notes.txt"} - deleted)


def test_overwrite_deletes_the_folder_of_a_tracker_the_run_reported_to_before_its_resume(tmp_path, monkeypatch):
    """Started with wandb, resumed without: run_config.json says none, trackers.json still names wandb."""
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    output = tmp_path / "run"
    run_folder.claim(output, TrainConfig(output=str(output), report_to="wandb"))
    with reporting.open_trackers(TrainConfig(report_to="wandb"), output, 0, is_main=True):
        pass
    run_folder.claim(output, TrainConfig(output=str(output), resume=True))
    _folders(output)
    run_folder.remove_run_files(output)
    assert sorted(p.name for p in output.iterdir()) == ["mine", "notes.txt", "tensorboard"]


class FailingWandb(FakeWandb):
    """`wandb.init` as it fails without an account or a network."""

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")


def test_a_failed_wandb_init_leaves_the_run_that_overwrite_would_replace(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    assert _train(tmp_path, "--report-to", "wandb", "--save-every", "1") == 0, capsys.readouterr().err[-2000:]
    previous = tmp_path / "out"
    (previous / "wandb" / "run-1").mkdir(parents=True)  # what wandb itself wrote
    (previous / "wandb" / "run-1" / "events").write_text("logged")
    before = {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    assert (previous / "checkpoint-2").is_dir() and (previous / "trackers.json").is_file()
    failing = FailingWandb()
    monkeypatch.setitem(sys.modules, "wandb", failing)
    capsys.readouterr()
    assert _train(tmp_path, "--report-to", "wandb", "--overwrite", "--lr", "0.5") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wandb.init failed: api_key not configured" in err, err
    assert failing.calls and failing.calls[0][0] == "init"
    assert {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()} == before
    assert not (previous / run_folder.PREVIOUS).exists()
    # a new folder: nothing is left of the start
    assert _train(tmp_path, "--report-to", "wandb", output="new") == 2
    assert not (tmp_path / "new").exists()


def test_a_resumed_run_goes_on_with_its_wandb_run(tmp_path, capsys, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert _train(tmp_path, "--report-to", "wandb", "--save-every", "1") == 0, capsys.readouterr().err[-2000:]
    assert "id" not in fake.calls[0][1] and "resume" not in fake.calls[0][1]
    fake.calls.clear()
    fake.id = "fake-run-2"  # what a new wandb run would get
    assert _train(tmp_path, "--report-to", "wandb", "--save-every", "1", "--resume") == 0
    assert (fake.calls[0][1]["id"], fake.calls[0][1]["resume"]) == ("fake-run-1", "allow")
    fake.calls.clear()
    assert _train(tmp_path, "--report-to", "wandb", "--overwrite") == 0  # a new run: a new wandb run
    assert "id" not in fake.calls[0][1]
    assert json.loads((tmp_path / "out" / "trackers.json").read_text()) == {"wandb": {"id": "fake-run-2"}}


@pytest.mark.parametrize("value, mode", [("true", "disabled"), ("TRUE", "disabled"), ("1", "disabled"),
                                         ("false", None), ("", None)])
def test_wandb_disabled_is_passed_on_as_wandbs_own_switch(tmp_path, monkeypatch, value, mode):
    """wandb reads WANDB_MODE=disabled itself; WANDB_DISABLED=true is HF Trainer's, which gradaccum honours."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_DISABLED", value)
    with reporting.open_trackers(TrainConfig(report_to="wandb"), tmp_path, 0, is_main=True):
        pass
    assert fake.calls[0][1].get("mode") == mode
    readme = (ROOT / "README.md").read_text()
    assert "WANDB_MODE=disabled" in readme and "WANDB_DISABLED=true" in readme


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
