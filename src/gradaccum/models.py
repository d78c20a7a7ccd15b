"""Models and tokenizers: the `tiny` preset, a local HF directory, a GGUF file, a hub id; LoRA via peft.

    model, tokenizer = load_model("tiny")                  # random-init Llama, built here, no download
    model, tokenizer = load_model("models/SmolLM2-135M-Instruct")
    model, tokenizer = load_model("path/to/model.Q4_1.gguf")   # dequantized, plain and trainable
    model = apply_lora(model, r=16)
    save_final(model, tokenizer, "runs/demo/final")

Every loader returns the model in the requested dtype, on the CPU, in train mode, with sdpa attention
where the architecture has it: HF's eager attention computes its softmax in float32 even for a float64
model, which caps float64 equivalence checks near 1e-8 instead of ~1e-16.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError, first_line
# Activation checkpointing lives in its own module; these names are part of this module's API.
from .layer_checkpointing import (disable_gradient_checkpointing, enable_gradient_checkpointing,  # noqa: F401
                                  gradient_checkpointing_enabled)
from .layer_checkpointing import is_peft_model as _is_peft_model
from .saved_tokenizer import saved_tokenizer_note, tokenizer_as_trained

__all__ = [
    "ModelError",
    "build_tokenizer",
    "tiny_config",
    "load_model",
    "apply_lora",
    "save_final",
    "tokenizer_as_trained",
    "final_state_dict",
    "count_parameters",
    "enable_gradient_checkpointing",
    "disable_gradient_checkpointing",
    "gradient_checkpointing_enabled",
]


# The byte tokenizer's special tokens follow the 256 byte tokens, so these ids are fixed.
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS)
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258

# Each message is `<|role|>\n` + content. A user/system message ends with a newline; an assistant
# message ends with <|eos|>, inside the generation block, so training teaches the model to stop and
# `return_assistant_tokens_mask=True` marks exactly the assistant content plus that <|eos|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|eos|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

TINY_PRESET = "tiny"


def build_tokenizer():
    """The `tiny` preset's tokenizer: one token per byte (id = byte value) plus special tokens.

    Byte-level so any text round-trips with no unknown tokens and no training step; built in code so
    it needs no download. Nothing is added automatically (no BOS): `decode(encode(s)) == s`, and the
    data pipeline decides where BOS/EOS go.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # GPT-2's byte -> printable character map, the alphabet the ByteLevel pre-tokenizer emits.
    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[byte]: byte for byte in range(256)}
    # A BPE with no merges is a pure byte lookup; BPE (rather than WordLevel) is what GGUF and
    # other tooling expect of a byte-level vocabulary.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,  # distinct from EOS, so padding never hides a real end of sequence
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,  # = tiny_config's max_position_embeddings
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    return tokenizer


def tiny_config(vocab_size: int = 256 + len(SPECIAL_TOKENS), *, pad_token_id: int | None = PAD_ID,
                bos_token_id: int | None = BOS_ID, eos_token_id: int | None = EOS_ID, **overrides):
    """The `tiny` preset: a 0.33M-parameter Llama that learns the bundled tasks on two CPU cores in about two
    minutes (tasks.py).

    `overrides` replace any LlamaConfig field (e.g. `hidden_size=64` for a faster test model).
    """
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size,
        # Two layers of many narrow heads: copying from the prompt needs a pair of heads (one that
        # looks at the previous token, one that matches it), and eight heads per layer find such a
        # pair within a few hundred steps. 4 layers x 4 heads of 192 took 3x longer per step and
        # had learned nothing after 300; 4 heads of 32 or 3 layers learned more slowly than this.
        hidden_size=128,
        intermediate_size=256,  # 2x hidden: the tasks live in attention; 4x cost 30% more time, no accuracy
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,  # grouped-query attention, as in the real models we load
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attn_implementation="sdpa",  # see the module docstring: eager caps float64 precision
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def load_model(spec: str = TINY_PRESET, *, dtype: torch.dtype = torch.float32, seed: int = 0,
               trust_remote_code: bool = False):
    """`(model, tokenizer)` for `spec`: "tiny", a local HF directory, a `.gguf` file, or a hub id.

    The model comes back in `dtype`, on the CPU, in train mode. `seed` only matters for "tiny" (its
    random init). A tokenizer without a pad token gets its EOS as pad: the collator masks padding by
    attention mask and labels, so a shared id does no harm there (see `_ensure_pad_token`).
    """
    spec = str(spec)
    if spec == TINY_PRESET:
        return _load_tiny(dtype, seed)

    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"--model: GGUF file {spec!r} does not exist")
        return _load_gguf(path, dtype, trust_remote_code)
    if path.is_dir():
        return _load_pretrained(str(path), dtype, trust_remote_code, what="directory")
    if path.exists():
        raise ModelError(f"--model: {spec!r} is a file; pass a model directory (with config.json) or a .gguf file")
    if _looks_like_path(spec):
        raise ModelError(f"--model: directory {spec!r} does not exist")
    return _load_pretrained(spec, dtype, trust_remote_code, what="hub id")


