"""Checkpoints: atomic, verified, damaged ones skipped, no pickle code on load, ENOSPC safe."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from gradaccum import checkpoint
from helpers import TinyLM


def _state(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
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
