"""Held-out evaluation: exact token-mean loss and greedy exact-match accuracy."""

from __future__ import annotations

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
def exact_match_accuracy(model: torch.nn.Module, tokenizer: Any, records: list[dict], device: torch.device,
                max_new_tokens: int = 64, batch_size: int = 16) -> float | None:
    """Fraction of {prompt, completion} records whose greedy continuation equals the completion."""
    from .tasks import exact_match

    pairs = [(r["prompt"], r["completion"]) for r in records if "prompt" in r and "completion" in r]
    if not pairs:
        return None
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = [_prompt_ids(tokenizer, prompt) for prompt, _ in chunk]
        width = max(map(len, prompts))
        # Left padding keeps every prompt's last token at the same position for batched decoding.
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in chunk)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=min(max_new_tokens, longest + 2), do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)
        for row, (_, completion) in enumerate(chunk):
            new = out[row, width:].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            correct += exact_match(tokenizer.decode(new, skip_special_tokens=True), completion)
    model.train(was_training)
    return correct / len(pairs)


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids
