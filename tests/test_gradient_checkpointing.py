"""Activation checkpointing: the same gradients, exact accumulation, the LM head still chunked.

Every model here trains float64 windows of examples with 1 to 17 targets each through the
Accumulator with checkpointing switched on (models.enable_gradient_checkpointing), and is compared
with the full batch taken in one step *without* checkpointing: exact stays within 1e-9 of it, naive
departs. Layer recomputation is counted, so a test cannot pass with checkpointing silently off.
"""

from __future__ import annotations

import copy
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
from torch import nn

from gradaccum import Accumulator
from gradaccum.data import Example, pack
from gradaccum.losses import CausalLMLoss
from gradaccum.models import (ModelError, disable_gradient_checkpointing, enable_gradient_checkpointing,
                              gradient_checkpointing_enabled)
from helpers import VOCAB, collate, full_batch_reference, make_examples, relative_error
from helpers import tiny_llama


class BlockLM(nn.Module):
    """A causal LM that is not a transformers model: its layers are an nn.ModuleList of blocks."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 16, num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, dropout) for _ in range(num_layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class Block(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h):
        # A causal running mean: each position depends on its prefix only.
        mean = torch.cumsum(h, dim=1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return h + self.drop(torch.tanh(self.mix(self.norm(mean))))


def block_lm(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return BlockLM(**kwargs).double()


def lora_llama():
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B != 0, so the adapters' gradients are not zero at the first step.
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   lora_dropout=0.0, init_lora_weights=False))


def count_recomputes(model: nn.Module) -> dict:
    """Count how often each repeated layer's first submodule runs: once per forward, again per recompute."""
    counter = {"calls": 0}
    layers = [m for m in model.modules() if isinstance(m, nn.ModuleList)][0]
    for layer in layers:
        first = next(layer.children())
        first.register_forward_pre_hook(lambda *_: counter.__setitem__("calls", counter["calls"] + 1))
    counter["layers"] = len(layers)
    return counter


# Two windows of 4 examples; lengths 4..18, prompts of 0..3 tokens.
LENGTHS = [[5, 18, 9, 4], [12, 7, 16, 6]]
PROMPTS = [[3, 0, 2, 1], [1, 3, 0, 2]]


def windows():
    return [make_examples(lengths, prompts, seed=w) for w, (lengths, prompts) in enumerate(zip(LENGTHS, PROMPTS))]


