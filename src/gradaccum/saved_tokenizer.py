"""final/'s tokenizer: `tokenizer(text)` gives the ids training fed (models.save_final writes it).

data.tokenize writes BOS before every text record and raw prompt/completion pair, and encodes chat-template
text without special tokens. Most byte-level tokenizers (the `tiny` preset's too) add no BOS themselves, so
for a run that trained plain text the saved tokenizer gets one (`tokenizer_as_trained`); a chat-only run
keeps the tokenizer as it was. `saved_tokenizer_note` says which, proven on the saved files.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .errors import first_line


def saved_tokenizer_note(tokenizer, out_dir: Path, encoded_as: str, trust_remote_code: bool) -> str:
    """What the saved tokenizer's `tokenizer(text)` does with BOS, proven on the files as a user loads them
    (a tokenizer class may rebuild its post-processor); '' when there is nothing to say."""
    bos, bos_id, adds_bos = tokenizer.bos_token, tokenizer.bos_token_id, _puts_bos_first(tokenizer)
    chat = f"chat text: apply_chat_template(tokenize=True) adds no {bos}, as training did"
    if bos_id is None or (adds_bos and encoded_as == "text"):
        return ""
    if adds_bos and encoded_as == "mixed":
        return chat
    if adds_bos:  # chat only, and this tokenizer adds BOS itself: it is the model's own, kept as it is
        return (f"NOTE: its tokenizer(text) puts {bos} first, and training's chat-template ids got none added: "
                "encode chats with apply_chat_template(tokenize=True) or add_special_tokens=False")
    try:
        from transformers import AutoTokenizer

        reloaded = _probe_ids(AutoTokenizer.from_pretrained(out_dir, trust_remote_code=trust_remote_code))
    except Exception as error:  # noqa: BLE001 - final/ is written; say so, and let the run finish
        return (f"NOTE: its tokenizer did not load back with AutoTokenizer ({type(error).__name__}: "
                f"{first_line(error)}); check it before use")
    if encoded_as == "chat":
        if reloaded == _probe_ids(tokenizer):
            return f"its tokenizer adds no {bos}, as training's chat-template ids had none"
        return (f"NOTE: its tokenizer(text) no longer gives the ids training's tokenizer gave ({reloaded[:4]} ... "
                f"for 'Hello world'): encode chats with apply_chat_template(tokenize=True)")
    if reloaded != [bos_id, *_probe_ids(tokenizer)]:
        return (f"NOTE: its tokenizer does not put {bos} (id {bos_id}) first, and training did: prepend it to "
                "text you encode")
    if encoded_as == "mixed":
        return f"its tokenizer puts {bos} first, as training did for text records and raw pairs; {chat}"
    return f"its tokenizer puts {bos} first, as training did"


def _probe_ids(tokenizer) -> list[int]:
    return list(tokenizer("Hello world")["input_ids"])


def _puts_bos_first(tokenizer) -> bool:
    """Whether `tokenizer(text)` starts with BOS, or there is none (data.tokenize then adds none either)."""
    return tokenizer.bos_token_id is None or _probe_ids(tokenizer)[:1] == [tokenizer.bos_token_id]


def tokenizer_as_trained(tokenizer):
    """`tokenizer`, or a copy whose `tokenizer(text)` is BOS followed by what it gave before, as the training
    data was: data.tokenize writes BOS before every text and raw prompt/completion pair when the tokenizer has
    one, and most byte-level tokenizers (the `tiny` preset's too) do not add it themselves. Only the
    post-processor changes; `apply_chat_template` adds no special tokens, so chat ids stay as they were.
    The original comes back when neither way works (a slow tokenizer without `add_bos_token`)."""
    if _puts_bos_first(tokenizer):
        return tokenizer
    expected = [tokenizer.bos_token_id, *_probe_ids(tokenizer)]
    prop = getattr(type(tokenizer), "add_bos_token", None)
    if isinstance(prop, property) and prop.fset is not None:
        adding = copy.deepcopy(tokenizer)
        # transformers' own switches: they rebuild the post-processor, which is saved with the tokenizer.
        # An EOS that the old post-processor appended must stay (add_bos_token alone would drop it).
        if expected[-1:] == [tokenizer.eos_token_id] and hasattr(type(tokenizer), "add_eos_token"):
            adding.add_eos_token = True
        adding.add_bos_token = True
        if _probe_ids(adding) == expected:
            return adding
    if getattr(tokenizer, "is_fast", False):
        from tokenizers import processors

        adding = copy.deepcopy(tokenizer)
        bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
        prepend = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                special_tokens=[(bos, bos_id)])
        existing = adding.backend_tokenizer.post_processor  # e.g. ByteLevel's offset trimming: kept
        adding.backend_tokenizer.post_processor = prepend if existing is None else \
            processors.Sequence([existing, prepend])
        if _probe_ids(adding) == expected:
            return adding
    return tokenizer
