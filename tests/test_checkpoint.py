"""Checkpoints: atomic, verified, damaged ones skipped, no pickle code on load, ENOSPC safe."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from gradaccum import async_save, checkpoint
from helpers import TinyLM


def _state(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(torch.zeros(1, 4, dtype=torch.long))
    getattr(out, "logits", out).sum().backward()
    opt.step()
    return {"optimizer": opt.state_dict(), "accumulator": {"step": 1, "num_skipped": 0}}


def test_save_load_round_trip(tmp_path):
    model = TinyLM()
    path = checkpoint.save(tmp_path, 7, model, _state(model), {"step": 7})
    assert path.name == "checkpoint-7" and (path / "manifest.json").exists()
    assert not list(tmp_path.glob(".checkpoint-*"))  # no temporary folder left behind
    other = TinyLM()
    training_state, state = checkpoint.load(path, other)
    assert state["step"] == 7 and training_state["accumulator"]["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_keep_prunes_old_checkpoints(tmp_path):
    model = TinyLM()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, model, {}, {"step": step}, keep=2)
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [3, 4]


@pytest.mark.parametrize("damage", ["truncate", "delete", "no_manifest"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, damage):
    model = TinyLM()
    checkpoint.save(tmp_path, 1, model, {}, {"step": 1})
    newest = checkpoint.save(tmp_path, 2, model, {}, {"step": 2})
    if damage == "truncate":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        (newest / "optimizer.pt").unlink()
    else:
        (newest / "manifest.json").unlink()
    warnings = []
    found = checkpoint.find_latest(tmp_path, warn=warnings.append)
    assert found.step == 1
    assert "checkpoint-2" in warnings[0]
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(newest, model)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = TinyLM()
    checkpoint.save(tmp_path, 1, model, {}, {"step": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 2, model, {}, {"step": 2})
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob(".checkpoint-*"))
    checkpoint.verify(tmp_path / "checkpoint-1")


def test_loading_never_runs_pickled_code(tmp_path, monkeypatch):
    """optimizer.pt is read with weights_only=True: a malicious pickle is refused, not executed."""
    monkeypatch.chdir(tmp_path)
    model = TinyLM()
    path = checkpoint.save(tmp_path, 1, model, {}, {"step": 1})

    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    torch.save({"evil": Evil()}, path / "optimizer.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = checkpoint._sha256(path / "optimizer.pt")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception):
        checkpoint.load(path, model)
    assert not (tmp_path / "pwned").exists()


def _resign(path):
    """Recompute the manifest's checksums, as if the damage had happened before the save finished."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {name: checkpoint._sha256(path / name) for name in manifest["files"]}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_manifest_that_leaves_out_a_required_file_does_not_verify(tmp_path):
    model = TinyLM()
    path = checkpoint.save(tmp_path, 1, model, _state(model), {"step": 1})
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["optimizer.pt"]
    (path / "optimizer.pt").unlink()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.pt"):
        checkpoint.verify(path)
    fresh = checkpoint.save(tmp_path, 2, model, _state(model), {"step": 2})
    assert sorted(json.loads((fresh / "manifest.json").read_text())["files"]) == sorted(checkpoint.REQUIRED_FILES)


@pytest.mark.parametrize("name", ["../../outside.bin", "/etc/hostname", "sub/model.safetensors", ".."])
def test_manifest_names_must_be_plain_file_names(tmp_path, name):
    (tmp_path / "outside.bin").write_bytes(b"not ours")
    model = TinyLM()
    path = checkpoint.save(tmp_path / "run", 1, model, _state(model), {"step": 1})
    (path / "sub").mkdir()
    (path / "sub" / "model.safetensors").write_bytes(b"x")
    manifest = json.loads((path / "manifest.json").read_text())
    target = (path / name) if not name.startswith("/") else __import__("pathlib").Path(name)
    manifest["files"][name] = checkpoint._sha256(target) if target.is_file() else "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="not a plain file name"):
        checkpoint.verify(path)


