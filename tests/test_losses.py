"""Chunked LM-head cross-entropy: the same numbers and gradients as full logits, without the logits."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradaccum.losses import CausalLMLoss, linear_cross_entropy_sum, sequence_mean_sum, token_loss_sum

IGNORE = -100
VOCAB = 64
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, computed in float64 (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.norm())
    return float((a - b).norm()) / scale if scale else float((a - b).norm())


def random_problem(num_tokens, hidden, vocab, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(num_tokens, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (num_tokens,), generator=g)
    # A non-uniform incoming gradient checks that each token's gradient is scaled by its own grad_output.
    grad_out = torch.rand(num_tokens, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return h, w, b, t, grad_out


def grads_of(loss, grad_out, tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None], grad_out)


# --- linear_cross_entropy_sum: gradient taken in forward, scaled in backward -------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])  # 7 does not divide 50; 64 and 1000 exceed it
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_sum_matches_cross_entropy(dtype, chunk_size, weighted, bias):
    h, w, b, t, token_weights = random_problem(50, 16, 97, dtype, bias=bias)
    token_weights = token_weights if weighted else None
    scale = torch.tensor(0.37, dtype=dtype)  # what window.scale() multiplies the summed loss by
    ours = linear_cross_entropy_sum(h, w, t, b, token_weights, chunk_size=chunk_size)
    per_token = F.cross_entropy(F.linear(h, w, b), t, reduction="none")
    ref = (per_token * token_weights).sum() if weighted else per_token.sum()
    assert ours.shape == () and ours.dtype == dtype
    assert rel(ours, ref) <= TOLERANCE[dtype]
    for mine, theirs in zip(grads_of(ours, scale, (h, w, b)), grads_of(ref, scale, (h, w, b))):
        assert rel(mine, theirs) <= TOLERANCE[dtype]
    # The same tolerance tells a wrong gradient apart: off-by-one targets.
    wrong = F.cross_entropy(F.linear(h, w, b), (t + 1) % 97, reduction="sum")
    mine = grads_of(linear_cross_entropy_sum(h, w, t, b, token_weights, chunk_size=chunk_size), scale, (w,))[0]
    assert rel(mine, grads_of(wrong, scale, (w,))[0]) > 1e-2


def test_linear_sum_frozen_head_no_grad_and_autocast():
    h, w, b, t, _ = random_problem(33, 8, 40, torch.float64)
    w.requires_grad_(False)
    b.requires_grad_(False)
    linear_cross_entropy_sum(h, w, t, b, chunk_size=5).backward()
    assert w.grad is None and b.grad is None
    ref_h = torch.autograd.grad(F.cross_entropy(F.linear(h, w, b), t, reduction="sum"), h)[0]
    assert rel(h.grad, ref_h) <= 1e-12
    with torch.no_grad():  # evaluation: the loss only
        loss = linear_cross_entropy_sum(h, w, t, b)
    assert not loss.requires_grad and rel(loss, F.cross_entropy(F.linear(h, w, b), t, reduction="sum")) <= 1e-12
    h32, w32, b32, t32, _ = random_problem(40, 16, 97, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy_sum(h32, w32, t32, b32, chunk_size=9)
        ref = F.cross_entropy(F.linear(h32, w32, b32).float(), t32, reduction="sum")
    assert ours.dtype == torch.float32 and rel(ours, ref) <= 1e-6
    for mine, theirs in zip(grads_of(ours, None, (h32, w32)), grads_of(ref, None, (h32, w32))):
        assert mine.dtype == torch.float32 and rel(mine, theirs) <= 2e-2
    with pytest.raises(ValueError, match="weights must be"):
        linear_cross_entropy_sum(h, w, t, b, torch.ones(3, dtype=torch.float64))


def test_linear_sum_frozen_hidden_no_tokens_and_bad_arguments():
    h, w, b, t, _ = random_problem(33, 8, 40, torch.float64)
    h.requires_grad_(False)
    linear_cross_entropy_sum(h, w, t, b, chunk_size=5).backward()
    assert h.grad is None
    ref_w, ref_b = torch.autograd.grad(F.cross_entropy(F.linear(h, w, b), t, reduction="sum"), (w, b))
    assert rel(w.grad, ref_w) <= 1e-12 and rel(b.grad, ref_b) <= 1e-12
    h, w, b, t, _ = random_problem(0, 8, 40, torch.float64)  # no tokens: a zero sum, zero gradients
    loss = linear_cross_entropy_sum(h, w, t, b)
    loss.backward()
    assert float(loss) == 0 and h.grad.shape == (0, 8)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    h, w, b, t, _ = random_problem(10, 8, 40, torch.float64)
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_cross_entropy_sum(h, w, torch.full_like(t, IGNORE), b)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_sum(h, w, t, b, chunk_size=0)
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy_sum(h, w.float(), t, b)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy_sum(h, w[:, :4], t, b)


def test_linear_sum_bfloat16_matches_upcast_plain_path():
    """Half-precision inputs: logits from the same bf16 matmul, softmax in float32, a float32 sum."""
    h, w, b, t, _ = random_problem(40, 16, 97, torch.bfloat16)
    ours = linear_cross_entropy_sum(h, w, t, b, chunk_size=9)
    ref = F.cross_entropy(F.linear(h, w, b).float(), t, reduction="sum")
    assert ours.dtype == torch.float32 and rel(ours, ref) <= 1e-6
    for mine, theirs in zip(grads_of(ours, None, (h, w, b)), grads_of(ref, None, (h, w, b))):
        assert mine.dtype == torch.bfloat16
        assert rel(mine, theirs) <= 2e-2  # bf16 rounding of per-chunk partial sums


def test_linear_sum_computes_each_chunk_once():
    """Three [chunk x V x H] matmuls per chunk (logits, grad hidden, grad weight), as the plain head;
    a backward that recomputed the logits would need a fourth."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in ("mm", "addmm", "addmm_"):
                a, b_ = (args[1], args[2]) if name.startswith("addmm") else (args[0], args[1])
                CountMatmuls.flops += a.shape[0] * a.shape[1] * b_.shape[1]
            return func(*args, **(kwargs or {}))

    def flops(fn):
        CountMatmuls.flops = 0
        with CountMatmuls():
            fn()
        return CountMatmuls.flops

    n, hidden, vocab = 64, 16, 128
    h, w, b, t, _ = random_problem(n, hidden, vocab, torch.float32, bias=False)
    fused = flops(lambda: linear_cross_entropy_sum(h, w, t, chunk_size=16).backward())
    plain = flops(lambda: F.cross_entropy(F.linear(h, w), t, reduction="sum").backward())
    assert fused == plain == 3 * n * vocab * hidden


