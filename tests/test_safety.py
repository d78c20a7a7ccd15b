"""Safety of the train command: the effective batch on resume, what --overwrite may delete, nothing
written before the checks pass, non-finite weights, data without targets, file permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

import gradaccum.train as train_module
from gradaccum import checkpoint
from gradaccum.cli import main
from gradaccum.config import TrainConfig
from gradaccum.train import train
from test_train import StopAfter, final_weights, max_relative_difference, write_pairs


def _config(tmp_path, name, **overrides):
    kwargs = dict(data=str(tmp_path / "data.jsonl"), max_steps=4, micro_batch_size=2, accumulation_steps=2,
                  dtype="float64", lr=1e-2, output=str(tmp_path / name), progress=False, save_every=0,
                  eval_every=0)
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def _interrupted_at_step_2(tmp_path, monkeypatch, name="resumed"):
    """A float64 run of B = 2 x 2 = 4, stopped (as by Ctrl-C) after step 2 with checkpoint-2 saved."""
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "StopRequest", StopAfter(2))
        first = train(_config(tmp_path, name))
    assert first.interrupted and (first.output / "checkpoint-2").is_dir()
    return first.output


def _cli(tmp_path, capsys, *args, data=None):
    code = main(["train", "--data", str(data or tmp_path / "data.jsonl"), "--no-progress", "--max-steps", "1",
                 "--eval-every", "0", "--save-every", "0", "--batch-size", "4", "--micro-batch-size", "4", *args])
    return code, capsys.readouterr().err.strip()


# ---- item 2: a resume keeps the effective batch ------------------------------------------------


@pytest.mark.parametrize("new_split", [dict(micro_batch_size=4, accumulation_steps=None),
                                       dict(micro_batch_size=1, accumulation_steps=None),
                                       dict(micro_batch_size=1, accumulation_steps=None, batch_size=4)])
def test_resume_with_another_split_of_the_same_batch_is_exact(tmp_path, monkeypatch, new_split):
    """Without --batch-size the resumed run keeps the checkpoint's B = 4 and derives the accumulation
    steps from it; the weights end where the uninterrupted 2 x 2 run ends."""
    write_pairs(tmp_path / "data.jsonl")
    straight = final_weights(train(_config(tmp_path, "straight")))
    _interrupted_at_step_2(tmp_path, monkeypatch)
    second = train(_config(tmp_path, "resumed", resume=True, **new_split))
    assert second.steps == 4 and second.metrics[-1]["step"] == 4
    assert max_relative_difference(final_weights(second), straight) <= 1e-9


@pytest.mark.parametrize("changed, fragment", [
    (dict(accumulation_steps=4), "batch"),                       # 2 x 4 = 8, not the checkpoint's 4
    (dict(accumulation_steps=None, batch_size=8), "--batch-size 8"),
    (dict(micro_batch_size=3, accumulation_steps=None), "micro-batch"),  # 4 / 3 is no whole number
])
def test_resume_that_would_change_the_batch_is_refused(tmp_path, monkeypatch, changed, fragment):
    write_pairs(tmp_path / "data.jsonl")
    out = _interrupted_at_step_2(tmp_path, monkeypatch)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ValueError, match="4") as error:
        train(_config(tmp_path, "resumed", resume=True, **changed))
    assert fragment in str(error.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before writing


# ---- item 10: a checkpoint that verifies but does not load ---------------------------------------


def test_resume_falls_back_when_the_newest_checkpoint_does_not_load(tmp_path, monkeypatch, capsys):
    write_pairs(tmp_path / "data.jsonl")
    straight = final_weights(train(_config(tmp_path, "straight")))
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "StopRequest", StopAfter(3))
        train(_config(tmp_path, "resumed", save_every=1))
    newest = tmp_path / "resumed" / "checkpoint-3"
    (newest / "optimizer.pt").write_bytes(b"not a torch file")
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = __import__("hashlib").sha256(b"not a torch file").hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    second = train(_config(tmp_path, "resumed", resume=True, save_every=1))
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "checkpoint-3" in out and "resumed from" in out, out
    assert [m["step"] for m in second.metrics] == [1, 2, 3, 4]
    assert max_relative_difference(final_weights(second), straight) <= 1e-12


# ---- item 6: --overwrite deletes only what a run wrote, and only once the checks pass ------------


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    write_pairs(tmp_path / "data.jsonl")
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    (home / "metrics.jsonl").write_text("also mine\n")  # a run's file name, in a folder no run wrote
    code, err = _cli(tmp_path, capsys, "--output", str(home), "--overwrite")
    assert code == 2 and len(err.splitlines()) == 1 and "not a gradaccum run" in err, err
    assert sorted(p.name for p in home.iterdir()) == ["metrics.jsonl", "notes.txt", "photos"]
    assert (home / "metrics.jsonl").read_text() == "also mine\n"


def test_overwrite_deletes_only_run_files_and_can_repeat(tmp_path, capsys):
    """`make demo` runs `--output runs/demo --overwrite` again and again."""
    write_pairs(tmp_path / "data.jsonl")
    out = tmp_path / "demo"
    assert _cli(tmp_path, capsys, "--output", str(out), "--overwrite", "--save-every", "1",
                "--max-steps", "2")[0] == 0
    assert (out / "checkpoint-1").is_dir() and (out / "final").is_dir()
    (out / "my-notes.txt").write_text("keep me")
    code, err = _cli(tmp_path, capsys, "--output", str(out), "--overwrite", "--lr", "0.5")
    assert code == 0, err
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert not (out / "checkpoint-1").exists()  # the old run's checkpoint went, the new run saves none
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "run_config.json").read_text())["lr"] == 0.5


def test_overwrite_with_bad_data_keeps_the_old_run(tmp_path, capsys):
    write_pairs(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    assert _cli(tmp_path, capsys, "--output", str(out))[0] == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = _cli(tmp_path, capsys, "--output", str(out), "--overwrite", data=tmp_path / "missing.jsonl")
    assert code == 2 and "missing.jsonl" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_run_that_fails_its_checks_writes_nothing(tmp_path, capsys):
    write_pairs(tmp_path / "data.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    out = tmp_path / "new"
    for args in (["--model", "./no/such/model"], []):
        code, err = _cli(tmp_path, capsys, "--output", str(out), *args,
                         data=tmp_path / ("data.jsonl" if args else "bad.jsonl"))
        assert code == 2, err
        assert not out.exists()
    code, err = _cli(tmp_path, capsys, "--output", str(out))  # the corrected rerun needs no --overwrite
    assert code == 0, err


def _tree(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


@pytest.mark.parametrize("late", ["last_row", "eval_data", "resume_unloadable", "resume_nothing"])
def test_an_error_found_late_in_the_checks_writes_nothing(tmp_path, capsys, late):
    """Errors found after the model is loaded and the training data read (the last row of the data, the eval
    data, a checkpoint that verifies but does not load) still come before the first write."""
    write_pairs(tmp_path / "data.jsonl")
    out, args, data = tmp_path / "out", [], None
    if late == "last_row":
        data = tmp_path / "late.jsonl"
        data.write_text((tmp_path / "data.jsonl").read_text() + '{"prompt": "a", "completion": 3}\n')
    elif late == "eval_data":
        (tmp_path / "eval.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
        args = ["--eval-data", str(tmp_path / "eval.jsonl"), "--eval-every", "1"]
    elif late == "resume_unloadable":
        assert _cli(tmp_path, capsys, "--output", str(out), "--max-steps", "2", "--save-every", "1")[0] == 0
        damaged = out / "checkpoint-1"
        (damaged / "optimizer.pt").write_bytes(b"garbage")
        manifest = json.loads((damaged / "manifest.json").read_text())
        manifest["files"]["optimizer.pt"] = checkpoint._sha256(damaged / "optimizer.pt")
        (damaged / "manifest.json").write_text(json.dumps(manifest))
        args = ["--max-steps", "2", "--save-every", "1", "--resume"]
    else:
        args = ["--resume"]
    before = _tree(out) if out.exists() else None
    code, err = _cli(tmp_path, capsys, "--output", str(out), *args, data=data)
    assert code == 2 and len(err.splitlines()) == 1, err
    expected = {"last_row": "late.jsonl:25", "eval_data": "eval.jsonl:2", "resume_unloadable": "could be loaded",
                "resume_nothing": "no checkpoint"}[late]
    assert expected in err, err
    assert (_tree(out) if out.exists() else None) == before


# ---- item 8: a step that makes the weights non-finite -------------------------------------------


def test_a_step_that_makes_the_weights_non_finite_stops_the_run(tmp_path, capsys):
    """lr 1e300 in float32: the first update overflows the weights to inf (the gradient was finite)."""
    write_pairs(tmp_path / "data.jsonl")
    out = tmp_path / "blowup"
    code, err = _cli(tmp_path, capsys, "--output", str(out), "--lr", "1e300", "--max-steps", "4",
                     "--save-every", "1", "--warmup-steps", "0")
    assert code == 2 and len(err.splitlines()) == 1 and "not finite" in err and "step 1" in err, err
    assert not (out / "final").exists()
    for path in out.glob("checkpoint-*/model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path


def test_the_weight_check_tells_large_weights_from_non_finite_ones():
    """The cheap L2 norm overflows for |w| ~ 1e19 in float32; such weights are still finite."""
    cpu = torch.device("cpu")
    large = [torch.full((4,), 3e19), torch.randn(3)]
    assert not torch.isfinite(torch._foreach_norm(large, 2)[0])  # the case the fallback exists for
    assert train_module.weights_are_finite(large, False, cpu)
    for bad in (float("inf"), float("-inf"), float("nan")):
        weights = torch.randn(5)
        weights[2] = bad
        assert not train_module.weights_are_finite([torch.randn(3), weights], False, cpu), bad


def test_lr_inf_is_refused_before_training(tmp_path, capsys):
    write_pairs(tmp_path / "data.jsonl")
    code, err = _cli(tmp_path, capsys, "--output", str(tmp_path / "x"), "--lr", "inf")
    assert code == 2 and "--lr" in err and not (tmp_path / "x").exists()


# ---- item 9: every example lost its targets ------------------------------------------------------


def test_data_whose_targets_are_all_truncated_away_fails_early(tmp_path, capsys):
    write_pairs(tmp_path / "data.jsonl", n=12)  # prompts of 7+ characters, then the completion
    out = tmp_path / "short"
    code, err = _cli(tmp_path, capsys, "--output", str(out), "--max-length", "6")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--max-length 6" in err and "12 of 12" in err, err
    assert not out.exists()


# ---- item 11: normal permissions ----------------------------------------------------------------


def test_saved_files_get_the_umask_default_permissions(tmp_path, capsys):
    write_pairs(tmp_path / "data.jsonl")
    out = tmp_path / "perm"
    previous = os.umask(0o022)
    try:
        assert _cli(tmp_path, capsys, "--output", str(out), "--max-steps", "2", "--save-every", "1")[0] == 0
    finally:
        os.umask(previous)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
