"""gradaccum.tasks: deterministic, correct, varied synthetic tasks and the bundled split."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

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

