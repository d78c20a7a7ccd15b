"""gradaccum.data: JSONL validation, label masks, collation, and the order-invariant data order."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradaccum.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    pack,
    padding_fraction,
    read_jsonl,
    read_records,
    split_window,
    tokenize,
    window_indices,
)

import toy_tokenizers as toy

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "data"

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Two templates that render identically; one marks the assistant text with {% generation %}, so
# transformers' own `return_assistant_tokens_mask` can serve as an independent reference.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '</s>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@functools.lru_cache(maxsize=None)
def make_tokenizer(chat_template: str | None = PLAIN_TEMPLATE, with_bos: bool = True):
    """A small byte-level BPE trained on the bundled tasks, so real merges (multi-byte tokens) occur."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gradaccum import tasks

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [r["prompt"] + r["completion"] for r in tasks.generate(300, seed=5)] + ["reverse the reverse"] * 20
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>" if with_bos else None,
                                   eos_token="</s>", pad_token="<pad>", chat_template=chat_template)


def write(tmp_path: Path, lines: list[str] | bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(lines if isinstance(lines, bytes) else "\n".join(lines).encode())
    return path


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- read_jsonl: formats and errors -------------------------------------------------------------

GOOD = '{"prompt": "a =", "completion": " b"}'


def test_read_jsonl_formats_blank_lines_and_line_numbers(tmp_path):
    path = write(tmp_path, ['{"text": "hello"}', "", GOOD, "   ",
                            '{"messages": [{"role": "user", "content": "hi"}], "id": 3}', ""])
    records = read_jsonl(path)
    assert [line for line, _ in records] == [1, 3, 5]  # blank lines skipped, numbering kept
    assert records[1][1] == {"prompt": "a =", "completion": " b"}


def test_read_jsonl_accepts_byte_order_mark_and_crlf(tmp_path):
    path = write(tmp_path, ("\ufeff" + GOOD + "\r\n" + GOOD + "\r\n").encode())
    assert len(read_jsonl(path)) == 2


def test_the_documented_message_format(tmp_path):
    path = write(tmp_path, [GOOD] * 6 + ['{"prompt": "x", "completion": 5}'])
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert str(error.value) == f"{path}:7: field 'completion': expected a string, got int"


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "x", "completion": null}', "'completion'"),
    ('{"prompt": "x"}', "'completion'"),
    ('{"completion": "x"}', "'prompt'"),
    ('{"prompt": ["x"], "completion": "y"}', "'prompt'"),
    ('{"text": 3.5}', "'text'"),
    ('{"messages": "hi"}', "'messages'"),
    ('{"messages": []}', "'messages'"),
    ('{"messages": ["hi"]}', "'messages[0]'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}', "'messages[1].role'"),
    ('{"messages": [{"role": "user", "content": {"x": 1}}]}', "'messages[0].content'"),
    ('{"input": "x", "output": "y"}', "'instruction'"),
    ('{"input": "x", "answer": "y"}', "'text'"),
    ('{"text": "x", "prompt": "y", "completion": "z"}', "'text'"),
])
def test_bad_field_names_file_line_and_field(tmp_path, line, field):
    path = write(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(DataError, match=r"data\.jsonl:2: ") as error:
        read_jsonl(path)
    assert field in str(error.value)


@pytest.mark.parametrize("content, expected", [
    (b'{"text": "a"}\n{"text": "b"\n', r"data\.jsonl:2: invalid JSON: .*column"),
    (b'{"text": "a"}\n[1, 2]\n', r"data\.jsonl:2: expected a JSON object, got list"),
    (b'"just a string"\n', r"data\.jsonl:1: expected a JSON object, got string"),
    (b'{"text": "a"}\n{"text": "\xff"}\n', r"data\.jsonl:2: not valid UTF-8"),
    (b"[" * 100_000 + b"\n", r"data\.jsonl:1: invalid JSON"),
    (b"", r"data\.jsonl: no records"),
    (b"\n  \n\n", r"data\.jsonl: no records"),
])
def test_file_level_errors(tmp_path, content, expected):
    with pytest.raises(DataError, match=expected):
        read_jsonl(write(tmp_path, content))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl(tmp_path)


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "x \\ud800 y", "completion": "b"}', "'prompt'"),
    ('{"text": "\\udfff"}', "'text'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\ud83d"}]}',
     "'messages[1].content'"),
])
def test_lone_surrogate_names_file_line_and_field(tmp_path, line, field):
    """JSON may spell a lone UTF-16 surrogate, which is no Unicode text: no tokenizer can encode it."""
    path = write(tmp_path, [GOOD, line])
    with pytest.raises(DataError, match=r"data\.jsonl:2: ") as error:
        read_jsonl(path)
    assert field in str(error.value) and "surrogate" in str(error.value)
    assert read_jsonl(write(tmp_path, [GOOD, '{"text": "\\ud83d\\ude00"}']))[1][1]["text"] == "\U0001F600"  # a pair


