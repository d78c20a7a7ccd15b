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