# --- memory: what the chunked path keeps for backward ---------------------------------------------

def saved_bytes(fn):
    """Bytes of every tensor autograd saves for backward while running fn()."""
    sizes = []

    def pack(x):
        sizes.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return sum(sizes), max(sizes, default=0), out


def largest_tensor_created(fn) -> int:
    """Elements of the largest tensor any op creates while fn() runs, forward and backward alike."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Largest.numel = max([Largest.numel] + [x.numel() for x in tree_leaves(out) if torch.is_tensor(x)])
            return out

    with Largest():
        fn()
    return Largest.numel


def test_chunked_never_creates_logits():
    """Nothing of size tokens x vocab is ever allocated (saved or not): the biggest is a chunk or the weight."""
    n, hidden, vocab, chunk = 512, 32, 4096, 64
    h, w, b, t, grad_out = random_problem(n, hidden, vocab, torch.float32)
    chunked = largest_tensor_created(lambda: linear_cross_entropy_sum(h, w, t, b, chunk_size=chunk).backward())
    plain = largest_tensor_created(lambda: F.cross_entropy(F.linear(h, w, b), t, reduction="none").backward(grad_out))
    assert plain >= n * vocab
    assert chunked == max(chunk * vocab, vocab * hidden)


def test_chunked_saves_no_logits():
    n, hidden, vocab = 512, 32, 4096
    h, w, b, t, _ = random_problem(n, hidden, vocab, torch.float32)
    chunked_total, chunked_largest, _ = saved_bytes(lambda: linear_cross_entropy_sum(h, w, t, b, chunk_size=128))
    plain_total, plain_largest, _ = saved_bytes(lambda: F.cross_entropy(F.linear(h, w, b), t, reduction="none"))
    logits_bytes = n * vocab * 4
    # Saved by the chunked path: the gradients of hidden, weight and bias, nothing of size tokens x vocab.
    assert chunked_total <= (n * hidden + vocab * hidden + vocab) * 4
    assert chunked_largest < logits_bytes / 8
    assert plain_largest >= logits_bytes  # the plain path keeps the full log-softmax
    assert chunked_total < plain_total / 5


# --- CausalLMLoss on tiny HF models ------------------------------------------------------------------

def tiny_llama(dtype=torch.float64, vocab=VOCAB, seed=0, cls=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    return (cls or LlamaForCausalLM)(config).to(dtype)


def padded_batch(vocab=VOCAB, seed=0):
    """Right-padded rows with prompt masks; one row has no target at all."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts = [11, 7, 4, 9], [3, 0, 4, 5]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    for row, (length, prompt) in enumerate(zip(lengths, prompts)):
        ids = torch.randint(0, vocab, (length,), generator=g)
        input_ids[row, :length], attention_mask[row, :length] = ids, 1
        labels[row, prompt:length] = ids[prompt:]
    return input_ids, attention_mask, labels


def loss_and_grads(module, batch):
    params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    loss = module(*batch)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return loss.detach(), {name: g for (name, _), g in zip(params, grads)}


def assert_same(a, b, tolerance=1e-10):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert rel(loss_a, loss_b) <= tolerance
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert (grads_a[name] is None) == (grads_b[name] is None), name
        if grads_a[name] is not None:
            assert rel(grads_a[name], grads_b[name]) <= tolerance, name


@pytest.mark.parametrize("normalize", ["tokens", "samples"])
def test_causal_lm_loss_chunked_matches_logits(normalize):
    model = tiny_llama()
    batch = padded_batch()
    chunked = CausalLMLoss(model, normalize=normalize, chunk_size=5)
    plain = CausalLMLoss(model, normalize=normalize, chunked=False)
    assert chunked.uses_chunked_path and not plain.uses_chunked_path
    assert_same(loss_and_grads(chunked, batch), loss_and_grads(plain, batch))

    # And against the definition, written out here on the model's logits.
    input_ids, attention_mask, labels = batch
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                                reduction="none").view(labels.shape[0], -1)
    counts = (labels[:, 1:] != IGNORE).sum(1)
    expected = per_token.sum() if normalize == "tokens" else (per_token.sum(1) / counts.clamp(min=1)).sum()
    assert rel(chunked(*batch), expected) <= 1e-12


def _examples_of(batch):
    from gradaccum.data import Example

    input_ids, attention_mask, labels = batch
    return [Example(ids[mask.bool()].tolist(), lab[mask.bool()].tolist())
            for ids, mask, lab in zip(input_ids, attention_mask, labels)]


@pytest.mark.parametrize("chunked", [True, False])
def test_packed_batch_matches_padded_batch(chunked):
    """data.pack: one row, position_ids restarting per example, no attention_mask -- the same summed loss
    and gradients as the padded batch, because HF's sdpa mask keeps each example to itself."""
    from gradaccum.data import pack

    model = tiny_llama()
    padded = padded_batch()
    packed = pack(_examples_of(padded))
    loss = CausalLMLoss(model, chunked=chunked, chunk_size=5)
    as_packed = lambda: loss(packed["input_ids"], None, packed["labels"], position_ids=packed["position_ids"])  # noqa: E731
    params = [p for p in model.parameters()]
    want = torch.autograd.grad(loss(*padded), params)
    got_loss = as_packed()
    got = torch.autograd.grad(got_loss, params)
    assert rel(got_loss, loss(*padded)) <= 1e-10
    assert all(rel(g, w) <= 1e-10 for g, w in zip(got, want))
    # The check can fail: without the position restarts the examples attend to each other.
    leaky = loss(packed["input_ids"], None, packed["labels"])
    assert rel(leaky, loss(*padded)) > 1e-3
    with pytest.raises(ValueError, match="normalize"):
        CausalLMLoss(model, normalize="samples")(packed["input_ids"], None, packed["labels"],
                                                 position_ids=packed["position_ids"])