def test_data_error_is_a_value_error():
    from gradaccum import errors, records

    assert issubclass(DataError, ValueError)
    # One class wherever it is imported from: the CLI's one-line handler catches GradaccumError.
    assert DataError is records.DataError is errors.DataError and issubclass(DataError, errors.GradaccumError)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Objects built from the keys that matter, so the fuzz reaches the field checks and the tokenizer too.
_records = st.dictionaries(
    st.sampled_from(["text", "prompt", "completion", "messages", "role", "content", "extra", "instruction", "input",
                     "output", "conversations"]),
    _json_values | st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                                            st.sampled_from(["user", "assistant", "system", "human", "gpt"])
                                            | _json_values)),
    max_size=4,
).map(json.dumps)
_lines = st.lists(st.binary(max_size=40) | st.text(max_size=40).map(str.encode) | _records.map(str.encode),
                  max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=_lines)
def test_fuzz_read_jsonl_and_tokenize_raise_only_data_error(lines):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            records = read_jsonl(path)
        except DataError as error:
            assert str(error).startswith(str(path))
            return
    examples, stats = tokenize(records, make_tokenizer(), max_length=64, path=path)
    assert stats.num_examples == len(examples) == len(records)
    assert all(len(e.input_ids) == len(e.labels) <= 64 for e in examples)


# ---- tokenize: label masks ----------------------------------------------------------------------


def test_prompt_completion_token_across_the_boundary_is_a_target():
    tokenizer = make_tokenizer()
    # "rev" + "erse" merge into one token when tokenized together. Training uses the whole text's ids
    # (what the model reads at inference); the merged token carries completion characters, so it is a target.
    prompt, completion = "reverse: rev", "erse"
    whole = encode(tokenizer, prompt + completion)
    assert whole != encode(tokenizer, prompt) + encode(tokenizer, completion)
    [example], stats = tokenize([(1, {"prompt": prompt, "completion": completion})], tokenizer, max_length=100,
                                chat_template=False)
    assert stats.pairs_as == "raw"
    assert example.input_ids == [tokenizer.bos_token_id] + whole + [tokenizer.eos_token_id]
    num_prompt = len(encode(tokenizer, "reverse:"))  # the tokens wholly inside the prompt
    assert example.labels == [IGNORE_INDEX] * (1 + num_prompt) + example.input_ids[1 + num_prompt:]
    assert tokenizer.decode(example.input_ids[1 + num_prompt:]) == " reverse</s>"
    assert stats.num_target_tokens == len(example.input_ids) - 1 - num_prompt
    assert (stats.num_truncated, stats.num_empty_targets, stats.num_empty_completions) == (0, 0, 0)


def test_text_loss_on_every_token_but_bos():
    tokenizer = make_tokenizer()
    [example], stats = tokenize([{"text": "copy: abc = abc"}], tokenizer, max_length=100)
    body = encode(tokenizer, "copy: abc = abc") + [tokenizer.eos_token_id]
    assert example.input_ids == [tokenizer.bos_token_id] + body
    assert example.labels == [IGNORE_INDEX] + body
    assert stats.num_target_tokens == len(body) and stats.num_by_format == {"text": 1}


