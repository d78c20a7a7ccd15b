"""Kills, signals and NaNs: no lost work, no corrupt weights, the same final weights."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from gradaccum.cli import main
from test_train import run, write_pairs

ARGS = ["--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "8", "--save-every", "1",
        "--keep-checkpoints", "3", "--eval-every", "0", "--no-progress", "--lr", "0.01"]


def _cmd(tmp_path, out, *extra):
    return [sys.executable, "-m", "gradaccum", "train", "--data", str(tmp_path / "data.jsonl"), "--output",
            str(out), *ARGS, *extra]


def _steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _has_checkpoint(out) -> bool:
    return any((path / "manifest.json").exists() for path in out.glob("checkpoint-*"))


def _kill_after(cmd, out, num_steps, sig=signal.SIGKILL, delay=0.0, checkpointed=False):
    """Start training, wait until `num_steps` steps are logged (and, `checkpointed`, a checkpoint is
    complete: saves are written in the background, so a logged step no longer implies it) (+ delay),
    then send `sig`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while ((_steps_logged(out) < num_steps or (checkpointed and not _has_checkpoint(out))) and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


def test_sigkill_at_several_points_then_resume_gives_the_same_weights(tmp_path):
    write_pairs(tmp_path / "data.jsonl", n=20)
    straight = tmp_path / "straight"
    subprocess.run(_cmd(tmp_path, straight), check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    # Kill 1: once step 2 is logged and a checkpoint is complete (mid-window, or mid-way through a
    # background write of the next checkpoint).
    code, _, _ = _kill_after(_cmd(tmp_path, out), out, 2, checkpointed=True)
    assert code == -signal.SIGKILL
    # Kill 2: resumed, then killed a little later, wherever it is (mid-window or mid-save).
    code, _, _ = _kill_after(_cmd(tmp_path, out, "--resume"), out, 5, delay=0.05)
    assert code == -signal.SIGKILL
    # A kill in the middle of a save: a temporary folder and a checkpoint without manifest remain.
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    shutil.copytree(out / f"checkpoint-{newest}", out / f".checkpoint-{newest + 1}.tmp", dirs_exist_ok=True)
    (out / f"checkpoint-{newest + 2}").mkdir()
    proc = subprocess.run(_cmd(tmp_path, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping damaged checkpoint" in proc.stdout
    assert not list(out.glob(".checkpoint-*.tmp"))

    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(straight / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b), "resumed weights differ from the uninterrupted run"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    write_pairs(tmp_path / "data.jsonl", n=20)
    out = tmp_path / "term"
    code, stdout, stderr = _kill_after(_cmd(tmp_path, out, "--save-every", "0", "--max-steps", "200"), out, 2,
                                       sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    assert "--resume" in stdout and "SIGTERM" in stdout
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "manifest.json").exists()
    assert int(saved[0].name.split("-")[1]) == _steps_logged(out)


def test_non_finite_losses_never_reach_the_weights(tmp_path, monkeypatch, capsys):
    import gradaccum.train as train_module
    from gradaccum.losses import CausalLMLoss

    class Exploding(CausalLMLoss):
        def forward(self, *args):
            return super().forward(*args) * float("nan")

    write_pairs(tmp_path / "data.jsonl")
    monkeypatch.setattr(train_module, "CausalLMLoss", Exploding)
    code = main(["train", "--data", str(tmp_path / "data.jsonl"), "--output", str(tmp_path / "nan"),
                 "--max-steps", "10", "--max-nonfinite", "3", "--no-progress", "--eval-every", "0",
                 "--save-every", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not finite for 3 windows in a row" in err and len(err.splitlines()) == 1
    lines = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skip_reason"] for m in lines] == ["nonfinite"] * 3


def test_a_few_non_finite_windows_are_skipped_and_counted(tmp_path, monkeypatch):
    import gradaccum.train as train_module
    from gradaccum.losses import CausalLMLoss

    calls = {"n": 0}

    class Flaky(CausalLMLoss):
        def forward(self, *args):
            calls["n"] += 1
            loss = super().forward(*args)
            return loss * float("inf") if calls["n"] in (3, 4) else loss  # window 2 (micro 3, 4)

    write_pairs(tmp_path / "data.jsonl")
    monkeypatch.setattr(train_module, "CausalLMLoss", Flaky)
    result = run(tmp_path, "flaky", dtype="float32", micro_batch_size=4, max_steps=4)
    reasons = [m["skip_reason"] for m in result.metrics]
    assert reasons == [None, "nonfinite", None, None]
    weights = load_file(str(result.output / "final" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert math.isfinite(result.metrics[-1]["loss"])


def test_disk_full_during_a_save_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import errno

    from gradaccum import checkpoint

    write_pairs(tmp_path / "data.jsonl")
    real_save = torch.save

    def save_or_fail(obj, path, *a, **k):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save_or_fail)
    code = main(["train", "--data", str(tmp_path / "data.jsonl"), "--output", str(tmp_path / "full"),
                 "--max-steps", "6", "--save-every", "2", "--no-progress", "--eval-every", "0",
                 "--batch-size", "4", "--micro-batch-size", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "No space left on device" in err and "checkpoint-2" in err
    checkpoint.verify(tmp_path / "full" / "checkpoint-2")