def _load_tiny(dtype: torch.dtype, seed: int):
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)  # the init is the only randomness: same seed, same weights
    # Initialised in float32 and cast by _finish, so every dtype starts from the same weights.
    model = LlamaForCausalLM(config)
    return _finish(model, tokenizer, dtype)


def _looks_like_path(spec: str) -> bool:
    """A hub id is `name` or `org/name`; anything else that does not exist was meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """transformers renamed `torch_dtype` to `dtype` in 4.56; accept both generations."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


def _from_pretrained(source: str, dtype: torch.dtype, trust_remote_code: bool, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` asking for sdpa, and falling back to the default
    attention for architectures that have no sdpa implementation."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(kwargs, trust_remote_code=trust_remote_code, **_dtype_kwargs(dtype))
    try:
        return AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as error:
        if "sdpa" not in str(error).lower():
            raise
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def _load_pretrained(source: str, dtype: torch.dtype, trust_remote_code: bool, *, what: str):
    """A local HF directory or a hub id: both are one `from_pretrained`."""
    from transformers import AutoTokenizer

    try:
        model = _from_pretrained(source, dtype, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        reason = first_line(error)
        if what == "hub id":
            raise ModelError(
                f"--model: {source!r} is not a local directory, a .gguf file, or {TINY_PRESET!r}, and it could "
                f"not be loaded from the hub (unreachable, or no such model): {reason}"
            ) from error
        raise ModelError(f"--model: cannot load a causal LM from directory {source!r}: {reason}") from error
    return _finish(model, tokenizer, dtype)


def _load_gguf(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    """A GGUF file, dequantized into a plain model that HF Trainer, peft and our loop can train.

    transformers marks a GGUF load as quantized (`config.quantization_config`, `model.hf_quantizer`,
    `is_trainable == False`) even once every weight is a dense float. So the weights are moved into a
    fresh model built from the same config minus the quantization entry; the strict load proves every
    tensor found its place.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(path.parent), path.name
    extra = {}
    try:
        from transformers import GgufConfig

        # Recent transformers can keep GGUF blocks packed (when the `kernels` package is installed),
        # which cannot be trained: ask for dense weights. Older versions always dequantize.
        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        loaded = _from_pretrained(directory, dtype, trust_remote_code, gguf_file=name, **extra)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, trust_remote_code=trust_remote_code)
    except ImportError as error:  # the `gguf` package is an optional dependency
        raise ModelError(f"--model: loading {str(path)!r} needs the gguf package: pip install 'gradaccum[gguf]' "
                         f"({first_line(error)})") from error
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        raise ModelError(f"--model: cannot load GGUF file {str(path)!r}: {first_line(error)}") from error

    if getattr(loaded.config, "quantization_config", None) is None and getattr(loaded, "hf_quantizer", None) is None:
        return _finish(loaded, tokenizer, dtype)  # older transformers: already a plain model

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state_dict = loaded.state_dict()
    del loaded  # its tensors live on in state_dict; the wrapper can go
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **_dtype_kwargs(dtype))
    model.load_state_dict(state_dict, strict=True)
    return _finish(model, tokenizer, dtype)


def _finish(model: nn.Module, tokenizer, dtype: torch.dtype):
    """What every loader promises: dtype, CPU, train mode, a pad token, right padding."""
    _ensure_pad_token(model, tokenizer)
    # Right padding keeps each sequence's positions 0..n-1, the same with or without padding.
    tokenizer.padding_side = "right"
    model = model.to(device="cpu", dtype=dtype)
    model.train()  # from_pretrained returns eval mode
    return model, tokenizer


def _ensure_pad_token(model: nn.Module, tokenizer) -> None:
    """Give the tokenizer a pad token if it has none: its EOS, else a new `<|pad|>` token.

    Reusing EOS is the usual choice and costs nothing as long as padding is found through the
    attention mask, never by comparing ids with `pad_token_id` (which would also hide real EOS targets).
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _linear_leaf_names(model: nn.Module) -> list[str]:
    """Names (last component) of the nn.Linear modules peft should adapt: every attention and MLP
    projection, but not the LM head, whose weight is usually tied to the embedding."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def apply_lora(model: nn.Module, *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: list[str] | None = None):
    """Wrap `model` with LoRA adapters (peft): only the adapters train, the base weights are frozen.

    `target_modules` defaults to every linear projection of attention and MLP (for Llama:
    q/k/v/o_proj, gate/up/down_proj). `dropout` defaults to 0 so that accumulated and full-batch
    steps stay comparable bit for bit.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ModelError("--lora needs the peft package: pip install 'gradaccum[lora]'") from error
    if r <= 0:
        raise ModelError(f"--lora: rank r must be positive, got {r}")

    targets = list(target_modules) if target_modules else _linear_leaf_names(model)
    if not targets:
        raise ModelError("--lora: the model has no nn.Linear layers to adapt; pass target_modules")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # e.g. a target_modules name that matches nothing
        raise ModelError(f"--lora: {first_line(error)}") from error


def save_final(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, merge_lora: bool = True,
               state_dict: dict | None = None, encoded_as: str = "text", trust_remote_code: bool = False) -> str:
    """Save model and tokenizer with `save_pretrained` (safetensors) into `out_dir`; say what was saved.

    A peft model is saved either merged into a full model (loads with `AutoModelForCausalLM`, needs
    nothing else) or as the adapter only (small, but needs the base model to load). `state_dict`
    replaces the model's own tensors (the full weights gathered from FSDP2 shards).

    The tokenizer's `tokenizer(text)` gives what training fed (`encoded_as`, data.DataStats.encoded_as):
    "text" ([BOS] text [EOS] records and raw pairs) or "mixed": BOS first (`tokenizer_as_trained`); "chat"
    (chat-template ids, no special tokens added): the tokenizer as it was. `trust_remote_code` loads the
    saved tokenizer back, to prove it; if that fails the note says so and nothing is raised.
    """
    if encoded_as not in ("text", "chat", "mixed"):
        raise ValueError(f"save_final: encoded_as must be 'text', 'chat' or 'mixed', got {encoded_as!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _is_peft_model(model) and merge_lora:
        # Merge a copy: merge_and_unload rewrites the base weights in place and drops the adapters,
        # which would break a caller who keeps training (or saves again) after this.
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(out_dir)
        what = "merged LoRA weights into the full model"
    elif _is_peft_model(model):
        model.save_pretrained(out_dir)
        what = "LoRA adapter only"
    else:
        model.save_pretrained(out_dir, state_dict=None if state_dict is None else _share_tied(model, state_dict))
        what = "full model"
    (tokenizer if encoded_as == "chat" else tokenizer_as_trained(tokenizer)).save_pretrained(out_dir)
    from .checkpoint import normal_permissions

    normal_permissions(out_dir.glob("*.safetensors"))  # safetensors writes them 0600
    note = saved_tokenizer_note(tokenizer, out_dir, encoded_as, trust_remote_code)
    return f"{what}; {note}" if note else what


def final_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The final weights as `save_final` writes a full model: CPU copies, a LoRA model merged, a tied
    tensor (embeddings and LM head) once, under its first name. `state_dict` as in `save_final`."""
    if state_dict is not None:
        state = _share_tied(model, state_dict)
    elif _is_peft_model(model):
        state = copy.deepcopy(model).merge_and_unload().state_dict()  # a copy: see save_final
    else:
        state = model.state_dict()
    kept, seen = {}, set()
    for name, tensor in state.items():
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        kept[name] = tensor.detach().to("cpu", copy=True)
    return kept


def _share_tied(model: nn.Module, state_dict: dict) -> dict:
    """Make names that share one parameter in `model` share one tensor in `state_dict`.

    A full state dict gathered from FSDP2 shards holds a separate copy per name, so save_pretrained
    would keep both halves of a tie (e.g. an extra lm_head.weight); with one tensor it drops the tied
    names exactly as it does for the model's own state dict.
    """
    shared = dict(state_dict)
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first_name.setdefault(id(param), name)
        if owner != name and owner in shared and name in shared:
            shared[name] = shared[owner]
    return shared


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once."""
    # parameters() already yields a tied tensor only once.
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def ordinary_token_ids(model: nn.Module, limit: int = 512) -> torch.Tensor:
    """Ids below `limit` that the model reads as ordinary tokens (no pad, BOS, EOS or other special id),
    for probes that feed a model made-up text."""
    special: set[int] = set()
    for name, value in vars(model.config).items():
        if name.endswith(("_token_id", "_token_index")):
            special.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # character-level models have no embedding table
        embeddings = None
    if isinstance(embeddings, nn.Embedding):
        vocab_size = embeddings.num_embeddings
    else:  # character-level models (CANINE) take code points: any small id is a valid one
        config = model.config
        vocab_size = int(getattr(config, "vocab_size", 0) or getattr(config.get_text_config(), "vocab_size", 256))
    return torch.tensor([i for i in range(min(vocab_size, limit)) if i not in special])


def own_memory(params: list[torch.Tensor]) -> None:
    """Copy trainable CPU parameters out of the weights file's read-only memory map into private memory.

    transformers maps safetensors files and hands out parameters that still point into the mapping, so
    the first optimizer step would copy each 4 KiB page on write, one page fault at a time, far slower
    than one copy up front (benchmarks/README.md). Ties survive: the Parameter objects are the same,
    only their storage moves. Frozen parameters (LoRA's base) stay mapped; nothing writes them.
    """
    with torch.no_grad():
        for p in params:
            if p.device.type == "cpu" and p.requires_grad:
                p.data = p.data.clone()
