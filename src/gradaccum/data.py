"""Records -> token ids and label masks -> windows and micro-batches.

Reading files into records is `records.py` (`read_records`, re-exported here); what each format trains on:

    text                       [BOS] text [EOS], loss on every token
    prompt_completion, alpaca  with a chat template (the default when the tokenizer has one): a user turn
                               and an assistant turn, loss on the assistant turn; else [BOS] prompt
                               completion [EOS], loss on the completion and EOS only
    messages, sharegpt         chat template, loss on the assistant turns

Labels equal the input ids where the loss applies and -100 elsewhere; the causal shift is left to
the loss. Every mistake in a file raises `DataError` naming the file, record and field.

The data order is what makes accumulation checkable: `window_indices` fixes which examples form
optimizer step t from (number of examples, batch size B, seed, epoch) alone, and `split_window` only
distributes a window over ranks and micro-batches. So any split of B sees the same windows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .encoding import Encoder, encode_chat, in_spans
from .errors import DataError
from .records import FORMATS, as_messages, as_pair, read_jsonl, read_records, record_format

__all__ = [
    "IGNORE_INDEX",
    "FORMATS",
    "DataError",
    "Example",
    "DataStats",
    "read_records",
    "read_jsonl",
    "tokenize",
    "generation_pair",
    "collate",
    "window_indices",
    "split_window",
    "padding_fraction",
]

IGNORE_INDEX = -100  # the label of a position without loss (PyTorch's cross-entropy default)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # == input_ids where the loss applies, IGNORE_INDEX elsewhere; not shifted


@dataclass
class DataStats:
    num_examples: int = 0
    num_truncated: int = 0  # longer than max_length: the right part was cut off
    num_empty_targets: int = 0  # no target token left (kept: they add nothing to loss or count)
    num_empty_completions: int = 0  # prompt/completion records with completion "" (only EOS is learned)
    num_tokens: int = 0  # input tokens after truncation
    num_target_tokens: int = 0  # after the causal shift, i.e. what the loss counts
    max_example_tokens: int = 0  # the longest example before truncation, to help choose max_length
    num_by_format: dict[str, int] = field(default_factory=dict)  # records per format, as in FORMATS
    # How prompt_completion and Alpaca records were trained: "chat" (a user turn and an assistant turn
    # through the chat template) or "raw" (prompt and completion as one text); None: there were none.
    pairs_as: str | None = None

    @property
    def encoded_as(self) -> str:
        """How the examples were encoded, for final/'s tokenizer (models.save_final): "text" (each
        [BOS] text [EOS]: text records, pairs as raw text), "chat" (chat-template ids, no special tokens
        added) or "mixed"."""
        num_pairs = sum(self.num_by_format.get(kind, 0) for kind in _PAIR_FIELDS)
        num_plain = self.num_by_format.get("text", 0) + (num_pairs if self.pairs_as == "raw" else 0)
        return "text" if num_plain == self.num_examples else "chat" if num_plain == 0 else "mixed"


# ---------------------------------------------------------------------------------------------
# Tokenizing


def tokenize(records: Iterable[tuple[int, dict] | dict], tokenizer: Any, max_length: int,
             path: str | os.PathLike = "<data>", chat_template: bool = True) -> tuple[list[Example], DataStats]:
    """Token ids and labels for each record (as returned by `read_records`, or plain dicts of any format).

    - text: [BOS] + text + [EOS], loss on all but BOS.
    - prompt_completion and alpaca (see `records.as_pair`), when the tokenizer has a chat template and
      `chat_template` is true: the conversation [user: prompt, assistant: completion], as below. Else
      [BOS] + (prompt + completion) + [EOS], loss on the completion and EOS. `stats.pairs_as` says which.
    - messages and sharegpt: the tokenizer's chat template; loss on the assistant turns as the template
      renders them (content and end-of-turn marker), nowhere else.

    The ids are those of the whole text, tokenized in one call: what the model reads at inference.
    Tokenizing prompt and completion apart and joining the ids would differ wherever a tokenizer
    works across the boundary; SentencePiece-style ones (Llama-2, Mistral) even add a "▁" at the
    start of every call, a token the model never sees mid-text. Labels come from each token's
    character span (a fast tokenizer's offsets): a token is a target when any of its characters is
    completion (or assistant) text. So a token straddling the prompt/completion boundary, as in
    "reverse: rev" + "erse", is a target: it carries completion characters the model must produce,
    and without it they would be learned nowhere. (Such a prompt ends mid-token, so generation from
    the prompt alone starts from other ids; end prompts at a space or punctuation to avoid that.)

    Text in records is never a control token: "</s>" or "<|im_start|>" in a record is tokenized as
    the characters it is, and only the chat template's own control tokens are special.

    BOS / EOS are added when the tokenizer has them (chat: as the template writes them). Sequences
    longer than `max_length` keep their left part. `path` only names the file in error messages.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    as_chat = chat_template and getattr(tokenizer, "chat_template", None) is not None
    encoder = Encoder(tokenizer)
    examples, stats = [], DataStats()
    for position, item in enumerate(records, start=1):
        number, record = item if isinstance(item, tuple) else (position, item)
        where = f"{path}:{number}"
        kind = record_format(record, where)
        if kind == "text":
            ids = bos + encoder.plain(record["text"], where, "text")[0] + eos
            labels = [IGNORE_INDEX] * len(bos) + ids[len(bos):]
        elif kind in _PAIR_FIELDS:
            prompt, completion = as_pair(record, kind, chat=as_chat)
            names = _PAIR_FIELDS[kind]
            if as_chat:
                ids, is_target = encode_chat(encoder, _user_then_assistant(prompt, completion), where,
                                             "'/'".join(names), names)
                labels = [i if t else IGNORE_INDEX for i, t in zip(ids, is_target)]
            else:
                body, spans = encoder.plain(prompt + completion, where, names[0], offsets=True)
                is_target = in_spans(spans, [(len(prompt), len(prompt) + len(completion))])
                ids = bos + body + eos
                labels = ([IGNORE_INDEX] * len(bos) + [i if t else IGNORE_INDEX for i, t in zip(body, is_target)]
                          + eos)
            stats.num_empty_completions += completion == ""
            stats.pairs_as = "chat" if as_chat else "raw"
        else:
            field_name = "messages" if kind == "messages" else "conversations"
            ids, is_target = encode_chat(encoder, as_messages(record, kind), where, field_name)
            labels = [i if t else IGNORE_INDEX for i, t in zip(ids, is_target)]
        assert len(ids) == len(labels)

        stats.max_example_tokens = max(stats.max_example_tokens, len(ids))
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            stats.num_truncated += 1
        # Position 0 is never predicted (nothing precedes it), so it is not a target after the shift.
        num_targets = sum(label != IGNORE_INDEX for label in labels[1:])
        stats.num_empty_targets += num_targets == 0
        stats.num_target_tokens += num_targets
        stats.num_tokens += len(ids)
        stats.num_by_format[kind] = stats.num_by_format.get(kind, 0) + 1
        examples.append(Example(input_ids=ids, labels=labels))
    stats.num_examples = len(examples)
    return examples, stats


_PAIR_FIELDS = {"prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output")}


