"""gradaccum.models: the byte tokenizer, the tiny preset, local/GGUF/hub loading, LoRA, saving."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradaccum.models import (
    ModelError,
    apply_lora,
    build_tokenizer,
    count_parameters,
    load_model,
    save_final,
    tiny_config,
)

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"

TEXTS = ["Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnew\r\nlines", "a", "",
         "symbols: <|not special|> {} [] () ~`!@#$%^&*-_=+;:'\",.<>/?\\|", "UTF-8 too: é ü 日本 🙂"]


def small_llama(seed: int = 0, dtype=torch.float32):
    """A smaller model than the preset, with the preset's tokenizer: fast for save/load/LoRA tests."""
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return LlamaForCausalLM(config).to(dtype), tokenizer


def sample_batch(tokenizer):
    """Two right-padded sequences of different lengths, so the attention mask matters."""
    return tokenizer(["<|user|>\nhi\n<|assistant|>\nhello<|eos|>", "short"], padding=True, return_tensors="pt")


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(text):
    tokenizer = build_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_is_bytes_plus_special_tokens():
    tokenizer = build_tokenizer()
    assert tokenizer.encode("Az \n") == [ord("A"), ord("z"), ord(" "), ord("\n")]  # id = byte value
    assert tokenizer.encode("é") == list("é".encode())
    assert len(tokenizer) == 256 + 6
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(ids) == 3 and min(ids) >= 256  # pad is not eos, and none of them is a byte
    assert tokenizer.padding_side == "right"
    # special tokens are single ids, and skip_special_tokens drops them
    ids = tokenizer.encode("<|user|>\nhi<|eos|>")
    assert len(ids) == 5 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nhi"


def test_tokenizer_is_deterministic_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    first, second = build_tokenizer(), build_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()

    first.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["<|system|>\nbe brief\n<|pad|><|bos|>"]:
        assert reloaded.encode(text) == first.encode(text)
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert reloaded.padding_side == "right"
    assert reloaded.chat_template == first.chat_template


def test_chat_template_renders_turns_and_generation_prompt():
    tokenizer = build_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\nHello.<|eos|>"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\n"
    assert tokenizer.apply_chat_template(messages[:2], tokenize=False) + "<|assistant|>\n" == prompt


def test_chat_template_marks_exactly_the_assistant_tokens():
    tokenizer = build_tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Sure"}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    marked = [tok for tok, keep in zip(out["input_ids"], out["assistant_masks"]) if keep]
    # each assistant reply and the <|eos|> that ends it; nothing of the prompts or role markers
    assert tokenizer.decode(marked) == "Yo<|eos|>Sure<|eos|>"


# --- tiny preset ---------------------------------------------------------------------------------


def test_tiny_preset_is_a_small_sdpa_llama_in_train_mode():
    from transformers import LlamaForCausalLM

    model, tokenizer = load_model("tiny")
    trainable, total = count_parameters(model)
    assert 200_000 <= total <= 5_000_000 and trainable == total
    assert isinstance(model, LlamaForCausalLM)
    assert model.config._attn_implementation == "sdpa"
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    batch = sample_batch(tokenizer)
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(out.loss)


def test_tiny_preset_is_deterministic_for_its_seed():
    a, _ = load_model("tiny", seed=1)
    b, _ = load_model("tiny", seed=1)
    c, _ = load_model("tiny", seed=2)
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not torch.equal(sd_a["model.layers.0.self_attn.q_proj.weight"], sd_c["model.layers.0.self_attn.q_proj.weight"])


def test_tiny_preset_in_float64_has_the_float32_weights():
    model, tokenizer = load_model("tiny", dtype=torch.float64)
    reference, _ = load_model("tiny", dtype=torch.float32)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(torch.equal(p, q.double()) for p, q in zip(model.parameters(), reference.parameters()))
    assert logits(model, sample_batch(tokenizer)).dtype == torch.float64


# --- local directories and bad specs ----------------------------------------------------------------


def test_saved_directory_loads_back(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = small_llama(seed=3)
    said = save_final(model, tokenizer, tmp_path / "final")
    assert said == "full model; its tokenizer puts <|bos|> first, as training did"
    assert (tmp_path / "final" / "model.safetensors").is_file()

    loaded, loaded_tokenizer = load_model(str(tmp_path / "final"))
    assert loaded.training and loaded.config._attn_implementation == "sdpa"
    batch = sample_batch(tokenizer)
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    # BOS first, as data.tokenize trains every text (the byte tokenizer itself adds nothing)
    assert loaded_tokenizer.encode("abc<|eos|>") == [tokenizer.bos_token_id, *tokenizer.encode("abc<|eos|>")]
    # plain transformers reads it too, and the dtype argument is honoured
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "final"), type(model))
    as_bf16, _ = load_model(str(tmp_path / "final"), dtype=torch.bfloat16)
    assert next(as_bf16.parameters()).dtype == torch.bfloat16


def test_directory_tokenizer_without_pad_gets_eos(tmp_path):
    model, tokenizer = small_llama()
    tokenizer.pad_token = None
    model.config.pad_token_id = None
    save_final(model, tokenizer, tmp_path)
    _, loaded_tokenizer = load_model(str(tmp_path))
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "<|eos|>"


