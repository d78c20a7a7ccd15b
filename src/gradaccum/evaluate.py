"""Held-out evaluation: exact token-mean loss, greedy exact-match accuracy, sample generations."""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from .data import Example, collate, generation_pair


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
def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], device: torch.device,
                     max_new_tokens: list[int] | int = 64, batch_size: int = 16) -> list[str]:
    """Greedy continuation of each prompt (token ids), cut at EOS (`max_new_tokens` may be one limit per prompt)."""
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        ids = prompts[start:start + batch_size]
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


def _answer_pairs(records: list[dict], tokenizer: Any, chat_template: bool) -> list[tuple[dict, list[int], str]]:
    """(record, prompt ids as training saw them, expected completion) for the pair-shaped records."""
    pairs = []
    for record in records:
        pair = generation_pair(record, tokenizer, chat_template)
        if pair is not None:
            pairs.append((record, *pair))
    return pairs


def _predict(model: torch.nn.Module, tokenizer: Any, pairs: list[tuple[dict, list[int], str]],
             device: torch.device, max_new_tokens: int, batch_size: int) -> list[str]:
    # Room for the expected answer and two tokens more: enough to see a wrong or unended answer.
    limits = [min(max_new_tokens, len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 2) for _, _, c in pairs]
    return generate_answers(model, tokenizer, [ids for _, ids, _ in pairs], device, limits, batch_size)


@torch.no_grad()
def exact_match_accuracy(model: torch.nn.Module, tokenizer: Any, records: list[dict], device: torch.device,
                         max_new_tokens: int = 64, batch_size: int = 16, chat_template: bool = True) -> float | None:
    """Fraction of prompt/completion (or Alpaca) records whose greedy continuation equals the completion.

    The prompt is tokenized as training saw it (`chat_template` as in `tokenize`), so a model trained
    through its chat template is asked through it too.
    """
    from .tasks import exact_match

    pairs = _answer_pairs(records, tokenizer, chat_template)
    if not pairs:
        return None
    predictions = _predict(model, tokenizer, pairs, device, max_new_tokens, batch_size)
    return sum(exact_match(pred, completion) for pred, (_, _, completion) in zip(predictions, pairs)) / len(pairs)


def sample_lines(model: torch.nn.Module, tokenizer: Any, records: list[dict], device: torch.device,
                 num_samples: int = 6, max_new_tokens: int = 64, chat_template: bool = True) -> list[str]:
    """A few held-out generations as `✓ prompt -> answer` lines, one task of each kind first."""
    from .tasks import exact_match

    pairs = _answer_pairs(records, tokenizer, chat_template)
    first_of_task, seen_tasks = [], set()
    for pair in pairs:  # first one record per task, then any, in file order
        if pair[0].get("task") not in seen_tasks:
            seen_tasks.add(pair[0].get("task"))
            first_of_task.append(pair)
    chosen = (first_of_task + [p for p in pairs if p not in first_of_task])[:num_samples]
    if not chosen:
        return []
    right, wrong = _marks()
    lines = []
    for prediction, (record, _, completion) in zip(_predict(model, tokenizer, chosen, device, max_new_tokens, 16),
                                                   chosen):
        prompt = record.get("prompt", record.get("instruction", ""))
        answer = prediction.strip().split("\n", 1)[0].strip() if prediction.strip() else ""
        if exact_match(prediction, completion):
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