def test_no_bos_when_the_tokenizer_has_none():
    tokenizer = make_tokenizer(with_bos=False)
    [example], _ = tokenize([{"prompt": "a =", "completion": " b"}], tokenizer, max_length=100, chat_template=False)
    assert example.input_ids == encode(tokenizer, "a =") + encode(tokenizer, " b") + [tokenizer.eos_token_id]


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "copy: abc ="},
    {"role": "assistant", "content": "abc"},
    {"role": "user", "content": "reverse: abc ="},
    {"role": "assistant", "content": "cba"},
]


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:3], CONVERSATION[2:],
                                      CONVERSATION[1:4], CONVERSATION[1:2]])
def test_chat_mask_matches_the_generation_tag_reference(messages):
    # Reference: transformers' assistant mask from a template with {% generation %} blocks.
    reference = make_tokenizer(GENERATION_TEMPLATE).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    expected_labels = [i if m else IGNORE_INDEX for i, m in zip(reference["input_ids"], reference["assistant_masks"])]
    for template in (PLAIN_TEMPLATE, GENERATION_TEMPLATE):
        [example], stats = tokenize([(4, {"messages": messages})], make_tokenizer(template), max_length=200)
        assert example.input_ids == list(reference["input_ids"])
        assert example.labels == expected_labels
    num_assistant = sum(m["role"] == "assistant" for m in messages)
    assert sum(label == make_tokenizer().eos_token_id for label in example.labels) == num_assistant


def test_chat_without_template_names_file_and_line():
    records = [(1, {"text": "x"}), (9, {"messages": CONVERSATION})]
    with pytest.raises(DataError, match=r"chat\.jsonl:9: field 'messages': the tokenizer has no chat template"):
        tokenize(records, make_tokenizer(chat_template=None), max_length=50, path="chat.jsonl")


def test_chat_template_errors_are_data_errors():
    failing = make_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'messages': the chat template failed.*alternate"):
        tokenize([(2, {"messages": CONVERSATION})], failing, max_length=50, path="c.jsonl")
    # A template that rewrites earlier turns (only the last one in full) has no stable assistant spans.
    rewriting = make_tokenizer("{% for m in messages %}{% if loop.last %}{{ m['content'] }}"
                               "{% else %}{{ m['content'][:1] }}{% endif %}{% endfor %}")
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'messages\[2\]'"):
        tokenize([(2, {"messages": CONVERSATION})], rewriting, max_length=50, path="c.jsonl")


def test_truncation_keeps_the_left_part_and_is_counted():
    tokenizer = make_tokenizer()
    records = [{"prompt": "count 'a' in: abcabcabcabcabcabc =", "completion": " 6"},
               {"text": "reverse: abcdefghijklmnopqrstuvwxyz = zyxwvutsrqponmlkjihgfedcba"},
               {"prompt": "a =", "completion": " b"}]
    full, full_stats = tokenize(records, tokenizer, max_length=1000)
    cut, stats = tokenize(records, tokenizer, max_length=8)
    assert full_stats.num_truncated == 0 and stats.num_truncated == 2
    assert stats.max_example_tokens == full_stats.max_example_tokens == max(len(e.input_ids) for e in full)
    for short, long in zip(cut, full):
        assert short.input_ids == long.input_ids[:8] and short.labels == long.labels[:8]
    # The long prompt leaves no completion token within 8 tokens: kept, and counted as empty.
    assert stats.num_empty_targets == 1 and len(cut) == 3
    assert stats.num_target_tokens == sum(sum(l != IGNORE_INDEX for l in e.labels[1:]) for e in cut)
    assert stats.num_tokens == sum(len(e.input_ids) for e in cut)


def test_empty_completion_is_kept_and_counted():
    tokenizer = make_tokenizer()
    [example], stats = tokenize([{"prompt": "copy: =", "completion": ""}], tokenizer, max_length=50)
    assert example.labels[-1] == tokenizer.eos_token_id  # it still learns to stop
    assert sum(label != IGNORE_INDEX for label in example.labels) == 1
    assert stats.num_empty_completions == 1 and stats.num_empty_targets == 0