@pytest.mark.parametrize("spec, message", [
    ("./no/such/model", "does not exist"),
    ("no/such/dir/model", "does not exist"),
    ("missing.gguf", "GGUF file 'missing.gguf' does not exist"),
])
def test_missing_paths_raise_model_error(spec, message):
    with pytest.raises(ModelError, match=re.escape(message)):
        load_model(spec)


def test_bad_local_files_raise_model_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelError, match="cannot load a causal LM from directory"):
        load_model(str(tmp_path))  # a directory with no config.json
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="cannot load GGUF file"):
        load_model(str(tmp_path / "broken.gguf"))
    assert issubclass(ModelError, ValueError)


def test_unreachable_hub_id_raises_model_error(monkeypatch):
    # Offline mode makes the hub lookup fail at once instead of after ~25 s of retries.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"'nobody/nothing' is not a local directory, a \.gguf file, or 'tiny'") as info:
        load_model("nobody/nothing")
    assert "\n" not in str(info.value)


# --- GGUF ----------------------------------------------------------------------------------------

# transformers' names -> llama.cpp's (the inverse of what the GGUF loader does)
GGUF_NAMES = [(r"^model\.embed_tokens\.", "token_embd."), (r"^model\.norm\.", "output_norm."),
              (r"^model\.layers\.", "blk."), (r"\.input_layernorm\.", ".attn_norm."),
              (r"\.post_attention_layernorm\.", ".ffn_norm."), (r"\.self_attn\.q_proj\.", ".attn_q."),
              (r"\.self_attn\.k_proj\.", ".attn_k."), (r"\.self_attn\.v_proj\.", ".attn_v."),
              (r"\.self_attn\.o_proj\.", ".attn_output."), (r"\.mlp\.gate_proj\.", ".ffn_gate."),
              (r"\.mlp\.up_proj\.", ".ffn_up."), (r"\.mlp\.down_proj\.", ".ffn_down.")]


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reorders q/k rows for its rope layout; transformers undoes it."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(path: Path, model, tokenizer, quantize_linear: bool = False) -> None:
    """Write `model` + `tokenizer` as llama.cpp would: a "llama" GGUF with a "gpt2" (byte-level BPE)
    vocabulary, F32 tensors, and with `quantize_linear` the projections as Q8_0 blocks."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("gradaccum-test")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)

    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * (len(tokens) - 256))  # 1 normal, 3 control
    # No merges (a pure byte vocabulary); transformers also wants scores when merges are empty.
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight, and the loader ties it back
        array = tensor.detach().float().numpy()
        if ".q_proj." in name:
            array = _llama_cpp_permute(array, config.num_attention_heads)
        elif ".k_proj." in name:
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        for pattern, replacement in GGUF_NAMES:
            name = re.sub(pattern, replacement, name)
        if quantize_linear and array.ndim == 2 and name.startswith("blk."):
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q8_0"])
def test_gguf_loads_as_a_plain_trainable_llama(tmp_path, quantized):
    pytest.importorskip("gguf")
    from transformers import LlamaForCausalLM

    source, tokenizer = small_llama(seed=4)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, source, tokenizer, quantize_linear=quantized)

    model, gguf_tokenizer = load_model(str(path))
    # What HF Trainer and peft check before they agree to train a model:
    assert type(model) is LlamaForCausalLM
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.training and model.config._attn_implementation == "sdpa"
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied

    # The weights are the ones written (q/k un-permuted), exactly for F32, to Q8_0 precision otherwise.
    expected, loaded = source.state_dict(), model.state_dict()
    assert expected.keys() == loaded.keys()
    for name in expected:
        tolerance = 0.01 * expected[name].abs().max() if quantized else 0
        assert (expected[name] - loaded[name]).abs().max() <= tolerance, name
    batch = sample_batch(tokenizer)
    assert torch.allclose(logits(model, batch), logits(source, batch), atol=0.05 if quantized else 1e-6)

    # and it trains: a backward pass reaches every parameter
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    # the tokenizer comes from the file's metadata, chat template included
    for text in TEXTS[:4] + ["<|user|>\nhi\n<|assistant|>\nyo<|eos|>"]:
        assert gguf_tokenizer.encode(text) == tokenizer.encode(text)
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert gguf_tokenizer.pad_token == "<|pad|>"


def test_gguf_loads_in_the_requested_dtype(tmp_path):
    pytest.importorskip("gguf")
    source, tokenizer = small_llama()
    write_llama_gguf(tmp_path / "tiny.gguf", source, tokenizer)
    model, _ = load_model(str(tmp_path / "tiny.gguf"), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


# --- LoRA ------------------------------------------------------------------------------------------


def _perturb_lora(model, seed: int = 0) -> None:
    """peft starts LoRA B at zero (a no-op adapter); give it values so merging has something to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def test_apply_lora_trains_only_the_adapters():
    pytest.importorskip("peft")
    model, _ = small_llama()
    total_before = count_parameters(model)[1]
    lora = apply_lora(model, r=4, alpha=8)
    trainable, total = count_parameters(lora)
    names = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in name for name in names)
    assert 0 < trainable < total and total > total_before
    adapted = {name.split(".")[-4] for name in names if name.endswith("lora_A.default.weight")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # r * (in + out) per adapted projection, 2 layers
    config = model.config
    kv = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    h, i = config.hidden_size, config.intermediate_size
    per_layer = 4 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    assert trainable == config.num_hidden_layers * per_layer


def test_apply_lora_explicit_targets():
    pytest.importorskip("peft")
    model, _ = small_llama()
    lora = apply_lora(model, r=2, target_modules=["q_proj", "v_proj"])
    names = {name.split(".")[-4] for name, p in lora.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "v_proj"}
    with pytest.raises(ModelError, match="--lora"):
        apply_lora(small_llama()[0], target_modules=["no_such_layer"])


def test_save_final_merges_lora_into_a_plain_model(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, tokenizer = small_llama(seed=5)
    lora = apply_lora(base, r=4, alpha=8)
    _perturb_lora(lora)
    batch = sample_batch(tokenizer)
    expected = logits(lora, batch)

    assert save_final(lora, tokenizer, tmp_path / "merged").startswith("merged LoRA weights into the full model;")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert torch.allclose(logits(merged, batch), expected, atol=1e-5)
    assert not torch.allclose(logits(merged, batch), logits(small_llama(seed=5)[0], batch), atol=1e-3)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").encode("ok") == [tokenizer.bos_token_id,
                                                                               *tokenizer.encode("ok")]

    # saving merged a copy: the caller's peft model still has its adapters and still computes the same
    assert isinstance(lora, PeftModel) and torch.equal(logits(lora, batch), expected)

    assert save_final(lora, tokenizer, tmp_path / "adapter", merge_lora=False).startswith("LoRA adapter only;")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()


def test_apply_lora_without_peft_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(ModelError, match=re.escape("pip install 'gradaccum[lora]'")):
        apply_lora(small_llama()[0])


def test_count_parameters_counts_frozen_and_tied_once():
    model, _ = small_llama()
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    model.model.embed_tokens.weight.requires_grad_(False)  # also the (tied) lm_head
    assert count_parameters(model) == (total - model.model.embed_tokens.weight.numel(), total)


# --- the real model ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason="run scripts/get_smollm2.py first")
def test_smollm2_loads_and_answers():
    from transformers import LlamaForCausalLM

    model, tokenizer = load_model(str(SMOLLM2))
    assert type(model) is LlamaForCausalLM and model.training
    assert 130e6 < count_parameters(model)[1] < 140e6
    assert tokenizer.pad_token is not None and tokenizer.chat_template

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])

    model.train()
    batch = tokenizer(["The quick brown fox jumps over the lazy dog."] * 2, return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert 0 < loss.item() < 6  # a pretrained model, far below log(49152) = 10.8
    loss.backward()


def test_the_saved_tokenizer_puts_bos_before_what_it_gave_before(tmp_path):
    """A tokenizer whose post-processor appends EOS keeps that EOS (transformers' add_bos_token switch alone
    would drop it) and gets BOS before it all; saved and reloaded, it holds."""
    import toy_tokenizers
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from gradaccum.models import tokenizer_as_trained

    backend = Tokenizer.from_str(toy_tokenizers.toy_tokenizer("byte_level", template=None).backend_tokenizer.to_str())
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A:0 </s>:0", special_tokens=[("</s>", tokenizer.eos_token_id)])
    before = tokenizer("reverse: abc").input_ids
    assert before[-1] == tokenizer.eos_token_id and before[0] != tokenizer.bos_token_id
    adding = tokenizer_as_trained(tokenizer)
    assert adding("reverse: abc").input_ids == [tokenizer.bos_token_id, *before]
    assert tokenizer("reverse: abc").input_ids == before  # the run's own tokenizer is left as it was
    model = tiny_llama_for(tokenizer)
    assert "puts <s> first" in save_final(model, tokenizer, tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("reverse: abc").input_ids == [tokenizer.bos_token_id, *before]
    assert tokenizer_as_trained(adding) is adding  # already puts BOS first: kept as it is


def tiny_llama_for(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2))


@pytest.mark.parametrize("post_processor", ["none", "byte_level"])
def test_without_the_add_bos_token_switch_the_post_processor_gets_the_bos(monkeypatch, post_processor):
    """transformers before 5 has no add_bos_token on most fast tokenizers: BOS goes into the post-processor."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from gradaccum.models import tokenizer_as_trained

    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True) \
        if post_processor == "byte_level" else None
    before = tokenizer("reverse: abc").input_ids
    for cls in type(tokenizer).__mro__:
        if "add_bos_token" in vars(cls):
            monkeypatch.delattr(cls, "add_bos_token")
    assert not hasattr(PreTrainedTokenizerFast, "add_bos_token")
    adding = tokenizer_as_trained(tokenizer)
    assert adding("reverse: abc").input_ids == [tokenizer.bos_token_id, *before]
