"""Synthetic prompt/completion tasks with checkable answers: the bundled default data.

Every prompt ends with the separator `" ="` and every completion starts with a space, so the
completion is a plain continuation of the prompt. Five character-level tasks on short random
words (copy, uppercase, reverse, sort, repeat) suit the byte-level `tiny` preset: a 0.33M-parameter
model learns them from scratch in 1200 steps (about 1.5 minutes on two CPU cores) to 87.5%
held-out exact match (the default run). All of them make the model find and copy characters of
the prompt, so one that gets them right visibly reads its input. Answers range from 1 to 19
characters (3 to 21 target tokens with the leading space and EOS), so micro-batches hold very
different numbers of target tokens, which is the case where naive gradient accumulation is wrong.

    records = generate(100, seed=0)    # [{"prompt": "copy: kiw =", "completion": " kiw", "task": "copy"}, ...]
    exact_match(" kiw\\ncopy: ...", " kiw")   # True: only the first line of a prediction counts

Plain ASCII and the standard library only, so the data is identical on every platform.
"""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Callable

__all__ = [
    "TASKS",
    "DEFAULT_TRAIN_SIZE",
    "DEFAULT_EVAL_SIZE",
    "TRAIN_SEED",
    "EVAL_SEED",
    "generate",
    "train_eval_split",
    "exact_match",
    "default_train_path",
    "default_eval_path",
]

# 20000 examples: the default run's 1200 steps of 32 see each about twice. From 2000 the model
# learns the training set by heart instead (train loss 0.05, held-out exact match 27%).
DEFAULT_TRAIN_SIZE = 20000
DEFAULT_EVAL_SIZE = 200
# The seeds of the bundled files (examples/make_data.py); the eval split is drawn from its own seed.
TRAIN_SEED = 0
EVAL_SEED = 1

_ASSETS = Path(__file__).resolve().parent / "assets"


def _word(rng: random.Random, min_chars: int, max_chars: int) -> str:
    # Random letters rather than a word list: the space of prompts stays large, so the eval split
    # can be disjoint from the training split and answers cannot be recalled, only computed.
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_chars, max_chars)))


def _copy(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 1, 6)
    return f"copy: {word} =", f" {word}"


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 1, 6)
    return f"uppercase: {word} =", f" {word.upper()}"


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 2, 5)
    return f"reverse: {word} =", f" {word[::-1]}"


def _sort(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 2, 4)
    return f"sort: {word} =", f" {''.join(sorted(word))}"


def _repeat(rng: random.Random) -> tuple[str, str]:
    # The long answers (up to 19 characters) next to one-letter copies: the spread of target counts.
    word, times = _word(rng, 2, 4), rng.randint(1, 4)
    return f"repeat {word} {times} times =", " " + " ".join([word] * times)


# Name -> generator. The order is part of the data: changing it changes every bundled file.
TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _copy,
    "uppercase": _uppercase,
    "reverse": _reverse,
    "sort": _sort,
    "repeat": _repeat,
}


def generate(num_examples: int, seed: int, exclude_prompts: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """`num_examples` records `{"prompt", "completion", "task"}` with distinct prompts, a function of `seed` only.

    Tasks are drawn uniformly. Prompts in `exclude_prompts` are skipped (used to hold out an eval split).
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    rng = random.Random(seed)
    names = list(TASKS)
    records: list[dict] = []
    seen = set(exclude_prompts)
    while len(records) < num_examples:
        name = rng.choice(names)
        prompt, completion = TASKS[name](rng)
        if prompt in seen:  # a repeat would weigh one example twice, or leak into the eval split
            continue
        seen.add(prompt)
        records.append({"prompt": prompt, "completion": completion, "task": name})
    return records


def train_eval_split(train_size: int = DEFAULT_TRAIN_SIZE, eval_size: int = DEFAULT_EVAL_SIZE,
                     train_seed: int = TRAIN_SEED, eval_seed: int = EVAL_SEED) -> tuple[list[dict], list[dict]]:
    """The bundled split: a training set and an eval set whose prompts never occur in training."""
    train = generate(train_size, train_seed)
    held_out = generate(eval_size, eval_seed, exclude_prompts={record["prompt"] for record in train})
    return train, held_out


def exact_match(prediction: str, completion: str) -> bool:
    """Whether a generated `prediction` answers like `completion`.

    Completions are one line. Generation may run on past the answer (a newline, another prompt),
    so only the first non-blank line of the prediction counts, and surrounding whitespace is ignored
    (completions start with a space). Cut the prediction at EOS before calling this.
    """
    return _first_line(prediction) == _first_line(completion)


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def default_train_path() -> Path:
    """The bundled training set (`DEFAULT_TRAIN_SIZE` records), shipped inside the package."""
    return _ASSETS / "train.jsonl"


def default_eval_path() -> Path:
    """The bundled held-out set (`DEFAULT_EVAL_SIZE` records, prompts disjoint from training)."""
    return _ASSETS / "eval.jsonl"
