"""The training loop end to end on the tiny preset: outputs, split invariance, resume."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from gradaccum.config import TrainConfig
from gradaccum.errors import ConfigError
from gradaccum.train import train


def write_pairs(path, n=24, seed=0):
    """Prompt/completion pairs whose completions range from 1 to ~30 characters."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 30)))
            f.write(json.dumps({"prompt": f"copy {'x' * rng.randint(0, 20)} {word} =", "completion": f" {word}"})
                    + "\n")
    return path


def run(tmp_path, name, **overrides):
    kwargs = dict(data=str(tmp_path / "data.jsonl"), max_steps=3, batch_size=8, micro_batch_size=8,
                  dtype="float64", lr=1e-2, output=str(tmp_path / name), progress=False, save_every=0,
                  eval_every=0)
    kwargs.update(overrides)
    if "accumulation_steps" in overrides:
        kwargs.pop("batch_size")
    return train(TrainConfig(**kwargs))


def final_weights(result):
    return load_file(str(result.output / "final" / "model.safetensors"))


def max_relative_difference(a, b):
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)) for k in b)


def test_default_outputs(tmp_path):
    write_pairs(tmp_path / "data.jsonl")
    result = run(tmp_path, "run", dtype="float32", eval_data=str(tmp_path / "data.jsonl"), eval_every=3,
                 save_every=2, max_steps=4)
    out = result.output
    assert (out / "loss.png").stat().st_size > 5000
    assert (out / "checkpoint-2" / "manifest.json").exists()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for key in ("step", "loss", "num_targets", "grad_norm", "lr", "targets_per_second", "peak_memory_bytes"):
        assert lines[0][key] is not None, key
    assert lines[2]["eval_loss"] > 0 and 0 <= lines[2]["eval_accuracy"] <= 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model(**tokenizer("copy ab =", return_tensors="pt")).logits.shape[-1] >= len(tokenizer) - 8


@pytest.mark.parametrize("accumulation", ["exact", "naive"])
def test_every_split_of_the_batch_trains_the_same_weights(tmp_path, accumulation):
    """8x1, 2x4 and 1x8 see the same windows; exact ends with the same weights, naive does not."""
    write_pairs(tmp_path / "data.jsonl")
    full = final_weights(run(tmp_path, "8x1"))
    errors = {}
    for micro, k in [(2, 4), (1, 8)]:
        weights = final_weights(run(tmp_path, f"{micro}x{k}-{accumulation}", micro_batch_size=micro,
                                    accumulation_steps=k, accumulation=accumulation))
        errors[micro] = max_relative_difference(weights, full)
    if accumulation == "exact":
        assert max(errors.values()) <= 1e-9, errors
    else:
        assert min(errors.values()) > 1e-4, errors


def test_packing_trains_the_same_weights_as_padding(tmp_path):
    """--packing: each micro-batch one padding-free row; the same windows, the same exact weights."""
    write_pairs(tmp_path / "data.jsonl")
    padded = final_weights(run(tmp_path, "padded", micro_batch_size=4, accumulation_steps=2))
    result = run(tmp_path, "packed", micro_batch_size=4, accumulation_steps=2, packing=True)
    assert max_relative_difference(final_weights(result), padded) <= 1e-9
    assert all(m["padding_fraction"] == 0.0 for m in result.metrics)
    naive = final_weights(run(tmp_path, "packed-naive", micro_batch_size=4, accumulation_steps=2, packing=True,
                              accumulation="naive"))
    assert max_relative_difference(naive, padded) > 1e-4  # the comparison can fail
    with pytest.raises(ValueError, match="--packing needs --normalize tokens"):
        TrainConfig(packing=True, normalize="samples")


def _save_tiny(model_class, config, directory):
    """A random-init model of `model_class` with the byte tokenizer, as a local --model DIR."""
    from gradaccum.models import build_tokenizer

    torch.manual_seed(0)
    model_class(config).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return str(directory)


