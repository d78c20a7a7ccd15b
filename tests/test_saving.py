"""gradaccum train's saves: in the background, on the default time cadence, the same weights either way."""

from __future__ import annotations

import torch

from gradaccum import checkpoint, saving
from test_train import final_weights, run, write_pairs


def test_default_cadence_writes_no_intermediate_checkpoint(tmp_path):
    """Without --save-every a short run (minutes, like `make demo`) saves only final/: the default is
    by wall time (every 30 minutes), no longer a number of checkpoints per run."""
    write_pairs(tmp_path / "data.jsonl")
    result = run(tmp_path, "default", save_every=None, max_steps=4, micro_batch_size=4)
    assert not list(result.output.glob("checkpoint-*")) and not list(result.output.glob(".checkpoint-*"))
    assert (result.output / "final" / "model.safetensors").exists()


def test_time_cadence_saves_when_the_time_has_come(tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "DEFAULT_SAVE_SECONDS", 1e-6)
    monkeypatch.setattr(saving, "MAX_SAVE_OVERHEAD", float("inf"))  # cap tested in test_async_save
    write_pairs(tmp_path / "data.jsonl")
    result = run(tmp_path, "timed", save_every=None, max_steps=8, micro_batch_size=4, keep_checkpoints=10)
    # every step but the last (final/ is written then); the old default (4 per run) saved 2, 4, 6
    assert [c.step for c in checkpoint.list_checkpoints(result.output)] == [1, 2, 3, 4, 5, 6, 7]


def test_saves_are_written_in_the_background_and_change_nothing(tmp_path, monkeypatch):
    """Steps go on while checkpoint-2 is written (the writer held 1 s by the test hook); it lands
    complete, and the final weights are those of a run that saves nothing."""
    import gradaccum.train as train_module

    write_pairs(tmp_path / "data.jsonl")
    plain = final_weights(run(tmp_path, "plain", max_steps=4, micro_batch_size=4))
    seen = {}
    real_log_step = train_module.log_step

    def log_step(run_, progress, record, bar):
        seen[record["step"]] = (run_.output / "checkpoint-2" / "manifest.json").exists()
        real_log_step(run_, progress, record, bar)

    monkeypatch.setattr(train_module, "log_step", log_step)
    monkeypatch.setenv("GRADACCUM_TEST_SAVE_DELAY", "1.0")
    result = run(tmp_path, "saved", max_steps=4, micro_batch_size=4, save_every=2)
    assert seen[3] is False, seen  # step 3 trained while checkpoint-2 was being written
    checkpoint.verify(result.output / "checkpoint-2")
    saved = final_weights(result)
    assert all(torch.equal(saved[k], plain[k]) for k in plain)


def test_the_finder_reserves_a_snapshot_on_the_cpu(tmp_path, monkeypatch):
    """--micro-batch-size auto on the CPU budgets the memory a save's snapshot will hold."""
    from gradaccum import memory

    asked = {}

    def find(loss_module, examples, config, device, pad_token_id, *, reserved_bytes=0):
        asked["reserved"], asked["expected"] = reserved_bytes, saving.snapshot_bytes(loss_module.model)
        return 4

    monkeypatch.setattr(memory, "find_micro_batch_size", find)
    write_pairs(tmp_path / "data.jsonl")
    run(tmp_path, "auto", micro_batch_size="auto", max_steps=1, save_final=False)
    from gradaccum.models import load_model

    params = sum(p.numel() for p in load_model("tiny")[0].parameters())
    assert asked["reserved"] == asked["expected"] >= 3 * 8 * params  # float64 weights + AdamW's two moments
