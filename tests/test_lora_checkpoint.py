"""LoRA checkpoints: the adapters and their optimizer state only, the frozen base fingerprinted, resume exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gradaccum import async_save, checkpoint
from gradaccum.errors import CheckpointError, ConfigError
from test_train import StopAfter, final_weights, run, write_pairs


def _lora(seed: int = 0, r: int = 4):
    from helpers import tiny_llama
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(torch.float32, seed=0)
    torch.manual_seed(seed)
    # init_lora_weights=False: B != 0, so the adapters differ from seed to seed.
    config = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        init_lora_weights=False)
    return get_peft_model(base, config)


def _training_state(model):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    return {"optimizer": optimizer.state_dict()}


def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_a_lora_checkpoint_holds_the_adapters_only(tmp_path):
    model = _lora()
    frozen = checkpoint.frozen_base(model)
    assert frozen is not None and not set(frozen.names) & _trainable(model)
    path = checkpoint.save(tmp_path, 1, model, _training_state(model), {"step": 1}, frozen=frozen)
    stored = load_file(str(path / "model.safetensors"))
    assert set(stored) == _trainable(model)  # Llama's buffers are not persistent: nothing else
    state = json.loads((path / "state.json").read_text())
    assert state["frozen_base"]["sha256"] == frozen.sha256

    other = _lora(seed=1)  # the same base, other adapters: the checkpoint's adapters land on it
    checkpoint.load(path, other)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_loading_onto_another_base_is_refused(tmp_path):
    from helpers import tiny_llama

    model = _lora()
    path = checkpoint.save(tmp_path, 1, model, {}, {"step": 1}, frozen=checkpoint.frozen_base(model))
    other = _lora()
    with torch.no_grad():
        other.base_model.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1  # a frozen weight
    with pytest.raises(CheckpointError, match="frozen base"):
        checkpoint.load(path, other)
    with pytest.raises(CheckpointError, match="frozen base"):
        checkpoint.load(path, tiny_llama(torch.float32))  # nothing frozen: not the model it was saved from


def test_a_checkpoint_missing_an_adapter_does_not_load(tmp_path):
    """Frozen names may be absent from the file; a trainable one may not (re-signed, so only loading sees it)."""
    from safetensors.torch import save_file

    model = _lora()
    checkpoint.save(tmp_path, 1, model, {}, {"step": 1}, frozen=checkpoint.frozen_base(model))
    newest = checkpoint.save(tmp_path, 2, model, {}, {"step": 2}, frozen=checkpoint.frozen_base(model))
    stored = load_file(str(newest / "model.safetensors"))
    stored.pop(sorted(stored)[0])
    save_file(stored, str(newest / "model.safetensors"))
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = checkpoint._sha256(newest / "model.safetensors")
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not match"):
        checkpoint.load(newest, _lora())
    warnings = []
    found, _ = checkpoint.load_latest(tmp_path, lambda p: checkpoint.load(p, _lora()), warn=warnings.append)
    assert found.step == 1 and "checkpoint-2" in warnings[0]


def test_the_background_snapshot_copies_only_what_is_stored(tmp_path):
    model = _lora()
    frozen = checkpoint.frozen_base(model)
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with async_save.AsyncSaver(tmp_path) as saver:
        saver.save(1, model, {}, {"step": 1}, frozen=frozen)
        assert saver.last_snapshot_bytes == trainable_bytes
        saver.save(2, model, {}, {"step": 2})
        assert saver.last_snapshot_bytes > 10 * trainable_bytes  # without `frozen`: the whole model


def test_lora_run_checkpoints_adapters_and_resumes_bit_exact(tmp_path, monkeypatch):
    """`gradaccum train --lora`: checkpoint-N/ holds the adapters; stop at 4, resume to 6 == 6 straight."""
    import gradaccum.train as train_module

    write_pairs(tmp_path / "data.jsonl")
    config = dict(dtype="float32", max_steps=6, micro_batch_size=2, save_every=2, lora=True, lora_r=4)
    straight = final_weights(run(tmp_path, "straight", **config))
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "StopRequest", StopAfter(4))
        first = run(tmp_path, "resumed", **config)
    assert first.interrupted and first.steps == 4
    stored = load_file(str(first.output / "checkpoint-4" / "model.safetensors"))
    assert stored and all("lora_" in name for name in stored), sorted(stored)[:3]
    # The newest checkpoint's adapters are damaged: resume falls back to checkpoint-2 and redoes 3 and 4.
    (first.output / "checkpoint-4" / "model.safetensors").write_bytes(b"\0" * 16)
    second = run(tmp_path, "resumed", resume=True, **config)
    assert not second.interrupted and second.steps == 6
    resumed = final_weights(second)  # final/: the merged full model
    assert sorted(resumed) == sorted(straight) and all(torch.equal(resumed[k], straight[k]) for k in straight)


def _base_dir(directory, seed):
    from transformers import LlamaForCausalLM

    from gradaccum.models import build_tokenizer, tiny_config

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_config(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return str(directory)


def test_resume_against_another_base_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    """The checkpoint no longer carries the base: a --model folder whose weights changed since is refused."""
    import gradaccum.train as train_module

    write_pairs(tmp_path / "data.jsonl")
    model = _base_dir(tmp_path / "base", seed=0)
    config = dict(model=model, dtype="float32", max_steps=4, micro_batch_size=4, save_every=1, lora=True, lora_r=4)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "StopRequest", StopAfter(2))
        first = run(tmp_path, "run", **config)
    before = {p.name: p.stat().st_mtime_ns for p in first.output.iterdir()}
    _base_dir(tmp_path / "base", seed=1)
    with pytest.raises(ConfigError, match=r"--resume: .*frozen base.*--model"):
        run(tmp_path, "run", resume=True, **config)
    assert {p.name: p.stat().st_mtime_ns for p in first.output.iterdir()} == before


def test_a_lora_checkpoint_of_another_rank_is_a_mismatch_not_damage(tmp_path):
    model = _lora()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model, {}, {"step": step}, frozen=checkpoint.frozen_base(model))
    other = _lora(r=8)  # the same base: the fingerprint matches, the adapters' shapes do not
    warnings = []
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"checkpoint-2: .*lora_A.* is \(4, 32\) in the "
                                                                 r"checkpoint and \(8, 32\) in the model"):
        checkpoint.load_latest(tmp_path, lambda p: checkpoint.load(p, other), warn=warnings.append)
    assert not warnings  # not "skipping damaged checkpoint"


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("flag, then", [("lora_r", 8), ("lora_alpha", 16), ("dtype", "bfloat16")])
def test_resume_with_other_lora_settings_or_dtype_is_refused_and_writes_nothing(tmp_path, monkeypatch, flag, then):
    """Another rank (the adapters' shapes), alpha (their scale) or --dtype (bfloat16 keeps float32 master
    weights: the base's fingerprint is the same) is another run, not a damaged checkpoint. Refused by name
    before anything is written, even when run_config.json no longer says what the run was."""
    import gradaccum.train as train_module
    from gradaccum.config import RESUMABLE_CHANGES

    write_pairs(tmp_path / "data.jsonl")
    config = dict(dtype="float32", max_steps=4, micro_batch_size=4, save_every=1, lora=True, lora_r=4, lora_alpha=8)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "StopRequest", StopAfter(2))
        first = run(tmp_path, "run", **config)
    state = json.loads((first.output / "checkpoint-2" / "state.json").read_text())
    assert state["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0,
                             "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]}
    changed = {**config, flag: then}
    assert flag not in RESUMABLE_CHANGES
    with pytest.raises(ConfigError, match=rf"{flag}: {config[flag]!r} there, {then!r} now"):
        run(tmp_path, "run", resume=True, **changed)  # run_config.json tells the runs apart
    (first.output / "run_config.json").unlink()  # now only the checkpoint can
    before = _mtimes(first.output)
    option = "--" + flag.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"--resume: .*checkpoint-2 .*{option} {config[flag]}, .*{then}.*"
                                          rf"resume with {option} {config[flag]}"):
        run(tmp_path, "run", resume=True, **changed)
    assert _mtimes(first.output) == before


def test_lora_on_or_off_and_an_older_checkpoints_settings_are_checked_too(tmp_path):
    """state.json's 'lora' (None: trained without); a checkpoint from before it existed: its run config."""
    from gradaccum.config import TrainConfig
    from gradaccum.saving import resumable_base
    from helpers import tiny_llama

    model, config = _lora(), TrainConfig(lora=True, lora_r=4, lora_alpha=8)
    older = {"step": 3, "config": {**config.to_dict(), "lora_alpha": 16}}
    with pytest.raises(ConfigError, match="checkpoint-3 was trained with --lora-alpha 16, and this run has 8"):
        resumable_base(older, model, tmp_path, config)
    assert resumable_base({"step": 3, "config": config.to_dict()}, model, tmp_path, config) is None
    with pytest.raises(ConfigError, match="trained without --lora; resume it without --lora"):
        resumable_base({"step": 3, "lora": None}, model, tmp_path, config)
    with pytest.raises(ConfigError, match="trained with --lora; resume it with --lora"):
        resumable_base({"step": 3, "lora": {"r": 4}}, tiny_llama(torch.float32), tmp_path, TrainConfig())
