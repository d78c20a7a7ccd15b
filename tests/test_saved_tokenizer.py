"""final/'s tokenizer (models.save_final, saved_tokenizer.py): it encodes as training did, and a tokenizer that
does not load back is a NOTE in the log, not a crash after final/ is written."""

from __future__ import annotations

import pytest

from gradaccum.models import save_final
from test_models import small_llama


def _recording_from_pretrained(monkeypatch, fail: bool = False):
    """AutoTokenizer.from_pretrained, recording its keyword arguments (and raising when `fail`)."""
    from transformers import AutoTokenizer

    original, calls = AutoTokenizer.from_pretrained, []

    def from_pretrained(source, *args, **kwargs):
        calls.append(kwargs)
        if fail:
            raise OSError("tokenizer.json: unreadable for this test")
        return original(source, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    return calls


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_the_saved_tokenizer_is_loaded_back_with_the_runs_trust_remote_code(tmp_path, monkeypatch,
                                                                              trust_remote_code):
    model, tokenizer = small_llama()
    calls = _recording_from_pretrained(monkeypatch)
    said = save_final(model, tokenizer, tmp_path / "final", trust_remote_code=trust_remote_code)
    assert said.endswith("puts <|bos|> first, as training did")
    assert calls and all(call.get("trust_remote_code") is trust_remote_code for call in calls), calls


def test_a_saved_tokenizer_that_does_not_load_back_is_a_note(tmp_path, monkeypatch):
    model, tokenizer = small_llama()
    _recording_from_pretrained(monkeypatch, fail=True)
    said = save_final(model, tokenizer, tmp_path / "final")
    assert said.startswith("full model; NOTE: its tokenizer did not load back with AutoTokenizer (OSError: "
                           "tokenizer.json: unreadable"), said
    assert (tmp_path / "final" / "model.safetensors").is_file() and (tmp_path / "final" / "tokenizer.json").is_file()


def test_a_run_whose_saved_tokenizer_does_not_load_back_still_finishes(tmp_path, monkeypatch, capsys):
    """final/ is written, then the check fails: the log says so, and loss.png and the summary still come."""
    from test_train import run, write_pairs

    write_pairs(tmp_path / "data.jsonl", n=8)
    with open(tmp_path / "data.jsonl", "a") as f:
        f.write('{"text": "plain text trains with BOS first"}\n')  # so the BOS is proven on the files
    _recording_from_pretrained(monkeypatch, fail=True)
    result = run(tmp_path, "run", dtype="float32", max_steps=1, batch_size=2, micro_batch_size=2)
    out = capsys.readouterr().out
    assert "; NOTE: its tokenizer did not load back with AutoTokenizer (OSError" in out
    assert (result.output / "final" / "model.safetensors").is_file() and (result.output / "loss.png").is_file()
    assert "done: 1 steps" in out


@pytest.mark.parametrize("encoded_as, expected", [
    ("text", ""),  # a tokenizer that puts BOS first itself, as text training did: nothing to say
    ("mixed", "; chat text: apply_chat_template(tokenize=True) adds no <|bos|>, as training did"),
    ("chat", "; NOTE: its tokenizer(text) puts <|bos|> first, and training's chat-template ids got none added"),
])
def test_a_tokenizer_that_adds_bos_itself_is_kept_and_a_chat_run_is_warned(tmp_path, encoded_as, expected):
    from transformers import AutoTokenizer

    from gradaccum.models import tokenizer_as_trained

    model, plain = small_llama()
    adding = tokenizer_as_trained(plain)  # puts BOS first by itself, as Llama-2's does
    said = save_final(model, adding, tmp_path / encoded_as, encoded_as=encoded_as)
    assert said.startswith("full model" + expected), said
    assert AutoTokenizer.from_pretrained(tmp_path / encoded_as)("ok").input_ids == [plain.bos_token_id,
                                                                                   *plain("ok").input_ids]
    with pytest.raises(ValueError, match="encoded_as"):
        save_final(model, plain, tmp_path / "bad", encoded_as="raw")
