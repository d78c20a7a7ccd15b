"""gradaccum.tasks: deterministic, correct, varied synthetic tasks, the bundled split, the end-of-run proof on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from gradaccum import tasks

ROOT = Path(__file__).resolve().parent.parent


def solve(prompt: str) -> str:
    """An independent solver: parse the prompt back and compute the answer."""
    body = prompt.removesuffix(" =")
    if m := re.fullmatch(r"copy: ([a-z]{1,6})", body):
        return m[1]
    if m := re.fullmatch(r"uppercase: ([a-z]{1,6})", body):
        return m[1].upper()
    if m := re.fullmatch(r"reverse: ([a-z]{2,5})", body):
        return m[1][::-1]
    if m := re.fullmatch(r"sort: ([a-z]{2,4})", body):
        return "".join(sorted(m[1]))
    if m := re.fullmatch(r"repeat ([a-z]{2,4}) ([1-4]) times", body):
        return " ".join([m[1]] * int(m[2]))
    raise AssertionError(f"unknown prompt {prompt!r}")


@pytest.fixture(scope="module")
def records():
    return tasks.generate(1000, seed=11)


def test_generate_is_deterministic_and_seeded(records):
    assert tasks.generate(1000, seed=11) == records
    assert tasks.generate(50, seed=12) != records[:50]
    assert tasks.generate(0, seed=0) == []
    with pytest.raises(ValueError):
        tasks.generate(-1, seed=0)


def test_records_are_well_formed_ascii_and_distinct(records):
    assert len(records) == 1000 and len({r["prompt"] for r in records}) == 1000
    for record in records:
        assert set(record) == {"prompt", "completion", "task"} and record["task"] in tasks.TASKS
        assert record["prompt"].endswith(" =") and record["completion"].startswith(" ")
        assert (record["prompt"] + record["completion"]).isascii() and "\n" not in record["completion"]
    assert {r["task"] for r in records} == set(tasks.TASKS)


def test_answers_are_correct(records):
    for record in records:
        assert record["completion"] == " " + solve(record["prompt"]), record


def test_answer_lengths_vary_widely(records):
    """The point of the bundled data for accumulation: very different numbers of target tokens per example."""
    answer_chars = [len(r["completion"].strip()) for r in records]
    assert min(answer_chars) == 1 and max(answer_chars) == 19
    assert min(len(r["prompt"]) for r in records) == 9 and max(len(r["prompt"]) for r in records) == 21


@pytest.mark.parametrize("prediction, completion, expected", [
    (" abc", " abc", True),
    ("abc  ", " abc", True),
    (" abc\ncopy: x = x", " abc", True),  # generation ran on past the answer
    ("\n abc", " abc", True),
    (" abcd", " abc", False),
    (" ab", " abc", False),
    ("", " abc", False),
    (" ABC", " abc", False),
    (" 3", " 3", True),
])
def test_exact_match(prediction, completion, expected):
    assert tasks.exact_match(prediction, completion) is expected


def test_split_is_disjoint_and_sized():
    train, held_out = tasks.train_eval_split(300, 100)
    assert len(train) == 300 and len(held_out) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bundled_files_are_what_make_data_writes():
    """The packaged defaults must not drift from tasks.py: rerun examples/make_data.py."""
    train, held_out = tasks.train_eval_split()
    assert len(train) == tasks.DEFAULT_TRAIN_SIZE and len(held_out) == tasks.DEFAULT_EVAL_SIZE
    assert read_records(tasks.default_train_path()) == train
    assert read_records(tasks.default_eval_path()) == held_out
    assert {r["task"] for r in held_out} == set(tasks.TASKS)
    total_bytes = sum(p.stat().st_size for p in (ROOT / "examples" / "data").glob("*.jsonl"))
    assert total_bytes < 1_000_000


# ---- the proof line the default run ends with, on the bundled data -----------------------------


@pytest.fixture(scope="module")
def tiny_and_examples():
    from gradaccum.data import read_jsonl, tokenize
    from gradaccum.models import load_model

    model, tokenizer = load_model("tiny", seed=0)
    records = read_jsonl(tasks.default_train_path())[:512]  # the first window only needs 32 of them
    examples, _ = tokenize(records, tokenizer, max_length=256)
    return model, tokenizer, examples


def test_proof_on_the_first_window_exact_is_rounding_and_naive_is_far(tiny_and_examples):
    """Both directions: exact accumulation is the full batch to float64 rounding, naive is visibly not."""
    from gradaccum.proof import first_window_errors

    model, tokenizer, examples = tiny_and_examples
    window = examples[:32]
    # Cut as the loop cuts a window: sorted by length, so the micro-batches' target counts differ.
    window = sorted(window, key=lambda example: len(example.input_ids))
    micro_batches = [window[start:start + 8] for start in range(0, 32, 8)]
    before = [p.detach().clone() for p in model.parameters()]
    exact, naive = first_window_errors(model, micro_batches, tokenizer.pad_token_id)
    assert exact < 1e-12
    assert naive > 0.05
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the run's model is untouched
    # The control: with the same number of target tokens in every example, naive is right too, so
    # the gap above comes from the counting alone.
    same_count = [e for e in examples if sum(label != -100 for label in e.labels) == 5][:32]
    assert len(same_count) == 32
    _, naive_equal = first_window_errors(model, [same_count[i:i + 8] for i in range(0, 32, 8)],
                                         tokenizer.pad_token_id)
    assert naive_equal < 1e-12


def test_proof_line_names_both_errors(tiny_and_examples):
    from gradaccum.proof import first_window_line

    model, tokenizer, examples = tiny_and_examples
    line = first_window_line(model, examples, batch_size=32, micro_batch_size=8, seed=0,
                             pad_token_id=tokenizer.pad_token_id)
    match = re.fullmatch(r"proof: first window's gradient vs the full batch of 32 sequences \(([\d+]+) target "
                         r"tokens per micro-batch\): exact (\S+), naive (\d+)% \(relative L2\)", line)
    assert match, line
    assert len(match[1].split("+")) == 4 and float(match[2]) < 1e-12 and int(match[3]) >= 5
    assert first_window_line(model, examples, batch_size=8, micro_batch_size=8, seed=0,
                             pad_token_id=tokenizer.pad_token_id) is None  # one micro-batch: nothing to prove


def test_sample_lines_mark_right_and_wrong(tiny_and_examples, monkeypatch):
    from gradaccum import evaluate

    model, tokenizer, _ = tiny_and_examples
    records = read_records(tasks.default_eval_path())
    # A model that answers every prompt with its solver's answer, except sort prompts.
    monkeypatch.setattr(evaluate, "_predict", lambda m, t, pairs, *a, **k: [
        " zzz" if r["prompt"].startswith("sort") else " " + solve(r["prompt"]) + "\ncopy:" for r, _, _ in pairs])
    monkeypatch.setattr(evaluate, "_marks", lambda: ("ok", "x "))
    lines = evaluate.sample_lines(model, tokenizer, records, torch.device("cpu"))
    assert len(lines) == 6
    assert {line.split()[1].rstrip(":") for line in lines} == set(tasks.TASKS)  # one of each first
    for line in lines:
        if line.startswith("  x "):
            assert "sort:" in line and line.endswith(")") and "-> zzz   (expected" in line
        else:
            assert line.startswith("  ok ") and " -> " in line and "copy:" not in line.split(" -> ")[1]