def test_tokenize_rejects_bad_max_length_and_bad_records():
    with pytest.raises(ValueError, match="max_length"):
        tokenize([{"text": "x"}], make_tokenizer(), max_length=0)
    with pytest.raises(DataError, match=r"x\.jsonl:2: field 'text'"):
        tokenize([{"text": "ok"}, {"text": None}], make_tokenizer(), max_length=10, path="x.jsonl")


def test_bundled_format_examples_tokenize():
    tokenizer = make_tokenizer()
    from gradaccum.tasks import default_eval_path, default_train_path

    for path, kind in [(default_train_path(), "prompt_completion"), (default_eval_path(), "prompt_completion"),
                       (EXAMPLES_DIR / "chat.jsonl", "messages"), (EXAMPLES_DIR / "text.jsonl", "text"),
                       (EXAMPLES_DIR / "alpaca.json", "alpaca"), (EXAMPLES_DIR / "sharegpt.jsonl", "sharegpt")]:
        examples, stats = tokenize(read_records(path), tokenizer, max_length=256, path=path)
        assert stats.num_examples == len(examples) > 0 and stats.num_by_format == {kind: len(examples)}
        assert stats.num_empty_targets == 0 and stats.num_truncated == 0


# ---- tokenize: the ids are the ids inference sees (byte-level BPE, SentencePiece-style Metaspace) ----

PROMPT_RECORDS = [("add: 97 + 8 =", " 105"), ("a =", " b"), ("reverse: abc =", " cba"), ("copy: x =", "")]


def targets(example):
    return [label for label in example.labels if label != IGNORE_INDEX]


def target_runs(example) -> list[list[int]]:
    """The label runs between ignored positions: one per completion / assistant turn."""
    runs, current = [], []
    for label in example.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = runs + [current], []
    return runs


@pytest.mark.parametrize("kind", toy.KINDS)
def test_prompt_completion_ids_are_the_whole_text_ids(kind):
    # SentencePiece-style tokenizers put a "▁" at the start of every call: tokenizing the completion on
    # its own gives " b" -> "▁" "▁b", an extra token the model never sees after "a =" at inference.
    tokenizer = toy.toy_tokenizer(kind)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    records = [{"prompt": prompt, "completion": completion} for prompt, completion in PROMPT_RECORDS]
    examples, stats = tokenize(records, tokenizer, max_length=100, chat_template=False)
    for (prompt, completion), example in zip(PROMPT_RECORDS, examples):
        assert example.input_ids == [bos] + encode(tokenizer, prompt + completion) + [eos]
        num_prompt = example.labels.count(IGNORE_INDEX)
        assert example.labels[num_prompt:] == example.input_ids[num_prompt:]  # one run, to the end
        assert toy.surface(tokenizer, targets(example)) == completion + "</s>"
    assert stats.num_empty_completions == 1


@pytest.mark.parametrize("template", sorted(toy.TEMPLATES))
@pytest.mark.parametrize("kind", toy.KINDS)
def test_chat_ids_are_the_template_ids_and_the_mask_is_the_assistant_text(kind, template):
    messages = CONVERSATION[1:] if template == "llama2" else CONVERSATION  # llama2's template has no system
    # The reference: transformers' own tokenization of the rendered chat, with the assistant mask from
    # a template that renders the same text with {% generation %} blocks.
    reference = toy.toy_tokenizer(kind, template, generation=True).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    tokenizer = toy.toy_tokenizer(kind, template)
    [example], _ = tokenize([(1, {"messages": messages})], tokenizer, max_length=500)
    assert example.input_ids == list(reference["input_ids"])
    # transformers' mask ends at the first token holding the reply's last character; where a SentencePiece
    # tokenizer inserts a "▁" before that character, both tokens spell it, and both are the reply's.
    mask = list(reference["assistant_masks"])
    spans = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False,
                      return_offsets_mapping=True)["offset_mapping"]
    for k in range(1, len(mask)):
        mask[k] = mask[k] or (mask[k - 1] and spans[k] == spans[k - 1])
    assert example.labels == [i if m else IGNORE_INDEX for i, m in zip(example.input_ids, mask)]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = target_runs(example)
    assert len(runs) == len(replies)
    if kind == "byte_level" or template == "llama2":  # no "▁" inserted after a special token in the reply
        expected = [(" " + r + "</s>") if template == "llama2" else (r + "<|im_end|>\n") for r in replies]
        assert [toy.surface(tokenizer, run) for run in runs] == expected