def test_causal_lm_loss_wrong_shift_differs():
    """The comparison above would catch a shift error: predicting label t (not t+1) at position t."""
    model = tiny_llama()
    input_ids, attention_mask, labels = padded_batch()
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
    unshifted = linear_cross_entropy_sum(hidden[rows, cols], model.lm_head.weight, labels[rows, cols])
    right = CausalLMLoss(model, chunk_size=5)(input_ids, attention_mask, labels)
    assert rel(unshifted, right) > 1e-3


def test_causal_lm_loss_without_targets():
    model = tiny_llama()
    input_ids, attention_mask, labels = padded_batch()
    labels = torch.full_like(labels, IGNORE)
    for normalize in ("tokens", "samples"):
        loss = CausalLMLoss(model, normalize=normalize)(input_ids, attention_mask, labels)
        assert float(loss.detach()) == 0.0
        loss.backward()
    assert torch.equal(model.lm_head.weight.grad, torch.zeros_like(model.lm_head.weight))


def test_causal_lm_loss_lora():
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B != 0, so every adapter weight gets a non-zero gradient.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    model = get_peft_model(tiny_llama(), config).to(torch.float64)
    batch = padded_batch()
    for normalize in ("tokens", "samples"):
        chunked = CausalLMLoss(model, normalize=normalize, chunk_size=4)
        assert chunked.uses_chunked_path, chunked.fallback_reason
        result = loss_and_grads(chunked, batch)
        assert all("lora_" in name for name in result[1]) and all(g.abs().sum() > 0 for g in result[1].values())
        assert_same(result, loss_and_grads(CausalLMLoss(model, normalize=normalize, chunked=False), batch))


def test_causal_lm_loss_lora_on_head_falls_back():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "lm_head"])
    model = get_peft_model(tiny_llama(), config).to(torch.float64)
    loss = CausalLMLoss(model, chunk_size=4)
    assert not loss.uses_chunked_path and "nn.Linear" in loss.fallback_reason
    batch = padded_batch()
    assert_same(loss_and_grads(loss, batch), loss_and_grads(CausalLMLoss(model, chunked=False), batch))


def test_logit_transforming_models_fall_back():
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):  # a head the chunked path cannot know about
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = tiny_llama(cls=ScaledLlama)
    loss = CausalLMLoss(model)
    assert not loss.uses_chunked_path and "overrides" in loss.fallback_reason
    batch = padded_batch()
    expected = token_loss_sum(model(input_ids=batch[0], attention_mask=batch[1]).logits, batch[2])
    assert rel(loss(*batch), expected) <= 1e-12

    scaled = tiny_llama()
    scaled.config.logit_scale = 0.25  # Cohere-style scaling named in the config
    assert "logit_scale" in CausalLMLoss(scaled).fallback_reason


def test_gemma2_softcapping_falls_back():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0,
                          attn_implementation="eager")
    model = Gemma2ForCausalLM(config).to(torch.float64)
    loss = CausalLMLoss(model)
    assert not loss.uses_chunked_path
    batch = padded_batch()
    expected = token_loss_sum(model(input_ids=batch[0], attention_mask=batch[1]).logits, batch[2])
    assert rel(loss(*batch), expected) <= 1e-12


