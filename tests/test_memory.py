"""memory.py: sizes, the micro-batch search, and the measured finder behind --micro-batch-size auto."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradaccum import memory
from gradaccum.data import Example
from gradaccum.losses import CausalLMLoss
from gradaccum.memory import (divisors, find_micro_batch_size, parse_size, peak_rss_bytes, reset_peak_rss,
                              search_micro_batch_size)
from helpers import tiny_llama

MIB = 2 ** 20
HAS_RESETTABLE_PEAK = os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)



# -- sizes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("4GB", 4 * 10 ** 9), ("4 GiB", 4 * 2 ** 30), ("4g", 4 * 2 ** 30), ("512MiB", 512 * 2 ** 20),
    ("512mb", 512 * 10 ** 6), ("1.5GB", 1_500_000_000), ("1000000", 1_000_000), (2 ** 20, 2 ** 20),
    ("64KiB", 65536), ("2TB", 2 * 10 ** 12),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "4 parsecs", "-1GB", "0", "4GBs", True, "1e999GB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_divisors():
    assert divisors(1) == [1]
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(16) == [1, 2, 4, 8, 16]
    assert divisors(7) == [1, 7]


# -- the search, with synthetic measurements ------------------------------------------------------

def _recording(peak_of):
    probed = []

    def probe(m):
        probed.append(m)
        return peak_of(m)

    return probe, probed


@pytest.mark.parametrize("batch", [1, 6, 12, 16, 24, 64, 96])
@pytest.mark.parametrize("limit", [1_050, 1_300, 2_000, 10 ** 9])
def test_search_finds_the_largest_fitting_divisor(batch, limit):
    def peak(m):  # affine in m, plus a convex term the linear fit does not know about
        return 1_000 + 40 * m + m * m // 4

    probe, probed = _recording(peak)
    result = search_micro_batch_size(divisors(batch), probe, limit)
    fitting = [m for m in divisors(batch) if peak(m) <= limit]
    assert result.micro_batch_size == max(fitting)
    assert batch % result.micro_batch_size == 0
    assert len(probed) == len(set(probed)) <= 2 + len(divisors(batch)).bit_length()


def test_search_never_probes_far_beyond_the_budget():
    # On the CPU a probe that does not fit is the OOM killer, not an exception: apart from the first
    # step up (the next divisor), only sizes predicted to fit may be probed.
    probe, probed = _recording(lambda m: 1_000 + 100 * m)
    result = search_micro_batch_size(divisors(1024), probe, 1_000 + 100 * 300)
    assert result.micro_batch_size == 256
    assert all(1_000 + 100 * m <= 1_000 + 100 * 300 for m in probed)


def test_search_treats_oom_as_not_fitting():
    probe, probed = _recording(lambda m: None if m > 4 else 100 * m)  # a CUDA OOM above 4
    assert search_micro_batch_size(divisors(32), probe, 10 ** 9).micro_batch_size == 4


def test_search_with_flat_measurements_doubles():
    # RSS noise can make peaks look flat: the search then doubles, one probe per step.
    probe, probed = _recording(lambda m: 5_000)
    assert search_micro_batch_size(divisors(16), probe, 10_000).micro_batch_size == 16
    assert probed == [1, 2, 4, 8, 16]


def test_search_raises_when_nothing_fits():
    with pytest.raises(ValueError, match="even a micro-batch of 1"):
        search_micro_batch_size([1, 2, 4], lambda m: 1_000 * m, 500)


# -- the finder, measured on a real model ----------------------------------------------------------

class WideVocabLM(nn.Module):
    """A small LM whose logits are large ([m, 256, 16384] float32 = 16 MiB per sequence), so each extra
    sequence in a micro-batch costs tens of MiB of activations: far above RSS noise."""

    def __init__(self, vocab: int = 16384, hidden: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.embed(input_ids)))


def _examples(n: int, length: int, vocab: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (max(2, length - 3 * i),), generator=g).tolist()
        out.append(Example(ids, [-100] * 2 + ids[2:]))
    return out


def _config(batch_size, budget=None):
    return SimpleNamespace(batch_size=batch_size, memory_budget=budget, dtype="float32")


def test_finder_picks_a_divisor_and_leaves_the_model_as_it_was(capsys):
    torch.manual_seed(0)
    model = tiny_llama(torch.float32)
    model.model.layers[0].mlp.register_module("drop", nn.Dropout(0.5))  # RNG must be restored too
    loss_module = CausalLMLoss(model)
    examples = _examples(12, 30, 48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    m = find_micro_batch_size(loss_module, examples, _config(12, "100GB"), torch.device("cpu"), pad_token_id=0)
    assert m == 12  # everything fits in 100 GB: the largest divisor of the batch, so accumulation 1
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(f"micro-batch size auto: {m} ")


def test_finder_keeps_existing_gradients():
    model = tiny_llama(torch.float32)
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, 0.25)
        grads[name] = p.grad
    find_micro_batch_size(CausalLMLoss(model), _examples(4, 20, 48), _config(4, "100GB"), "cpu", 0)
    assert all(p.grad is grads[name] and bool((p.grad == 0.25).all()) for name, p in model.named_parameters())


@pytest.mark.skipif(not HAS_RESETTABLE_PEAK, reason="needs a resettable peak RSS (Linux /proc/self/clear_refs)")
def test_a_smaller_budget_gives_a_smaller_micro_batch():
    torch.manual_seed(0)
    loss_module = CausalLMLoss(WideVocabLM(), chunked=False)
    examples = _examples(8, 256, 16384)
    device = torch.device("cpu")
    # Each sequence costs >= 3 x 16 MiB (logits, log-softmax, their gradient): 8 sequences >= 384 MiB more.
    roomy = find_micro_batch_size(loss_module, examples, _config(8, "100GB"), device, 0)
    # 200 MiB above what the process holds now, after the finder's 85% headroom: a budget set as a
    # plain "+ 200 MiB" would leave a room that shrinks as the test process grows (15% of all of it).
    baseline = memory.current_rss_bytes()
    tight = find_micro_batch_size(loss_module, examples, _config(8, int((baseline + 200 * MIB) / 0.85)), device, 0)
    assert roomy == 8
    assert 1 <= tight < roomy and 8 % tight == 0
    with pytest.raises(ValueError, match="memory budget"):
        find_micro_batch_size(loss_module, examples, _config(8, baseline // 2), device, 0)


def test_finder_validates_its_inputs():
    loss_module = CausalLMLoss(tiny_llama(torch.float32))
    with pytest.raises(ValueError, match="batch-size"):
        find_micro_batch_size(loss_module, _examples(4, 10, 48), _config(None), "cpu", 0)
    with pytest.raises(ValueError, match="no training examples"):
        find_micro_batch_size(loss_module, [], _config(4), "cpu", 0)
    with pytest.raises(ValueError, match="memory size"):
        find_micro_batch_size(loss_module, _examples(4, 10, 48), _config(4, "lots"), "cpu", 0)


@pytest.mark.skipif(not HAS_RESETTABLE_PEAK, reason="needs a resettable peak RSS (Linux /proc/self/clear_refs)")
def test_peak_rss_stays_a_whole_process_peak_after_a_reset():
    block = torch.ones(64 * MIB // 4)  # touch 64 MiB
    high = peak_rss_bytes()
    del block
    assert reset_peak_rss()
    assert peak_rss_bytes() >= high


def test_default_budget_is_a_fraction_of_this_machines_memory():
    budget = memory.default_budget_bytes("cpu")
    assert 0 < budget
    assert budget > memory.current_rss_bytes() * 0.5 or budget > 2 ** 30