CONTROL_TEXT = "say </s> or <|im_start|>user now<|im_end|>"


@pytest.mark.parametrize("kind", toy.KINDS)
def test_control_token_strings_in_text_and_prompts_are_plain_text(kind):
    tokenizer = toy.toy_tokenizer(kind)
    plain = toy.plain_reference(tokenizer)  # matches no special token: all of the text is text
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt, completion = "stop at </s> or <|im_end|> =", " </s> <|im_start|>"
    [text, pair], _ = tokenize([{"text": CONTROL_TEXT}, {"prompt": prompt, "completion": completion}],
                               tokenizer, max_length=200, chat_template=False)
    assert text.input_ids == [bos] + plain.encode(CONTROL_TEXT, add_special_tokens=False).ids + [eos]
    assert pair.input_ids == [bos] + plain.encode(prompt + completion, add_special_tokens=False).ids + [eos]
    assert toy.surface(tokenizer, targets(pair)) == completion + "</s>"
    special_ids = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(toy.SPECIAL_TOKENS))
    for example in (text, pair):
        assert not special_ids & set(example.input_ids[1:-1])


CONTROL_CONVERSATION = [
    {"role": "user", "content": "what does </s> mean?"},
    {"role": "assistant", "content": "it ends a text: </s>"},
    {"role": "user", "content": "and <|im_start|>user or <|im_end|>?"},
    {"role": "assistant", "content": "<|im_start|>user opens a turn, <|im_end|> closes it"},
]


@pytest.mark.parametrize("kind", toy.KINDS)
def test_control_token_strings_in_chat_content_are_plain_text(kind):
    tokenizer = toy.toy_tokenizer(kind, "chatml")
    # Only "</s>" in the messages: the template's <|im_start|>/<|im_end|> are its own control tokens,
    # so the exact reference is the whole rendered text with "</s>" matched as text only.
    messages = CONTROL_CONVERSATION[:2]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    plain_eos = toy.plain_reference(tokenizer, keep=("<|im_start|>", "<|im_end|>"))
    [example], _ = tokenize([(1, {"messages": messages})], tokenizer, max_length=500)
    assert example.input_ids == plain_eos.encode(rendered, add_special_tokens=False).ids
    assert tokenizer.eos_token_id not in example.input_ids

    # The template's own control tokens in the messages too: still one <|im_start|> and one <|im_end|>
    # per message, nothing special inside the content, and the text spelled out in full.
    [example], _ = tokenize([(1, {"messages": CONTROL_CONVERSATION})], tokenizer, max_length=500)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert example.input_ids.count(start) == example.input_ids.count(end) == len(CONTROL_CONVERSATION)
    assert tokenizer.eos_token_id not in example.input_ids
    runs = target_runs(example)
    assert [run.count(end) for run in runs] == [1, 1]  # each reply's own end-of-turn marker, nothing more
    if kind == "byte_level":
        rendered = tokenizer.apply_chat_template(CONTROL_CONVERSATION, tokenize=False)
        assert tokenizer.decode(example.input_ids) == rendered
        assert [tokenizer.decode(run) for run in runs] == [m["content"] + "<|im_end|>\n"
                                                            for m in CONTROL_CONVERSATION[1::2]]


def test_control_token_strings_in_llama2_replies_are_plain_text():
    tokenizer = toy.toy_tokenizer("legacy", "llama2")
    messages = [{"role": "user", "content": "<s>[INST] hi [/INST]"}, {"role": "assistant", "content": "bye </s>"}]
    [example], _ = tokenize([(1, {"messages": messages})], tokenizer, max_length=500)
    assert example.input_ids.count(tokenizer.bos_token_id) == 1 and example.input_ids[0] == tokenizer.bos_token_id
    assert example.input_ids.count(tokenizer.eos_token_id) == 1 and example.input_ids[-1] == tokenizer.eos_token_id
    [run] = target_runs(example)
    assert toy.surface(tokenizer, run) == " bye </s></s>"


