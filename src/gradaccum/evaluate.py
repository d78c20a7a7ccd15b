"""Held-out evaluation: exact token-mean loss, greedy exact-match accuracy, sample generations."""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from .data import Example, collate


@torch.no_grad()
def eval_loss(loss_module: torch.nn.Module, examples: list[Example], pad_token_id: int, device: torch.device,
              batch_size: int = 16, count: Callable[[torch.Tensor], int] | None = None,
              autocast: Callable[[], Any] | None = None) -> float | None:
    """Sum of token losses over the whole eval set divided by its target count (not a mean of means)."""
    from .losses import count_targets

    count = count or count_targets
    total, num_targets = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_token_id).items()}
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            total += float(loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"]))
        num_targets += count(batch["labels"])
    return total / num_targets if num_targets else None


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str], device: torch.device,
                     max_new_tokens: list[int] | int = 64, batch_size: int = 16) -> list[str]:
    """Greedy continuation of each prompt, cut at EOS (`max_new_tokens` may be one limit per prompt)."""
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        ids = [_prompt_ids(tokenizer, prompt) for prompt in prompts[start:start + batch_size]]
        width = max(map(len, ids))
        # Left padding keeps every prompt's last token at the same position for batched decoding.
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, row_ids in enumerate(ids):
            input_ids[row, width - len(row_ids):] = torch.tensor(row_ids)
            attention_mask[row, width - len(row_ids):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max(limits[start:start + batch_size]), do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)
        for row in range(len(ids)):
            new = out[row, width:].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            answers.append(tokenizer.decode(new, skip_special_tokens=True))
    model.train(was_training)
    return answers


def _answer_pairs(records: list[dict]) -> list[tuple[str, str]]:
    return [(r["prompt"], r["completion"]) for r in records if "prompt" in r and "completion" in r]


def _predict(model: torch.nn.Module, tokenizer: Any, pairs: list[tuple[str, str]], device: torch.device,
             max_new_tokens: int, batch_size: int) -> list[str]:
    # Room for the expected answer and two tokens more: enough to see a wrong or unended answer.
    limits = [min(max_new_tokens, len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 2) for _, c in pairs]
    return generate_answers(model, tokenizer, [p for p, _ in pairs], device, limits, batch_size)


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Any, records: list[dict], device: torch.device,
                max_new_tokens: int = 64, batch_size: int = 16) -> float | None:
    """Fraction of {prompt, completion} records whose greedy continuation equals the completion."""
    from .tasks import exact_match as matches

    pairs = _answer_pairs(records)
    if not pairs:
        return None
    predictions = _predict(model, tokenizer, pairs, device, max_new_tokens, batch_size)
    return sum(matches(pred, completion) for pred, (_, completion) in zip(predictions, pairs)) / len(pairs)


def sample_lines(model: torch.nn.Module, tokenizer: Any, records: list[dict], device: torch.device,
                 num_samples: int = 6, max_new_tokens: int = 64) -> list[str]:
    """A few held-out generations as `✓ prompt -> answer` lines, one task of each kind first."""
    from .tasks import exact_match as matches

    pairs, seen_tasks = [], set()
    for record in records:  # first one record per task, then any, in file order
        if record.get("task") not in seen_tasks and "prompt" in record and "completion" in record:
            seen_tasks.add(record.get("task"))
            pairs.append((record["prompt"], record["completion"]))
    pairs = (pairs + [p for p in _answer_pairs(records) if p not in pairs])[:num_samples]
    if not pairs:
        return []
    right, wrong = _marks()
    lines = []
    for prediction, (prompt, completion) in zip(_predict(model, tokenizer, pairs, device, max_new_tokens, 16), pairs):
        answer = prediction.strip().split("\n", 1)[0].strip() if prediction.strip() else ""
        if matches(prediction, completion):
            lines.append(f"  {right} {prompt} -> {answer}")
        else:
            lines.append(f"  {wrong} {prompt} -> {answer or '(nothing)'}   (expected {completion.strip()})")
    return lines


def _marks() -> tuple[str, str]:
    """Check marks where the console can print them (a Windows code page may not)."""
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "\u2713\u2717".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "ok", "x "
    return "\u2713", "\u2717"


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids
