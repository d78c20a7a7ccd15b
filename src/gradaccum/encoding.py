"""Record text -> token ids, where record text is only ever text, and chat templates' assistant turns.

`Encoder.plain` tokenizes text with every special token's string read as characters, so "</s>" in a
record never becomes the EOS token. `encode_chat` renders a conversation with the tokenizer's chat
template, tokenizes it once, and finds the assistant turns' tokens from character spans; control
token strings inside messages stay text, while the template's own are special.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from .errors import DataError, ModelError


def in_spans(token_spans: Sequence[tuple[int, int]], target_spans: Sequence[tuple[int, int]]) -> list[bool]:
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


class Encoder:
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
        in_text = in_spans(spans, [span for span in occurrences if span[0] in in_messages])
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
                raise ModelError(f"the tokenizer has {len(specials)} special tokens, too many to stand in for")
            sentinel_of = {t.content: chr(_RESERVED_FROM + n) + _SENTINEL_PAD * (len(t.content) - 1)
                           for n, (_, t) in enumerate(specials)}
            backend.add_tokens([AddedToken(sentinel_of[t.content], single_word=t.single_word, lstrip=t.lstrip,
                                           rstrip=t.rstrip, normalized=t.normalized, special=False)
                                for _, t in specials])
            real_id_of = {backend.token_to_id(sentinel_of[t.content]): i for i, t in specials}
            self._plain_backend = (backend, sentinel_of, real_id_of)
        return self._plain_backend


_MARKER = "GRADACCUMREPLY7F3A"  # stand-in reply text, to locate where a template puts a reply


def encode_chat(encoder: Encoder, messages: list[dict], where: str, field: str = "messages",
                turn_names: Sequence[str] | None = None) -> tuple[list[int], list[bool]]:
    """Ids of a conversation, and which of them are the text the template emits for assistant turns.

    `field` names the conversation in error messages, and `turn_names[i]` its message i (the record's
    own fields, such as 'conversations[3]' or 'completion').

    The whole conversation is rendered to text and tokenized once (see `Encoder.chat`). The assistant
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
    return ids, in_spans(spans, assistant_spans)