def test_tiny_tokenizer_ids_are_the_utf8_bytes():
    from gradaccum.models import BOS_ID, EOS_ID, build_tokenizer

    tokenizer = build_tokenizer()
    records = [{"prompt": "copy: é =", "completion": " é"}, {"text": "a </s> <|eos|> b"}]
    [pair, text], _ = tokenize(records, tokenizer, max_length=100, chat_template=False)
    assert pair.input_ids == [BOS_ID, *"copy: é = é".encode(), EOS_ID]
    assert pair.labels == [IGNORE_INDEX] * (1 + len("copy: é =".encode())) + [*" é".encode(), EOS_ID]
    assert text.input_ids == [BOS_ID, *"a </s> <|eos|> b".encode(), EOS_ID]


def test_a_template_that_rewrites_control_strings_in_messages_is_refused():
    tokenizer = toy.toy_tokenizer("byte_level", None)
    tokenizer = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                chat_template="{% for m in messages %}{{ m['content'][:6] + '</s>' }}{% endfor %}")
    messages = [{"role": "user", "content": "ab</s>cd"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(DataError, match=r"r\.jsonl:5: field 'messages': the chat template rewrites message text"):
        tokenize([(5, {"messages": messages})], tokenizer, max_length=100, path="r.jsonl")
    messages[0]["content"] = "abc"  # no control token's text: fine
    [example], _ = tokenize([(5, {"messages": messages})], tokenizer, max_length=100)
    assert tokenizer.decode(targets(example)) == "ok</s>"


def test_private_use_characters_with_control_strings_are_refused():
    tokenizer = toy.toy_tokenizer("byte_level", "chatml")
    messages = [{"role": "user", "content": "</s> \U000F0000"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(DataError, match=r"p\.jsonl:3: field 'messages'.*private-use"):
        tokenize([(3, {"messages": messages})], tokenizer, max_length=100, path="p.jsonl")


# ---- collate and padding ------------------------------------------------------------------------


def test_collate_right_pads_and_masks_padding():
    examples = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8])]
    batch = collate(examples, pad_token_id=0)
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert padding_fraction([batch]) == pytest.approx(2 / 6)
    assert padding_fraction([]) == 0.0
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)


def test_pack_concatenates_restarts_positions_and_keeps_the_target_count():
    from gradaccum.losses import count_targets

    examples = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8, 9], [8, 9]), Example([4], [4])]
    batch = pack(examples)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    # Each example's first token is never a target (the causal shift), padded or packed.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert count_targets(batch["labels"]) == count_targets(collate(examples, 0)["labels"]) == 3
    assert padding_fraction([batch]) == 0.0
    with pytest.raises(ValueError):
        pack([])


# ---- the data order -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(num_examples=st.integers(0, 80), batch_size=st.integers(1, 20), seed=st.integers(0, 2**32),
       epoch=st.integers(0, 5))
def test_windows_are_a_seeded_permutation_cut_into_batch_size(num_examples, batch_size, seed, epoch):
    windows = window_indices(num_examples, batch_size, seed, epoch)
    assert sorted(i for w in windows for i in w) == list(range(num_examples))
    assert all(len(w) == batch_size for w in windows[:-1]) and all(0 < len(w) <= batch_size for w in windows)
    assert windows == window_indices(num_examples, batch_size, seed, epoch)


def test_epochs_and_seeds_give_different_orders():
    orders = {tuple(sum(window_indices(50, 8, seed, epoch), [])) for seed in range(3) for epoch in range(3)}
    assert len(orders) == 9  # in particular (seed 0, epoch 1) != (seed 1, epoch 0)
    with pytest.raises(ValueError):
        window_indices(10, 0, 0, 0)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), num_examples=st.integers(0, 60), batch_size=st.integers(1, 24),
       micro_batch_size=st.integers(1, 9), world_size=st.integers(1, 5), sort=st.booleans())