def _user_then_assistant(prompt: str, completion: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def generation_pair(record: dict, tokenizer: Any, chat_template: bool = True,
                    where: str = "<record>") -> tuple[list[int], str] | None:
    """(prompt ids, expected completion) of a prompt_completion or Alpaca record; None for other formats.

    The prompt ids are what a model trained by `tokenize(..., chat_template=chat_template)` reads before
    it writes the completion: with a chat template, the user turn and the template's generation prompt;
    else [BOS] + prompt. For evaluation by generation.
    """
    kind = record_format(record, where)
    if kind not in _PAIR_FIELDS:
        return None
    encoder = Encoder(tokenizer)
    if chat_template and getattr(tokenizer, "chat_template", None) is not None:
        prompt, completion = as_pair(record, kind, chat=True)
        messages = _user_then_assistant(prompt, completion)[:1]

        def render(conversation: list[dict]) -> str:
            return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

        return encoder.chat(messages, render(messages), render, where, _PAIR_FIELDS[kind][0])[0], completion
    prompt, completion = as_pair(record, kind, chat=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + encoder.plain(prompt, where, _PAIR_FIELDS[kind][0])[0], completion


# ---------------------------------------------------------------------------------------------
# Batching


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: `input_ids`, `attention_mask`, `labels` (IGNORE_INDEX on padding).

    Right padding keeps each sequence at positions 0..n-1, the same as without padding.
    """
    if not examples:
        raise ValueError("collate: no examples")
    width = max(len(example.input_ids) for example in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Padding-free: the examples end to end in one row, `input_ids`, `position_ids`, `labels` [1, T].

    position_ids restart at 0 for each example; HF models (transformers >= 4.53, sdpa / eager / flash
    attention) read those restarts as sequence boundaries and attend only within each example, so every
    token sees exactly what it sees in its own padded row. The first token of each example gets no label:
    after the causal shift it would be predicted from the previous example's last token, and in a padded
    row it is never a target either -- so the target count, and the exact loss, are unchanged.
    There is no attention_mask: every position is real.
    """
    if not examples:
        raise ValueError("pack: no examples")
    input_ids, position_ids, labels = [], [], []
    for example in examples:
        input_ids += example.input_ids
        position_ids += range(len(example.input_ids))
        labels += [IGNORE_INDEX] + list(example.labels[1:])
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return {"input_ids": as_row(input_ids), "position_ids": as_row(position_ids), "labels": as_row(labels)}


def window_indices(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global windows: a seeded permutation of range(num_examples) cut into `batch_size` chunks.

    Window t of an epoch is optimizer step t. It depends on (num_examples, batch_size, seed, epoch) only,
    never on the micro-batch size, accumulation steps or world size, so every split of the same batch
    size trains on the same windows. The last window is partial when batch_size does not divide
    num_examples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_examples < 0 or seed < 0 or epoch < 0:
        raise ValueError(f"num_examples, seed and epoch must be >= 0, got {num_examples}, {seed}, {epoch}")
    # A seed sequence of (seed, epoch), not seed + epoch: epoch 1 of seed 0 must differ from epoch 0 of seed 1.
    order = np.random.default_rng([seed, epoch]).permutation(num_examples).tolist()
    return [order[start:start + batch_size] for start in range(0, num_examples, batch_size)]


def global_windows(num_examples: int, batch_size: int, seed: int, start_step: int,
                   stop_step: int) -> Iterator[list[int]]:
    """Global window t for start_step <= t < stop_step, epoch after epoch: optimizer step t trains on it."""
    per_epoch = math.ceil(num_examples / batch_size)
    cached_epoch, windows = None, []
    for step in range(start_step, stop_step):
        epoch, position = divmod(step, per_epoch)
        if epoch != cached_epoch:
            cached_epoch, windows = epoch, window_indices(num_examples, batch_size, seed, epoch)
        yield windows[position]


def split_window(window: Sequence[int], micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 lengths: Sequence[int] | None = None) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for one global window.

    With `lengths` (token count per example index) the window is first sorted by length, stably, so
    that each micro-batch holds similar lengths and needs little padding; the window's content, and
    hence the exact gradient, is unchanged. The sorted window is dealt round-robin (rank r takes every
    world_size-th example from position r), so every rank gets a similar mix of lengths and the ranks
    finish their micro-batches at similar times. Each rank's share is cut into micro-batches of at most
    `micro_batch_size`.

    Every example of the window lands on exactly one rank. A full window (micro_batch_size x
    accumulation_steps x world_size examples) gives every rank accumulation_steps full micro-batches.
    A partial last window gives some ranks fewer or smaller micro-batches, and a rank may get none:
    then this returns [] and the rank must still join the window's collectives.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    ordered = sorted(window, key=lambda index: lengths[index]) if lengths is not None else list(window)
    share = ordered[rank::world_size]
    return [share[start:start + micro_batch_size] for start in range(0, len(share), micro_batch_size)]


def padding_fraction(batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Padded positions / all positions over collated batches (0.0 for none), for logging."""
    num_positions = num_real = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        if mask is None:  # packed: every position is real
            mask = torch.ones_like(batch["input_ids"])
        num_positions += mask.numel()
        num_real += int(mask.sum())
    return 1.0 - num_real / num_positions if num_positions else 0.0
