"""Small tokenizers built offline, one per family the data pipeline must get right, and chat templates.

- "byte_level": BPE over bytes (GPT-2 / SmolLM2 / Qwen / Llama-3 style); no prefix space.
- "metaspace_always": SentencePiece-style, a "▁" prepended to every section between special tokens.
- "metaspace_first": the same, "▁" only at the very start of the text (Llama non-legacy).
- "legacy": Llama-2 / Mistral "legacy": the normalizer prepends "▁" and turns spaces into "▁".

Each is a real BPE trained on a few sentences (so merges happen), wrapped in PreTrainedTokenizerFast.
`plain_reference` gives a tokenizer that matches none of the special tokens except `keep`: what a
text holding "</s>" must tokenize to, computed by the `tokenizers` library itself.
"""

from __future__ import annotations

import functools
import json
import string

KINDS = ("byte_level", "metaspace_always", "metaspace_first", "legacy")
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2's shape: the reply follows "[/INST]" after a space, and ends with EOS.
LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
LLAMA2_GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{% generation %}{{ ' ' + m['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)
TEMPLATES = {"chatml": (CHATML_TEMPLATE, CHATML_GENERATION_TEMPLATE),
             "llama2": (LLAMA2_TEMPLATE, LLAMA2_GENERATION_TEMPLATE)}

_CORPUS = [
    "add: 97 + 8 = 105", "reverse: abc = cba", "copy: hello world = hello world", "a = b",
    "the quick brown fox jumps over the lazy dog", "Answer with the result only.",
    "reverse the reverse", "user assistant system", string.printable,  # every ASCII character is known
] * 5


@functools.lru_cache(maxsize=None)
def _backend_json(kind: str) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    alphabet = []
    if kind == "byte_level":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind in ("metaspace_always", "metaspace_first"):
        scheme = kind.split("_")[1]
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
        alphabet = ["▁"]
    elif kind == "legacy":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        alphabet = ["▁"]
    else:
        raise ValueError(kind)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=alphabet)
    if kind == "legacy":  # train on "▁"-words, as SentencePiece does; at run time there is no pre-tokenizer
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    backend.train_from_iterator(_CORPUS, trainer)
    if kind == "legacy":
        backend.pre_tokenizer = None
    return backend.to_str()


@functools.lru_cache(maxsize=None)
def toy_tokenizer(kind: str, template: str | None = "chatml", generation: bool = False):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    chat_template = TEMPLATES[template][generation] if template else None
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_backend_json(kind)), bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", chat_template=chat_template)


def plain_reference(tokenizer, keep: tuple[str, ...] = ()):
    """A copy of `tokenizer`'s backend that matches only the added tokens in `keep`: all others are text."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["content"] in keep]
    return Tokenizer.from_str(json.dumps(spec))


def surface(tokenizer, ids: list[int]) -> str:
    """The text the tokens spell, with no decoder clean-up (Metaspace decoders drop a leading space)."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if "Ġ" in tokenizer.get_vocab() or "Ċ" in tokenizer.get_vocab():  # byte-level: the decoder is exact
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    return "".join(pieces).replace("▁", " ")
