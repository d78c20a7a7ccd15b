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
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .records import FORMATS, DataError, as_messages, as_pair, read_jsonl, read_records, record_format

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
    encoder = _Encoder(tokenizer)
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
                ids, labels = _encode_chat(encoder, _user_then_assistant(prompt, completion), where,
                                           "'/'".join(names), names)
            else:
                body, spans = encoder.plain(prompt + completion, where, names[0], offsets=True)
                is_target = _in_spans(spans, [(len(prompt), len(prompt) + len(completion))])
                ids = bos + body + eos
                labels = ([IGNORE_INDEX] * len(bos) + [i if t else IGNORE_INDEX for i, t in zip(body, is_target)]
                          + eos)
            stats.num_empty_completions += completion == ""
            stats.pairs_as = "chat" if as_chat else "raw"
        else:
            field_name = "messages" if kind == "messages" else "conversations"
            ids, labels = _encode_chat(encoder, as_messages(record, kind), where, field_name)
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
    encoder = _Encoder(tokenizer)
    if chat_template and getattr(tokenizer, "chat_template", None) is not None:
        prompt, completion = as_pair(record, kind, chat=True)
        messages = _user_then_assistant(prompt, completion)[:1]

        def render(conversation: list[dict]) -> str:
            return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

        return encoder.chat(messages, render(messages), render, where, _PAIR_FIELDS[kind][0])[0], completion
    prompt, completion = as_pair(record, kind, chat=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + encoder.plain(prompt, where, _PAIR_FIELDS[kind][0])[0], completion


def _in_spans(token_spans: Sequence[tuple[int, int]], target_spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Whether each token holds a character of a target span [start, end).

    A token with no characters (start == end) counts where it stands: inside a span or at its start.
    """
    return [any(start <= a < end if a == b else a < end and b > start for start, end in target_spans)
            for a, b in token_spans]


# The private-use code points from U+F0000 up (planes 15 and 16) are reserved here: markers around
# control-token strings in message text, and stand-ins for the template's own control tokens.
_RESERVED_FROM = 0xF0000
_MARK_START, _MARK_END = "\U00100000", "\U00100001"
_SENTINEL_PAD = "\U000FFFFD"


class _Encoder:
    """Encodes record text with `tokenizer`, keeping text in records from becoming control tokens."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        added = dict(getattr(tokenizer, "added_tokens_decoder", None) or {})
        # An unknown-character token may come out of plain text; the other special tokens must not.
        self.special_ids = {i for i, token in added.items() if token.special} - {tokenizer.unk_token_id}
        self.controls = sorted({token.content for token in added.values() if token.special}, key=len, reverse=True)
        self._plain_backend: tuple[Any, dict[str, str], dict[int, int]] | None = None

    def _call(self, text: str, where: str, name: str, offsets: bool, split_special_tokens: bool) -> Any:
        if offsets and not getattr(self.tokenizer, "is_fast", False):
            raise DataError(f"{where}: field '{name}': placing the loss mask needs a fast tokenizer (its character "
                            f"offsets); {type(self.tokenizer).__name__} is not one: load the model's tokenizer.json")
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets,
                              split_special_tokens=split_special_tokens)

    def plain(self, text: str, where: str, name: str, offsets: bool = False
              ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (and character spans) of `text` with every special token's string read as text."""
        if not text:
            return [], []
        # No special tokens: BOS/EOS placement is decided by the caller, not by each tokenizer's habits.
        encoding = self._call(text, where, name, offsets, split_special_tokens=True)
        ids = list(encoding["input_ids"])
        self._check_no_control_ids(ids, where, name)
        return ids, [tuple(span) for span in encoding["offset_mapping"]] if offsets else []

    def _check_no_control_ids(self, ids: list[int], where: str, name: str) -> None:
        leaked = self.special_ids.intersection(ids)
        if leaked:  # e.g. a transformers that ignores split_special_tokens, or a vocabulary that merges into one
            token = self.tokenizer.convert_ids_to_tokens(min(leaked))
            raise DataError(f"{where}: field '{name}': the tokenizer turns the text {token!r} into its control "
                            "token; this transformers/tokenizer cannot encode it as text: remove it from the data")

    def chat(self, messages: list[dict], full: str, render: Any, where: str, field: str = "messages"
             ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans of `full`, the rendered conversation; only the template's control tokens
        are special. When no message holds a control token's string (the usual case) that is the plain
        tokenization of `full`, exactly what apply_chat_template(tokenize=True) gives at inference."""
        held = any(control in message["content"] for message in messages for control in self.controls)
        if not held:
            encoding = self._call(full, where, field, offsets=True, split_special_tokens=False)
            return list(encoding["input_ids"]), [tuple(span) for span in encoding["offset_mapping"]]
        return self._chat_with_control_strings(messages, full, render, where, field)

    def _chat_with_control_strings(self, messages: list[dict], full: str, render: Any, where: str, field: str
                                   ) -> tuple[list[int], list[tuple[int, int]]]:
        # Render again with the control strings inside messages wrapped in markers, to tell them from
        # the template's. Then tokenize `full` once with a copy of the tokenizer that reads no special
        # token but stand-ins of the same length put in place of the template's: every other step
        # (normalizer, pre-tokenizer, model, offsets) runs on the whole text as the tokenizer would.
        reserved = next((c for c in full if ord(c) >= _RESERVED_FROM), None)
        if reserved is not None:
            raise DataError(f"{where}: field '{field}': a message holds both a control token's text and the "
                            f"private-use character U+{ord(reserved):04X}, which gradaccum reserves to tell them "
                            "from the chat template's control tokens; remove one of them")
        # The tokenizer's own reading, all control strings special: the copy below must agree with it.
        whole = self._call(full, where, field, offsets=True, split_special_tokens=False)
        alternatives = "|".join(map(re.escape, self.controls))

        def mark(text: str) -> str:
            return re.sub(alternatives, lambda match: _MARK_START + match[0] + _MARK_END, text)

        marked = render([{**message, "content": mark(message["content"])} for message in messages])
        in_messages: set[int] = set()  # where control strings from the messages start in `full`
        unmarked, length, done = [], 0, 0
        for match in re.finditer(f"{_MARK_START}({alternatives}){_MARK_END}|[{_MARK_START}{_MARK_END}]", marked):
            unmarked.append(marked[done:match.start()])
            length += match.start() - done
            if match[1] is not None:  # a lone marker (the template cut a string) is dropped
                in_messages.add(length)
                unmarked.append(match[1])
                length += len(match[1])
            done = match.end()
        if "".join(unmarked) + marked[done:] != full:
            raise DataError(f"{where}: field '{field}': the chat template rewrites message text, so the control "
                            "token strings in it cannot be told from the template's own; remove them from the data")
        occurrences = [(m.start(), m.end()) for m in re.finditer(alternatives, full)]
        template_only = [span for span in occurrences if span[0] not in in_messages]

        backend, sentinel_of, real_id_of = self._plain_backend_copy()

        def encode(spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
            text = list(full)
            for start, end in spans:
                text[start:end] = sentinel_of[full[start:end]]
            encoding = backend.encode("".join(text), add_special_tokens=False)
            return [real_id_of.get(i, i) for i in encoding.ids], [tuple(span) for span in encoding.offsets]

        if encode(occurrences) != (list(whole["input_ids"]), [tuple(s) for s in whole["offset_mapping"]]):
            raise DataError(f"{where}: field '{field}': cannot encode the control token strings in the messages "
                            "as text with this tokenizer; remove them from the data")
        ids, spans = encode(template_only)
        in_text = _in_spans(spans, [span for span in occurrences if span[0] in in_messages])
        self._check_no_control_ids([i for i, t in zip(ids, in_text) if t], where, field)
        return ids, spans

    def _plain_backend_copy(self) -> tuple[Any, dict[str, str], dict[int, int]]:
        """The backend with special tokens read as text, plus one stand-in added token per special token:
        private-use characters of the same length (so offsets carry over), with the same matching rules."""
        if self._plain_backend is None:
            from tokenizers import AddedToken, Tokenizer

            backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
            backend.no_truncation()
            backend.no_padding()
            backend.encode_special_tokens = True
            specials = sorted((i, t) for i, t in backend.get_added_tokens_decoder().items() if t.special)
            if _RESERVED_FROM + len(specials) >= ord(_SENTINEL_PAD):
                raise ValueError(f"the tokenizer has {len(specials)} special tokens, too many to stand in for")
            sentinel_of = {t.content: chr(_RESERVED_FROM + n) + _SENTINEL_PAD * (len(t.content) - 1)
                           for n, (_, t) in enumerate(specials)}
            backend.add_tokens([AddedToken(sentinel_of[t.content], single_word=t.single_word, lstrip=t.lstrip,
                                           rstrip=t.rstrip, normalized=t.normalized, special=False)
                                for _, t in specials])
            real_id_of = {backend.token_to_id(sentinel_of[t.content]): i for i, t in specials}
            self._plain_backend = (backend, sentinel_of, real_id_of)
        return self._plain_backend


_MARKER = "GRADACCUMREPLY7F3A"  # stand-in reply text, to locate where a template puts a reply


def _encode_chat(encoder: _Encoder, messages: list[dict], where: str, field: str = "messages",
                 turn_names: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation, labelling exactly the text the template emits for assistant turns.

    `field` names the conversation in error messages, and `turn_names[i]` its message i (the record's
    own fields, such as 'conversations[3]' or 'completion').

    The whole conversation is rendered to text and tokenized once (see `_Encoder.chat`). The assistant
    turns' character spans come from rendering the template up to each assistant message twice: without
    it but with the generation prompt (where the reply starts) and with it (where the reply ends). This
    works with any template whose renderings of a prefix are prefixes of the full rendering (templates
    that rewrite earlier turns, e.g. drop old reasoning, are rejected with a DataError).
    """
    tokenizer = encoder.tokenizer
    turn_names = turn_names or [f"{field}[{index}]" for index in range(len(messages))]
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: field '{field}': the tokenizer has no chat template; "
                        "use {prompt, completion} or {text} records with this model")

    def render(conversation: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as error:  # templates raise their own errors, e.g. "roles must alternate"
            raise DataError(f"{where}: field '{field}': the chat template failed: "
                            f"{type(error).__name__}: {error}") from None

    full = render(messages)
    assistant_spans: list[tuple[int, int]] = []
    done = 0  # characters of `full` before the end of the last assistant turn
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index > 0:
            start = render(messages[:index], add_generation_prompt=True)
        else:  # transformers will not render an empty conversation: find where a reply's text begins
            with_marker = render([{"role": "assistant", "content": _MARKER}])
            start = with_marker[:with_marker.find(_MARKER)] if _MARKER in with_marker else None
        end = render(messages[:index + 1])
        if start is None or not (end.startswith(start) and full.startswith(end) and len(start) >= done):
            raise DataError(f"{where}: field '{turn_names[index]}': cannot locate this assistant turn's tokens: "
                            "the chat template renders a conversation's start differently once more turns follow")
        assistant_spans.append((len(start), len(end)))
        done = len(end)

    ids, spans = encoder.chat(messages, full, render, where, field)
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids, _in_spans(spans, assistant_spans))]
    return ids, labels


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