@pytest.mark.parametrize("damage", ["truncated_weights", "bad_json", "missing_step", "bad_optimizer", "bad_rng"])
def test_any_failure_to_load_falls_back_to_the_previous_checkpoint(tmp_path, damage):
    """Checksums only catch damage after the save; a file that was bad when written (here: re-signed)
    must not stop a resume while an older checkpoint loads."""
    model = TinyLM()
    checkpoint.save(tmp_path, 1, model, _state(model), {"step": 1})
    newest = checkpoint.save(tmp_path, 2, model, _state(model), {"step": 2})
    if damage == "truncated_weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "bad_json":
        (newest / "state.json").write_text('{"step": 2,')
    elif damage == "missing_step":
        (newest / "state.json").write_text('{"epoch": 0}')
    elif damage == "bad_optimizer":
        (newest / "optimizer.pt").write_bytes(b"garbage")
    else:
        (newest / "rng.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    _resign(newest)
    checkpoint.verify(newest)  # the checksums hold: only loading finds the damage
    warnings = []
    found, (training_state, state) = checkpoint.load_latest(tmp_path, lambda path: checkpoint.load(path, TinyLM()),
                                                            warn=warnings.append)
    assert found.step == 1 and state["step"] == 1
    assert len(warnings) == 1 and "checkpoint-2" in warnings[0], warnings
    assert checkpoint.load_latest(tmp_path / "nothing", lambda path: None, warn=warnings.append) is None


def test_a_checkpoint_of_other_shapes_is_a_mismatch_not_damage(tmp_path):
    """A tensor of another shape than the model's is another model, not a damaged file: falling back to an
    older checkpoint of the same run would fail the same way (or load an older run). Loud, naming the tensor."""
    linear = torch.nn.Linear(4, 3)
    for step in (1, 2):
        checkpoint.save(tmp_path, step, linear, {}, {"step": step})
    warnings = []
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"checkpoint-2: .*'weight' is \(3, 4\) in the checkpoint and \(5, 4\) in the model"):
        checkpoint.load_latest(tmp_path, lambda path: checkpoint.load(path, torch.nn.Linear(4, 5)),
                               warn=warnings.append)
    assert not warnings
    assert issubclass(checkpoint.CheckpointMismatchError, checkpoint.CheckpointError)  # a user error: exit 2


# ---------------------------------------------------------------------------------------------
# Background saves: AsyncSaver, and the cadence of saves


def _tied_llama():
    from helpers import tiny_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**tiny_llama().config.to_dict(), "tie_word_embeddings": True})
    return LlamaForCausalLM(config)


def _files(path):
    return {name: (path / name).read_bytes() for name in checkpoint.REQUIRED_FILES if name != "optimizer.pt"}


def test_async_save_writes_what_save_writes(tmp_path):
    model = _tied_llama()
    training_state = _state(model)
    sync = checkpoint.save(tmp_path / "sync", 3, model, training_state, {"step": 3})
    with async_save.AsyncSaver(tmp_path / "async") as saver:
        saver.save(3, model, training_state, {"step": 3})
    background = tmp_path / "async" / "checkpoint-3"
    checkpoint.verify(background)
    # Weights (tied names dropped as for the model itself), RNG and state.json: the same bytes.
    assert _files(background) == _files(sync)
    other = _tied_llama()
    for p in other.parameters():
        torch.nn.init.zeros_(p)
    loaded, state = checkpoint.load(background, other)
    assert state["step"] == 3 and other.lm_head.weight is other.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    expected = training_state["optimizer"]["state"]
    assert all(torch.equal(loaded["optimizer"]["state"][i][k], expected[i][k]) for i in expected for k in expected[i])


def test_the_checkpoint_holds_the_state_at_save_time(tmp_path, monkeypatch):
    """Training goes on while the writer works: what it changes after `save` returns must not leak in."""
    monkeypatch.setenv("GRADACCUM_TEST_SAVE_DELAY", "0.5")  # the writer is still busy below
    model = TinyLM()
    training_state = _state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in training_state["optimizer"]["state"][0].items()}
    rng = torch.get_rng_state()
    saver = async_save.AsyncSaver(tmp_path)
    saver.save(1, model, training_state, {"step": 1})
    assert saver.in_flight
    with torch.no_grad():  # the next steps, in place, while the writer works
        for p in model.parameters():
            p.add_(1.0)
        training_state["optimizer"]["state"][0]["exp_avg"].add_(1.0)
    torch.rand(10)
    training_state["accumulator"]["step"] = 99
    saver.close()
    loaded, _ = checkpoint.load(tmp_path / "checkpoint-1", model)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    assert all(torch.equal(loaded["optimizer"]["state"][0][k], moments[k]) for k in moments)
    assert loaded["accumulator"]["step"] == 1
    assert torch.equal(torch.get_rng_state(), rng)  # load restored the generator as it was at save


def test_reused_buffers_never_change_a_written_checkpoint(tmp_path):
    model = TinyLM()
    saver = async_save.AsyncSaver(tmp_path, keep=3)
    saved = []
    for step in (1, 2):
        training_state = _state(model)  # a step: changes the weights
        with torch.no_grad():
            model.head.weight.fill_(float(step))
        saver.save(step, model, training_state, {"step": step})
        saved.append(saver._copier.buffers["model/head.weight"].data_ptr())
    saver.close()
    assert saved[0] == saved[1]  # the second snapshot went into the first one's memory
    for step in (1, 2):
        assert bool((checkpoint.load_weights(tmp_path / f"checkpoint-{step}")["head.weight"] == step).all())