def accumulated(model, data, micro_batch_size: int, accumulation: str = "exact", packing: bool = False,
                checkpointing: bool = True):
    """Train a copy of `model` on `data` through the Accumulator and CausalLMLoss."""
    from helpers import make_optimizer

    model = copy.deepcopy(model)
    counter = count_recomputes(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    loss_module = CausalLMLoss(model, chunk_size=7)
    acc = Accumulator(loss_module, make_optimizer("adamw", model), accumulation_steps=len(data[0]) // micro_batch_size,
                      accumulation=accumulation)
    batches = []
    for window in data:
        for i in range(0, len(window), micro_batch_size):
            part = window[i:i + micro_batch_size]
            if packing:
                batches.append(pack([Example(ids.tolist(), labels.tolist()) for ids, labels in part]))
            else:
                batches.append(collate(part))
    for window in acc.windows(batches):
        for batch in window:
            extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
            summed = loss_module(batch["input_ids"], batch.get("attention_mask"), batch["labels"], **extra)
            window.scale(summed).backward()
        window.step()
    return model, counter


MODELS = {"llama": tiny_llama, "lora": lora_llama, "block": block_lm}


@pytest.mark.parametrize("name,packing", [("llama", False), ("llama", True), ("lora", False), ("block", False)])
def test_exact_with_checkpointing_equals_the_full_batch(name, packing):
    initial = MODELS[name]()
    data = windows()
    reference = full_batch_reference(initial, data, "adamw")  # no checkpointing, one step per window
    micro_batch_size = 2 if packing else 1  # a packed micro-batch holds 2 examples in one row
    exact, counter = accumulated(initial, data, micro_batch_size, packing=packing)
    naive, _ = accumulated(initial, data, micro_batch_size, accumulation="naive", packing=packing)
    # Every layer ran in each micro-batch's forward, and once more in its backward.
    assert counter["calls"] == 2 * (8 // micro_batch_size) * counter["layers"]
    error, naive_error = relative_error(exact, reference, initial), relative_error(naive, reference, initial)
    print(f"\n{name}{' packed' if packing else ''}: exact {error:.1e}, naive {naive_error:.1e}")
    assert error < 1e-9
    assert naive_error > 1e-3


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointed_gradients_are_the_plain_ones(name):
    """Checkpointing changes memory, not arithmetic: the gradients are the same bits."""
    model = MODELS[name]()
    batch = collate(windows()[0])
    grads = []
    for on in (False, True):
        (enable_gradient_checkpointing if on else disable_gradient_checkpointing)(model)
        assert gradient_checkpointing_enabled(model) == on
        model.zero_grad()
        CausalLMLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_dropout_masks_are_replayed_and_the_rng_advances_as_without():
    model = block_lm(dropout=0.3)
    batch = collate(windows()[0])
    grads, states = [], []
    for on in (False, True):
        if on:
            enable_gradient_checkpointing(model)
        model.zero_grad()
        torch.manual_seed(1)
        CausalLMLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        states.append(torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(*states)


def test_state_dict_names_are_unchanged_and_switching_off_restores_the_classes():
    model = block_lm()
    names, classes = list(model.state_dict()), [type(m) for m in model.modules()]
    assert "activation checkpointing" in enable_gradient_checkpointing(model)
    assert list(model.state_dict()) == names
    assert type(model.blocks[0]) is not Block and isinstance(model.blocks[0], Block)
    copy.deepcopy(model)  # the swapped classes survive copying
    disable_gradient_checkpointing(model)
    assert [type(m) for m in model.modules()] == classes


def test_a_model_without_layers_is_refused():
    from helpers import TinyLM

    with pytest.raises(ModelError, match="no nn.ModuleList"):
        enable_gradient_checkpointing(TinyLM())


class BatchNormBlock(Block):
    """A block whose norm keeps running statistics: BatchNorm updates them in every training forward."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__(hidden, dropout)
        self.norm = nn.BatchNorm1d(hidden)

    def forward(self, h):
        return h + torch.tanh(self.mix(self.norm(h.transpose(1, 2)).transpose(1, 2)))


def batch_norm_lm():
    model = block_lm()
    model.blocks[1] = BatchNormBlock(16, 0.0).double()
    return model


def _train_once(model):
    batch = collate(windows()[0])
    CausalLMLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()
    return {name: b.clone() for name, b in model.named_buffers()}


def test_a_recompute_would_update_running_statistics_twice_so_such_layers_are_refused():
    """The generic path recomputes each layer's forward in backward: a train-mode BatchNorm inside would update
    its running mean, variance and num_batches_tracked twice. Refused by name; frozen (eval-mode) statistics
    are exact and allowed, and switching them back to training after enabling is refused at the forward."""
    from torch.utils.checkpoint import checkpoint

    plain = _train_once(batch_norm_lm())
    bypassed = batch_norm_lm()  # what enabling did before: the layer's forward checkpointed, nothing checked
    layer_forward = bypassed.blocks[1].forward
    bypassed.blocks[1].forward = lambda h: checkpoint(layer_forward, h, use_reentrant=False)
    assert int(_train_once(bypassed)["blocks.1.norm.num_batches_tracked"]) == 2 != \
        int(plain["blocks.1.norm.num_batches_tracked"])

    model = batch_norm_lm()
    with pytest.raises(ModelError, match=r"^--gradient-checkpointing: blocks\.1\.norm \(BatchNorm1d\) updates running "
                                         r"statistics .*twice.*eval\(\)"):
        enable_gradient_checkpointing(model)
    assert not gradient_checkpointing_enabled(model)

    frozen, checked = batch_norm_lm(), batch_norm_lm()
    frozen.blocks[1].norm.eval()
    checked.blocks[1].norm.eval()
    enable_gradient_checkpointing(checked)
    counter = count_recomputes(checked)
    buffers = _train_once(checked)
    assert counter["calls"] == 2 * counter["layers"]  # recomputed: checkpointing is on
    assert all(torch.equal(buffers[k], b) for k, b in _train_once(frozen).items())
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(checked.parameters(), frozen.parameters()))
    checked.train()
    with pytest.raises(ModelError, match=r"BatchNormBlock's norm \(BatchNorm1d\) updates running statistics"):
        _train_once(checked)


def test_transformers_layers_with_running_statistics_are_refused_and_left_unchecked():
    """transformers' own checkpointing recomputes its layers too: a BatchNorm inside one (the conformer's
    convolution module) is refused by name, and checkpointing is switched back off."""
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel

    config = Wav2Vec2ConformerConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     conv_dim=(8,), conv_stride=(5,), conv_kernel=(10,), num_conv_pos_embeddings=4,
                                     num_conv_pos_embedding_groups=2, conv_depthwise_kernel_size=3)
    model = Wav2Vec2ConformerModel(config)
    with pytest.raises(ModelError, match=r"encoder\.layers\.0\.conv_module\.batch_norm \(BatchNorm1d\)"):
        enable_gradient_checkpointing(model)
    assert not gradient_checkpointing_enabled(model)
    model.encoder.layers[0].conv_module.batch_norm.eval()  # frozen statistics: a recompute changes nothing
    assert "transformers' own" in enable_gradient_checkpointing(model)


# ---------------------------------------------------------------------------------------------
# The LM head stays chunked


def vocabulary_tensors(fn, vocab: int) -> list[tuple[int, ...]]:
    """Shapes of every tensor created while fn() runs (forward, backward and recomputes alike) whose last
    dimension is the vocabulary: logits, or a chunk of them."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    shapes = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes.extend(tuple(x.shape) for x in tree_leaves(out)
                          if torch.is_tensor(x) and x.dim() >= 2 and x.shape[-1] == vocab)
            return out

    with Watch():
        fn()
    return shapes


@pytest.mark.parametrize("name", ["llama", "lora"])
def test_lm_head_stays_chunked_under_checkpointing(name):
    model = MODELS[name]()
    enable_gradient_checkpointing(model)
    batch = collate(windows()[0] + windows()[1])  # 8 rows of up to 18 tokens: 70 targets
    chunk = 8
    counter = count_recomputes(model)

    def step(chunked):
        loss = CausalLMLoss(model, chunk_size=chunk, chunked=chunked)
        loss(batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()

    shapes = vocabulary_tensors(lambda: step(True), VOCAB)
    assert counter["calls"] == 2 * counter["layers"]  # checkpointing was on
    # Chunks of logits [chunk, vocab], and the head's weight seen as [hidden, vocab]; never one row per
    # target (70 of them) or per position.
    hidden = model.get_input_embeddings().embedding_dim
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert chunk < hidden < targets
    assert shapes and max(math.prod(s[:-1]) for s in shapes) <= hidden, shapes
    assert max(math.prod(s[:-1]) for s in shapes if s[0] != hidden) <= chunk
    # The check can fail: the plain head builds [rows, time, vocab] logits.
    plain = vocabulary_tensors(lambda: step(False), VOCAB)
    assert max(math.prod(s[:-1]) for s in plain) >= batch["input_ids"].numel()


# ---------------------------------------------------------------------------------------------
# The micro-batch finder measures what will run


def test_finder_probes_with_checkpointing_and_measures_less():
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradaccum.memory import predicted_peaks

    torch.manual_seed(0)
    # Activations (4 layers x 8 x 512 tokens) outweigh the weights (~1M parameters) many times over.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         attn_implementation="sdpa"))
    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, ids) for ids in torch.randint(0, 256, (8, 512), generator=g).tolist()]
    loss_module = CausalLMLoss(model)
    counter = count_recomputes(model)
    plain = predicted_peaks(loss_module, examples, [8], gradient_checkpointing=False)[8]
    assert counter["calls"] == counter["layers"]
    counter["calls"] = 0
    checkpointed = predicted_peaks(loss_module, examples, [8], gradient_checkpointing=True)[8]
    assert counter["calls"] == 2 * counter["layers"]  # the probe recomputed every layer
    assert not gradient_checkpointing_enabled(model)  # and left the model as it was
    print(f"\npredicted peak: {plain / 2**20:.0f} MiB plain, {checkpointed / 2**20:.0f} MiB checkpointed")
    assert checkpointed < plain - 40 * 2 ** 20
    # A model with checkpointing on is probed with it when nothing is said.
    enable_gradient_checkpointing(model)
    counter["calls"] = 0
    predicted_peaks(loss_module, examples, [1])
    assert counter["calls"] == 2 * counter["layers"] and gradient_checkpointing_enabled(model)