def test_every_split_covers_each_window_exactly_once(data, num_examples, batch_size, micro_batch_size,
                                                     world_size, sort):
    lengths = data.draw(st.lists(st.integers(1, 50), min_size=num_examples, max_size=num_examples)) if sort else None
    for window in window_indices(num_examples, batch_size, seed=3, epoch=1):
        dealt = []
        for rank in range(world_size):
            micro_batches = split_window(window, micro_batch_size, rank, world_size, lengths)
            assert all(0 < len(mb) <= micro_batch_size for mb in micro_batches)  # [] for none, never [[]]
            if lengths is not None:
                share = [lengths[i] for mb in micro_batches for i in mb]
                assert share == sorted(share)  # micro-batches group similar lengths
            dealt += [i for mb in micro_batches for i in mb]
        assert sorted(dealt) == sorted(window)  # every example on exactly one rank, once


@pytest.mark.parametrize("sort", [False, True])
def test_how_the_batch_is_split_never_changes_the_windows(sort):
    """B = 12 as micro x accumulation x world in every factorization: the same examples per step."""
    num_examples, batch_size = 53, 12  # 5 windows, the last partial (5 examples)
    lengths = [(7 * i) % 31 + 1 for i in range(num_examples)] if sort else None

    def steps(micro_batch_size, world_size):
        per_step = []
        for window in window_indices(num_examples, batch_size, seed=0, epoch=2):
            ranks = [split_window(window, micro_batch_size, rank, world_size, lengths) for rank in range(world_size)]
            accumulation_steps = batch_size // (micro_batch_size * world_size)
            if len(window) == batch_size:  # a full window: every rank runs K full micro-batches
                assert all(len(r) == accumulation_steps and all(len(mb) == micro_batch_size for mb in r)
                           for r in ranks)
            assert all(len(r) <= accumulation_steps for r in ranks)
            per_step.append(sorted(i for r in ranks for mb in r for i in mb))
        return per_step

    reference = steps(12, 1)
    for micro_batch_size, world_size in [(1, 1), (2, 1), (4, 1), (6, 2), (3, 2), (1, 4), (3, 4), (1, 12)]:
        assert steps(micro_batch_size, world_size) == reference


def test_partial_window_leaves_some_ranks_empty():
    assert [split_window([4, 9], 2, rank, 4) for rank in range(4)] == [[[4]], [[9]], [], []]
    with pytest.raises(ValueError):
        split_window([1, 2], 2, rank=2, world_size=2)
    with pytest.raises(ValueError):
        split_window([1, 2], 0)


def test_sorting_by_length_reduces_padding():
    lengths = [1, 30, 2, 29, 3, 28, 4, 27]
    examples = [Example([1] * n, [1] * n) for n in lengths]

    def padding(sort):
        batches = split_window(list(range(8)), 2, lengths=lengths if sort else None)
        return padding_fraction([collate([examples[i] for i in mb], pad_token_id=0) for mb in batches])

    assert padding(sort=True) < 0.1 < 0.4 < padding(sort=False)


def test_stats_say_whether_training_fed_text_with_bos_chat_or_both():
    """DataStats.encoded_as decides whether final/'s tokenizer puts BOS first (models.save_final)."""
    from gradaccum.models import build_tokenizer

    tokenizer = build_tokenizer()  # has a chat template
    pair, text = {"prompt": "a =", "completion": " b"}, {"text": "plain"}
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}

    def encoded_as(records, chat_template=True):
        return tokenize(records, tokenizer, max_length=64, chat_template=chat_template)[1].encoded_as

    assert encoded_as([pair, chat]) == "chat"
    assert encoded_as([pair], chat_template=False) == encoded_as([text]) == "text"  # raw pairs start with BOS
    assert encoded_as([pair, text]) == encoded_as([chat, pair, text], chat_template=False) == "mixed"
    assert encoded_as([]) == "text"