def test_packing_refuses_a_model_whose_packed_documents_mix(tmp_path):
    """OPT runs sdpa attention (the name-based filter lets it through) but builds its mask without
    position_ids: a packed document attends to the one before it. The probe at set-up sees that and
    refuses before anything is written; the same model trains padded."""
    from transformers import OPTConfig, OPTForCausalLM

    from gradaccum.models import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

    write_pairs(tmp_path / "data.jsonl")
    config = OPTConfig(vocab_size=len(build_tokenizer()), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = _save_tiny(OPTForCausalLM, config, tmp_path / "opt")
    with pytest.raises(ConfigError, match=r"--packing: OPTForCausalLM .*attend to the one before.*without --packing"):
        run(tmp_path, "packed", model=model, packing=True, dtype="float32")
    assert not (tmp_path / "packed").exists()
    assert run(tmp_path, "padded", model=model, dtype="float32", max_steps=1).metrics


class StopAfter:
    """Stands in for SIGINT arriving during step `n`: the loop sees the flag after that step."""

    def __init__(self, n):
        self.n, self.checks = n, 0

    def __call__(self):
        outer = self

        class Stop:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            @property
            def signal(self):
                outer.checks += 1
                return 2 if outer.checks == outer.n else None

        return Stop()


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    import gradaccum.train as train_module

    write_pairs(tmp_path / "data.jsonl")
    config = dict(dtype="float32", max_steps=6, micro_batch_size=2, save_every=3)
    straight = final_weights(run(tmp_path, "straight", **config))
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "StopRequest", StopAfter(4))
        first = run(tmp_path, "resumed", **config)
    assert first.interrupted and first.steps == 4
    assert (first.output / "checkpoint-4").is_dir() and not (first.output / "final").exists()
    second = run(tmp_path, "resumed", resume=True, **config)
    assert not second.interrupted and second.steps == 6
    lines = [json.loads(line) for line in (second.output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    resumed = final_weights(second)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_final_state_in_memory_without_writing_final(tmp_path):
    """The audit's way: --no-save-final writes no model, and keep_final_state returns the weights
    that final/ would hold (tied embeddings once, as in model.safetensors)."""
    write_pairs(tmp_path / "data.jsonl")
    saved = final_weights(run(tmp_path, "saved"))
    kwargs = dict(data=str(tmp_path / "data.jsonl"), max_steps=3, batch_size=8, micro_batch_size=8, dtype="float64",
                  lr=1e-2, output=str(tmp_path / "kept"), progress=False, save_every=0, eval_every=0,
                  save_final=False)
    result = train(TrainConfig(**kwargs), keep_final_state=True)
    assert not (result.output / "final").exists() and (result.output / "metrics.jsonl").exists()
    assert sorted(result.final_state) == sorted(saved)
    assert all(torch.equal(result.final_state[k], saved[k]) for k in saved)
    assert train(TrainConfig(**{**kwargs, "output": str(tmp_path / "plain")})).final_state is None


def _model_dir_with(tokenizer, directory):
    """A tiny random-init Llama sized for `tokenizer`, saved with it as a local --model DIR."""
    from transformers import LlamaForCausalLM

    from gradaccum.models import tiny_config

    torch.manual_seed(0)
    config = tiny_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("kind", ["tiny", "byte_level", "metaspace_first", "legacy"])
def test_the_saved_tokenizer_adds_bos_as_training_did(tmp_path, kind):
    """Training puts BOS before every text; none of these tokenizers adds it by itself. final/'s tokenizer
    must, so that `tokenizer(text)` gives the ids the model was trained on (less the closing EOS)."""
    from transformers import AutoTokenizer

    from gradaccum.data import tokenize
    from gradaccum.models import load_model

    texts = ["the quick brown fox = jumps", "reverse: abc = cba", " add: 97 + 8 = 105"]
    with open(tmp_path / "data.jsonl", "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    if kind == "tiny":
        model = "tiny"
    else:
        import toy_tokenizers

        model = _model_dir_with(toy_tokenizers.toy_tokenizer(kind, template=None), tmp_path / "model")
    result = run(tmp_path, "run", model=model, dtype="float32", max_steps=1, batch_size=2, micro_batch_size=2)
    trained_with = load_model(model)[1]
    assert trained_with(texts[0]).input_ids[:1] != [trained_with.bos_token_id]  # BOS is ours to add
    reloaded = AutoTokenizer.from_pretrained(result.output / "final")
    examples, _ = tokenize([{"text": text} for text in texts], trained_with, max_length=512)
    for text, example in zip(texts, examples):
        assert example.input_ids[0] == trained_with.bos_token_id and example.input_ids[-1] == trained_with.eos_token_id
        assert reloaded(text).input_ids == example.input_ids[:-1], text
    # A chat template's ids are unchanged: apply_chat_template does not add special tokens.
    if kind == "tiny":
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
        assert reloaded.apply_chat_template(messages) == trained_with.apply_chat_template(messages)


@pytest.mark.parametrize("mix_text", [False, True])
def test_the_saved_tokenizer_encodes_chat_text_as_training_did(tmp_path, capsys, mix_text):
    """The default run trains prompt/completion pairs through the chat template, which data.tokenize encodes
    without special tokens and the tiny template writes no BOS into: final/'s `tokenizer(rendered chat)` must
    give exactly the training ids, with no BOS in front. A run that also trains text records trained those
    with BOS first: then `tokenizer(text)` puts BOS first, and the log line says which each kind got."""
    from transformers import AutoTokenizer

    from gradaccum.data import tokenize
    from gradaccum.models import load_model

    write_pairs(tmp_path / "data.jsonl", n=8)
    if mix_text:
        with open(tmp_path / "data.jsonl", "a") as f:
            f.write(json.dumps({"text": "the quick brown fox"}) + "\n")
    result = run(tmp_path, "run", dtype="float32", max_steps=1, batch_size=2, micro_batch_size=2)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("final model:")]
    trained_with = load_model("tiny")[1]
    reloaded = AutoTokenizer.from_pretrained(result.output / "final")
    record = {"prompt": "copy abc =", "completion": " abc"}
    (example,), stats = tokenize([record], trained_with, max_length=512)
    assert stats.pairs_as == "chat" and example.input_ids[0] != trained_with.bos_token_id
    messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    rendered = reloaded.apply_chat_template(messages, tokenize=False)
    assert reloaded.apply_chat_template(messages)["input_ids"] == example.input_ids  # what training fed, always
    bos = trained_with.bos_token_id
    if mix_text:
        assert reloaded("the quick brown fox").input_ids[0] == bos
        assert reloaded(rendered).input_ids == [bos, *example.input_ids]
        assert "puts <|bos|> first, as training did for text" in said[0] and "apply_chat_template" in said[0], said
    else:
        assert reloaded(rendered).input_ids == example.input_ids
        assert reloaded("the quick brown fox").input_ids[0] != bos
        assert "adds no <|bos|>" in said[0] and "NOTE" not in said[0], said