class RawLogitsLM(nn.Module):
    """Not an HF model: ids [B, T] -> logits tensor [B, T, V] (no .logits attribute)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = torch.cumsum(self.embed(input_ids), dim=1)
        return self.head(torch.tanh(h))


def test_plain_module_takes_the_logits_path():
    """A non-HF module is never chunked (its internals are unknown): its returned logits are used."""
    torch.manual_seed(0)
    model = RawLogitsLM().double()
    batch = padded_batch()
    for normalize, reference in (("tokens", token_loss_sum), ("samples", sequence_mean_sum)):
        loss = CausalLMLoss(model, normalize=normalize)
        assert not loss.uses_chunked_path and "not a causal LM" in loss.fallback_reason
        assert rel(loss(*batch), reference(model(batch[0]), batch[2])) <= 1e-15


def test_model_without_logits_is_a_clear_error():
    class Dicty(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return {"scores": torch.zeros(*input_ids.shape, VOCAB)}

    with pytest.raises(ValueError, match="logits"):
        CausalLMLoss(Dicty())(*padded_batch())
    with pytest.raises(ValueError, match="normalize"):
        CausalLMLoss(Dicty(), normalize="mean")


def test_causal_lm_loss_saves_no_logits():
    """Module level: the plain path keeps [B, T-1, V] logits for backward, the chunked one does not."""
    vocab = 2048
    model = tiny_llama(torch.float32, vocab=vocab)
    batch = padded_batch(vocab=vocab)
    chunked_total, chunked_largest, _ = saved_bytes(lambda: CausalLMLoss(model)(*batch))
    plain_total, _, _ = saved_bytes(lambda: CausalLMLoss(model, chunked=False)(*batch))
    batch_size, width = batch[0].shape
    logits_bytes = batch_size * (width - 1) * vocab * 4
    assert plain_total - chunked_total >= logits_bytes
    # The largest thing the chunked path keeps is the head's weight itself (a parameter, not new memory).
    assert chunked_largest == model.lm_head.weight.numel() * 4


def test_data_parallel_wrappers_see_the_head():
    """Wrapped in DDP or FSDP2 (one rank, gloo), every parameter -- the head's included, read inside
    CausalLMLoss.forward -- gets exactly its gradient in the chunked path."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    model = tiny_llama()
    reference = loss_and_grads(CausalLMLoss(model, chunked=False), padded_batch())
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=0,
                                world_size=1)
        try:
            for wrapper in ("ddp", "fsdp2"):
                loss_module = CausalLMLoss(copy.deepcopy(model), chunk_size=5)
                if wrapper == "ddp":
                    wrapped = DistributedDataParallel(loss_module)
                else:
                    for layer in loss_module.model.model.layers:
                        fully_shard(layer)
                    wrapped = fully_shard(loss_module)
                assert loss_module.uses_chunked_path, loss_module.fallback_reason
                for _ in range(2):  # DDP's second iteration fails if the first left a parameter unreduced
                    loss_module.zero_grad(set_to_none=True)
                    loss = wrapped(*padded_batch())
                    loss.backward()
                grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                         for name, p in loss_module.named_parameters()}
                assert_same((loss.detach(), grads), reference)
        finally:
            dist.destroy_process_group()


def test_cuda_kernel_is_used_when_installed_and_falls_back_on_failure(monkeypatch):
    """The CUDA kernel hook, exercised on the CPU: a stand-in `cut_cross_entropy` module computes the
    token sum; CausalLMLoss must hand it the selected hidden states and give the built-in result."""
    import sys
    import types

    from gradaccum import losses

    calls = []

    def fake_linear_cross_entropy(e, c, targets, reduction="mean"):
        calls.append(e.shape[0])
        return F.cross_entropy(e @ c.T, targets, reduction=reduction)

    monkeypatch.setitem(sys.modules, "cut_cross_entropy",
                        types.SimpleNamespace(linear_cross_entropy=fake_linear_cross_entropy))
    monkeypatch.setattr(losses, "cuda_kernel_name", lambda: "cut_cross_entropy")
    monkeypatch.setattr(losses, "_on_cuda", lambda tensor: True)
    model = tiny_llama()
    batch = padded_batch()
    kernel = CausalLMLoss(model, chunk_size=5)
    assert kernel.head_kernel == "chunked; cut_cross_entropy on CUDA"
    assert_same(loss_and_grads(kernel, batch), loss_and_grads(CausalLMLoss(model, kernel="torch"), batch))
    assert calls == [int((batch[2][:, 1:] != IGNORE).sum())]

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setitem(sys.modules, "cut_cross_entropy", types.SimpleNamespace(linear_cross_entropy=broken))
    with pytest.warns(UserWarning, match="built-in chunked"):
        result = loss_and_grads(kernel, batch)
    assert kernel.head_kernel == "chunked"
    assert_same(result, loss_and_grads(CausalLMLoss(model, kernel="torch"), batch))
    with pytest.raises(ValueError, match="kernel"):
        CausalLMLoss(model, kernel="triton")