def test_training_waits_for_the_copy_not_the_write(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADACCUM_TEST_SAVE_DELAY", "0.6")
    model = TinyLM()
    saver = async_save.AsyncSaver(tmp_path, keep=1)
    stall = saver.save(1, model, _state(model), {"step": 1})
    assert stall < 0.3 and saver.in_flight
    # One save in flight: the next one waits for the previous write before copying.
    second = saver.save(2, model, _state(model), {"step": 2})
    assert second > 0.3 and saver.last_write_seconds >= 0.6
    saver.close()
    assert not saver.in_flight and saver.num_saves == 2
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [2]  # keep=1 pruned checkpoint-1


def test_a_failed_background_write_is_raised_at_the_next_save_and_at_close(tmp_path, monkeypatch):
    model = TinyLM()
    real_save = torch.save

    def full_disk_for(step):
        def save(obj, path, *args, **kwargs):
            if f"checkpoint-{step}" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, path, *args, **kwargs)
        return save

    saver = async_save.AsyncSaver(tmp_path)
    saver.save(1, model, _state(model), {"step": 1})
    monkeypatch.setattr(checkpoint.torch, "save", full_disk_for(2))
    saver.save(2, model, _state(model), {"step": 2})  # fails in the background; training goes on
    with pytest.raises(checkpoint.CheckpointWriteError, match="checkpoint-2: No space left on device") as info:
        saver.save(3, model, _state(model), {"step": 3})
    assert info.value.step == 2 and "intact" in str(info.value) and "checkpoint-1" in str(info.value)
    assert not list(tmp_path.glob(".checkpoint-*"))
    monkeypatch.setattr(checkpoint.torch, "save", full_disk_for(4))
    saver.save(4, model, _state(model), {"step": 4})
    with pytest.raises(checkpoint.CheckpointWriteError, match="checkpoint-4"):
        saver.close()  # the last save's error is not lost either
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [1]


def test_an_error_on_the_training_thread_is_not_hidden_by_the_save_in_flight(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADACCUM_TEST_SAVE_DELAY", "0.2")
    model = TinyLM()
    with pytest.raises(KeyError):
        with async_save.AsyncSaver(tmp_path) as saver:
            saver.save(1, model, _state(model), {"step": 1})
            raise KeyError("the training failed")
    checkpoint.verify(tmp_path / "checkpoint-1")  # the save in flight still landed, whole


def test_kill_during_a_background_save_then_resume_is_bit_exact(tmp_path):
    """SIGKILL while checkpoint-k is being written in the background and training has gone past step k:
    the resume starts from an intact older checkpoint and ends with the uninterrupted run's weights."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from safetensors.torch import load_file

    worker = [sys.executable, str(Path(__file__).parent / "async_save_worker.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(worker + [str(tmp_path / "straight"), "8"], check=True, env=env, timeout=120)

    out = tmp_path / "killed"
    proc = subprocess.Popen(worker + [str(out), "8"], env={**env, "GRADACCUM_TEST_SAVE_DELAY": "1.0"})
    deadline, killed_at = time.time() + 120, None
    while proc.poll() is None and time.time() < deadline:
        writing = [int(p.name.split("-")[1].split(".")[0]) for p in out.glob(".checkpoint-*.tmp")]
        logged = len((out / "steps.log").read_text().split()) if (out / "steps.log").exists() else 0
        if writing and checkpoint.list_checkpoints(out) and logged > max(writing):
            proc.send_signal(signal.SIGKILL)  # mid-write, training already past the step being written
            killed_at = (max(writing), logged)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed_at and proc.returncode == -signal.SIGKILL, (killed_at, proc.returncode)
    assert list(out.glob(".checkpoint-*.tmp")) and not (out / "final.safetensors").exists()

    subprocess.run(worker + [str(out), "8", "--resume"], check=True, env=env, timeout=120)
    assert not list(out.glob(".checkpoint-*.tmp"))
    a, b = load_file(str(out / "final.safetensors")), load_file(str(tmp_path / "straight" / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), f"killed at {killed_at}"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_cadence_every_n_steps_never_at_the_last_step():
    cadence = async_save.SaveCadence(every_steps=3)
    assert [s for s in range(1, 10) if cadence.due(s, total_steps=9)] == [3, 6]


def test_cadence_by_wall_time_keeps_the_stall_under_five_percent():
    clock = FakeClock()
    cadence = async_save.SaveCadence(every_seconds=60, max_overhead=0.05, clock=clock)
    clock.now = 59
    assert not cadence.due(1, 100)
    clock.now = 61
    assert cadence.due(2, 100)
    cadence.saved(stall_seconds=2.0)  # 2 s of 61: fine so far
    clock.now = 100
    assert not cadence.due(3, 100)  # only 39 s since the last save
    clock.now = 122
    assert cadence.due(4, 1000)  # (2 + 2) s of 122 s = 3.3%
    assert not cadence.due(100, 100)  # the last step writes final/ instead
    cadence.saved(stall_seconds=20.0)  # a slow save (a big model): 22 s of waiting
    clock.now = 200
    assert not cadence.due(5, 1000)  # 60 s since it, but 42 s of 200 s would be 21%
    clock.now = 840
    assert cadence.due(6, 1000)  # 42 of 840 s = 5%
    assert not async_save.SaveCadence(every_seconds=0, clock=clock).due(1, 10)