# ---------------------------------------------------------------------------------------------
# FSDP2 on 2 gloo ranks, checkpointing switched on before fully_shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_train(name: str, rank: int, accumulation: str) -> dict:
    import torch.distributed as dist

    from gradaccum import distributed
    from helpers import make_optimizer

    model = MODELS[name]()
    enable_gradient_checkpointing(model)
    counter = count_recomputes(model)
    wrapped = distributed.wrap(CausalLMLoss(model, chunk_size=7), fsdp=True, device=torch.device("cpu"))
    acc = Accumulator(wrapped, make_optimizer("adamw", model), accumulation_steps=2, accumulation=accumulation)
    # Rank r takes examples r and r + 2 of each window: the full window is split over 2 ranks x 2 micro-batches.
    batches = [collate([window[i]]) for window in windows() for i in (rank, rank + 2)]
    for window in acc.windows(batches):
        for batch in window:
            window.scale(wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"])).backward()
        window.step()
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in model.named_parameters()}
    dist.barrier()
    return {"state": state, "calls": counter["calls"], "layers": counter["layers"]}


def _fsdp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    results = {}
    try:
        for name in ("llama", "block"):
            for accumulation in ("exact", "naive"):
                try:
                    results[f"{name}-{accumulation}"] = _fsdp_train(name, rank, accumulation)
                except Exception as error:  # recorded, so one failure does not hide the others
                    results[f"{name}-{accumulation}"] = {"error": f"{type(error).__name__}: {error}"}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort in static destructors at interpreter exit


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("fsdp_checkpointing")
    mp.start_processes(_fsdp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("name", ["llama", "block"])
def test_fsdp2_with_checkpointing_equals_the_full_batch(fsdp_results, name):
    initial = MODELS[name]()
    reference = full_batch_reference(initial, windows(), "adamw")
    for rank, results in enumerate(fsdp_results):
        exact, naive = results[f"{name}-exact"], results[f"{name}-naive"]
        assert "error" not in exact, exact["error"]
        assert exact["calls"] == 2 * 4 * exact["layers"]  # 4 micro-batches per rank, each recomputed
        error, naive_error = (_state_error(r["state"], reference, initial) for r in (exact, naive))
        print(f"\nFSDP2 {name} rank {rank}: exact {error:.1e}, naive {naive_error:.1e}")
        assert error < 1e-9 and naive_error > 1e-3


def _state_error(state: dict, reference: nn.Module, initial: nn.Module) -> float:
    ref, init = dict(reference.named_parameters()), dict(initial.named_parameters())
    diff = sum(float((state[n] - ref[n].detach()).pow(2).sum()) for n in ref)
    update = sum(float((ref[n].detach() - init[n].detach()).pow(2).sum()) for n in ref)
    return (diff / update) ** 0.5


# ---------------------------------------------------------------------------------------------
# HF Trainer's own gradient_checkpointing=True under make_exact


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames it activation_checkpointing
@pytest.mark.parametrize("name,kwargs", [("llama", None), ("llama", {"use_reentrant": True}), ("peft", None),
                                         ("bart", None)])
def test_make_exact_with_trainers_gradient_checkpointing(tmp_path, name, kwargs):
    from test_hf import causal_lm, lm_examples, train

    initial, data = causal_lm(name), lm_examples()  # 12 examples: windows of 8 and 4
    recomputes = {"calls": 0}  # runs of layer 0 inside a backward pass; the hook is copied with the model

    def count(*_):
        recomputes["calls"] += torch._C._current_graph_task_id() != -1

    layers = next(m for m in initial.modules() if isinstance(m, nn.ModuleList))
    next(layers[0].children()).register_forward_pre_hook(count)
    big, _, _ = train(initial, data, tmp_path, 8, 1)  # the big batch, no checkpointing
    assert recomputes["calls"] == 0
    exact, _, trainer = train(initial, data, tmp_path, 2, 4, gradient_checkpointing=True,
                              gradient_checkpointing_kwargs=kwargs)
    assert recomputes["calls"] == 6  # one recompute in each of the 6 micro-batches' backward
    assert (trainer._gradaccum.head_path == "chunked") == (name != "bart"), trainer._gradaccum.head_path
    error = _model_error(exact, big, initial)
    plain, _, _ = train(initial, data, tmp_path, 2, 4, exact=False, gradient_checkpointing=True)
    plain_error = _model_error(plain, big, initial)
    print(f"\n{name} {kwargs}: make_exact {error:.1e}, plain Trainer {plain_error:.1e}")
    assert error <= 1e-9
    if name == "bart":  # the control: plain Trainer drops the count for BART
        assert plain_error > 0.1


def _model_error(model, reference, initial) -> float:
    params = lambda m: [p.detach() for p in m.parameters()]  # noqa: E731
    diff = sum(float((a - b).pow(2).sum()) for a, b in zip(params(model), params(reference)))
    update = sum(float((b - c).pow(2).sum()) for b, c in zip(params(reference), params(initial)))
    return (diff / update) ** 0.5


def test_cli_gradient_checkpointing_ends_with_the_same_weights(tmp_path, capsys):
    """`gradaccum train --gradient-checkpointing` (tiny preset, float64, 3 steps) ends with the weights of
    the same run without it, to 1e-9; the log says checkpointing was on, so it cannot pass switched off."""
    import json

    from safetensors.torch import load_file

    from gradaccum.cli import main
    from gradaccum.models import load_model

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + {i % 5} =", "completion": f" {i + i % 5}" * (1 + i % 3)})
                            + "\n" for i in range(12)))
    finals = {}
    for flag in ([], ["--gradient-checkpointing"]):
        out = tmp_path / ("on" if flag else "off")
        code = main(["train", "--data", str(data), "--output", str(out), "--no-progress", "--dtype", "float64",
                     "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2", "--eval-every", "0",
                     "--save-every", "0", *flag])
        log = capsys.readouterr().out
        assert code == 0, log[-2000:]
        assert ("activation checkpointing:" in log) == bool(flag), log[-2000:]
        finals[bool(flag)] = load_file(str(out / "final" / "model.safetensors"))
    initial = load_model("tiny", dtype=torch.float64)[0].state_dict()
    assert finals[True].keys() == finals[False].keys() and finals[False].keys() <= initial.keys()
    # ||w_on - w_off|| / ||w_off - w_0||: relative to what the 3 steps changed
    diff = sum(float((finals[True][k] - finals[False][k]).pow(2).sum()) for k in finals[False])
    update = sum(float((finals[False][k] - initial[k]).pow(2).sum()) for k in finals[False])
    assert update > 0 and (diff / update) ** 0.5 < 1e-9, (diff, update)
    config = json.loads((tmp_path / "on" / "run_config.json").read_text())
    assert config["gradient_checkpointing"] is True
