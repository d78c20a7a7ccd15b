"""precision.py: float32 gradient accumulation for bf16 parameters, against float32/float64 references."""

from __future__ import annotations

import copy

import pytest
import torch

from gradaccum.precision import FP32GradAccumulation
from helpers import collate, logits_of, make_examples, one_thread, tiny_llama
from gradaccum.losses import count_targets, token_loss_sum

K = 16  # micro-batches per window



def _micro_batches():
    # 16 micro-batches of 2 sequences, 4 to 40 tokens, varying prompt masks: the micro-batches
    # contribute gradients of very different sizes, as in real windows.
    n = 2 * K
    examples = make_examples([4 + (11 * i) % 37 for i in range(n)], [(5 * i) % 9 for i in range(n)], seed=3)
    return [collate(examples[i:i + 2]) for i in range(0, n, 2)]


def _backward_window(model, batches, num_targets):
    for batch in batches:
        loss = token_loss_sum(logits_of(model, batch).float(), batch["labels"]) / num_targets
        loss.backward()


def _grads(model, dtype=torch.float64):
    return {name: p.grad.to(dtype) for name, p in model.named_parameters()}


def _rel_error(grads, reference):
    num = sum(float((grads[k] - reference[k]).double().norm() ** 2) for k in reference)
    den = sum(float(reference[k].double().norm() ** 2) for k in reference)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def measured():
    torch.manual_seed(0)
    batches = _micro_batches()
    num_targets = sum(count_targets(b["labels"]) for b in batches)
    bf16 = tiny_llama(torch.float32, seed=0).to(torch.bfloat16)

    # References: (a) the float32 model (the bf16 weights, upcast) over the same window, gradients
    # summed in float32 -- the big batch in float32; (b) the exact (float64) sum of the very bf16
    # micro-batch gradients the bf16 model computes -- isolates the error of the accumulation itself.
    fp32 = copy.deepcopy(bf16).float()
    _backward_window(fp32, batches, num_targets)
    ref_fp32 = _grads(fp32)
    exact_sum = None
    for batch in batches:
        bf16.zero_grad(set_to_none=True)
        _backward_window(bf16, [batch], num_targets)
        one = _grads(bf16)
        exact_sum = one if exact_sum is None else {k: exact_sum[k] + one[k] for k in one}

    # Without: autograd adds each micro-batch into the bf16 .grad.
    bf16.zero_grad(set_to_none=True)
    _backward_window(bf16, batches, num_targets)
    naive = _grads(bf16)

    # With: float32 buffers, cast once at the end.
    bf16.zero_grad(set_to_none=True)
    with FP32GradAccumulation(bf16.parameters()) as acc:
        _backward_window(bf16, batches, num_targets)
        assert all(p.grad is None for p in bf16.parameters())  # bf16 grads freed by the hook
        names = {id(p): name for name, p in bf16.named_parameters()}
        fp32_sums = {names[id(p)]: g.double() for p, g in acc.grads().items()}
        acc.flush()
    cast_once = _grads(bf16)
    assert all(p.grad.dtype == torch.bfloat16 for p in bf16.parameters())

    errors = {
        "bf16 .grad accumulation (without)": (_rel_error(naive, exact_sum), _rel_error(naive, ref_fp32)),
        "fp32 accumulation, cast to bf16 once (with)": (_rel_error(cast_once, exact_sum),
                                                        _rel_error(cast_once, ref_fp32)),
        "fp32 accumulation, the fp32 sums": (_rel_error(fp32_sums, exact_sum), _rel_error(fp32_sums, ref_fp32)),
    }
    print(f"\nrelative L2 error of the accumulated gradient, bf16 tiny Llama, K={K} micro-batches:")
    print(f"{'':48s} {'vs exact sum of bf16 grads':>28s} {'vs float32 model':>18s}")
    for name, (e_exact, e_fp32) in errors.items():
        print(f"{name:48s} {e_exact:28.2e} {e_fp32:18.2e}")
    return errors


def test_fp32_accumulation_is_clearly_more_accurate(measured):
    naive_exact, naive_fp32 = measured["bf16 .grad accumulation (without)"]
    once_exact, once_fp32 = measured["fp32 accumulation, cast to bf16 once (with)"]
    sums_exact, sums_fp32 = measured["fp32 accumulation, the fp32 sums"]
    # The accumulation alone: K roundings in bf16 vs one.
    assert once_exact < naive_exact / 2
    assert sums_exact < 1e-5 < naive_exact
    # Everything included (the bf16 forward/backward is the same on both sides).
    assert once_fp32 < naive_fp32
    assert sums_fp32 < naive_fp32


def _model_and_window():
    torch.manual_seed(1)
    model = tiny_llama(torch.float32, seed=1).to(torch.bfloat16)
    batches = _micro_batches()[:4]
    return model, batches, sum(count_targets(b["labels"]) for b in batches)


def test_flush_clips_in_fp32_like_clip_grad_norm():
    model, batches, n = _model_and_window()
    # A float32 parameter of the same optimizer (e.g. a norm kept in float32): no hook, but it counts
    # in the norm and is clipped with the rest.
    extra = torch.nn.Parameter(torch.ones(3))
    extra.grad = torch.full((3,), 0.5)
    with FP32GradAccumulation([*model.parameters(), extra]) as acc:
        assert id(extra) not in {id(p) for p in acc.params}
        _backward_window(model, batches, n)
        sums = {p: g.clone() for p, g in acc.grads().items()}
        norm = acc.flush(max_norm=1e-3, all_params=[*model.parameters(), extra])
    expected_norm = float(torch.cat([g.double().flatten() for g in sums.values()]
                                    + [torch.full((3,), 0.5, dtype=torch.float64)]).norm())
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    scale = 1e-3 / (expected_norm + 1e-6)
    for p, g in sums.items():
        assert torch.equal(p.grad, (g * scale).to(torch.bfloat16))
    torch.testing.assert_close(extra.grad, torch.full((3,), 0.5 * scale), rtol=1e-6, atol=0)


def test_write_through_puts_the_sum_in_grad_for_the_reduction():
    model, batches, n = _model_and_window()
    with FP32GradAccumulation(model.parameters()) as acc:
        _backward_window(model, batches, n)
        acc.flush()
        expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with FP32GradAccumulation(model.parameters()) as acc:
        _backward_window(model, batches[:-1], n)
        acc.write_through = True  # the last micro-batch: DDP/FSDP reduce what its backward leaves in .grad
        _backward_window(model, batches[-1:], n)
        assert not acc.active
        assert all(torch.equal(p.grad, expected[name]) for name, p in model.named_parameters())
        assert acc.flush() > 0


def test_detach_restores_native_accumulation_and_zero_drops_the_sums():
    model, batches, n = _model_and_window()
    acc = FP32GradAccumulation(model.parameters())
    _backward_window(model, batches[:1], n)
    assert acc.active
    acc.zero()
    assert not acc.active and all(p.grad is None for p in model.parameters())
    acc.detach()
    _backward_window(model, batches[:1], n)
    assert all(p.grad is not None for p in model.parameters())


def test_rejects_half_precision_buffers_and_param_groups():
    model = tiny_llama(torch.float32).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or float64"):
        FP32GradAccumulation(model.parameters(), accumulate_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="param groups"):
        FP32GradAccumulation(torch.optim.SGD(model.parameters(), lr=1).param_groups)
