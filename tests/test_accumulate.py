"""Equivalence is the headline: Accumulator == one full-batch step, and naive != it."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradaccum import Accumulator
from helpers import (IGNORE, TinyLM, accumulated, collate, full_batch_reference, logits_of, make_examples,
                     relative_error, tiny_llama)

EXACT_TOL = 1e-10  # float64


@st.composite
def windows_strategy(draw):
    """2-3 windows of variable-length, partly masked sequences, and a micro-batch split."""
    micro_batch_size = draw(st.integers(1, 3))
    accumulation_steps = draw(st.integers(2, 4))
    num_windows = draw(st.integers(2, 3))
    n = micro_batch_size * accumulation_steps * num_windows
    lengths = draw(st.lists(st.integers(2, 14), min_size=n, max_size=n))
    prompts = draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**16))
    examples = make_examples(lengths, prompts, seed)
    size = micro_batch_size * accumulation_steps
    windows = [examples[i:i + size] for i in range(0, n, size)]
    return windows, micro_batch_size


def _unequal_counts(windows, micro_batch_size) -> bool:
    for window in windows:
        counts = {int((collate(window[i:i + micro_batch_size])["labels"][:, 1:] != IGNORE).sum())
                  for i in range(0, len(window), micro_batch_size)}
        if len(counts) > 1:
            return True
    return False


def _check(model_factory, data, optimizer_kind, normalize="tokens"):
    windows, micro_batch_size = data
    model = model_factory()
    reference = full_batch_reference(model, windows, optimizer_kind, normalize)
    exact, stats = accumulated(model, windows, optimizer_kind, micro_batch_size, "exact", normalize)
    naive, _ = accumulated(model, windows, optimizer_kind, micro_batch_size, "naive", normalize)
    if all(s.skipped for s in stats):
        return
    err_exact = relative_error(exact, reference, model)
    assert err_exact <= EXACT_TOL, f"exact accumulation departs from the full batch: {err_exact:.3e}"
    if normalize == "tokens" and _unequal_counts(windows, micro_batch_size):
        # The same assertion must fail for naive accumulation: the test can tell them apart.
        err_naive = relative_error(naive, reference, model)
        assert err_naive > 1e3 * EXACT_TOL, f"naive unexpectedly matched the full batch ({err_naive:.3e})"


SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(data=windows_strategy(), optimizer_kind=st.sampled_from(["sgd", "adamw"]))
def test_plain_module_equals_full_batch(data, optimizer_kind):
    _check(lambda: TinyLM().double(), data, optimizer_kind)


@SETTINGS
@given(data=windows_strategy(), optimizer_kind=st.sampled_from(["sgd", "adamw"]))
def test_llama_equals_full_batch(data, optimizer_kind):
    _check(lambda: tiny_llama(torch.float64), data, optimizer_kind)


@settings(max_examples=10, deadline=None)
@given(data=windows_strategy(), optimizer_kind=st.sampled_from(["sgd", "adamw"]))
def test_samples_normalization_equals_full_batch(data, optimizer_kind):
    _check(lambda: TinyLM().double(), data, optimizer_kind, normalize="samples")


def _fixed_windows(num_windows=3, micro_batch_size=2, accumulation_steps=4):
    # Lengths from 3 to 40 and prompts of varying size: micro-batch counts differ a lot.
    n = num_windows * micro_batch_size * accumulation_steps
    lengths = [3 + (17 * i) % 38 for i in range(n)]
    prompts = [(5 * i) % 9 for i in range(n)]
    examples = make_examples(lengths, prompts, seed=1)
    size = micro_batch_size * accumulation_steps
    return [examples[i:i + size] for i in range(0, n, size)]


def test_naive_departs_and_exact_matches_in_float32():
    windows = _fixed_windows()
    model = tiny_llama(torch.float32)
    reference = full_batch_reference(model, windows, "sgd")
    exact, _ = accumulated(model, windows, "sgd", 1)
    naive, _ = accumulated(model, windows, "sgd", 1, "naive")
    assert relative_error(exact, reference, model) < 1e-5
    assert relative_error(naive, reference, model) > 1e-2


def test_samples_mode_differs_from_tokens_mode():
    windows = _fixed_windows()
    model = TinyLM().double()
    tokens = full_batch_reference(model, windows, "sgd", "tokens")
    samples, _ = accumulated(model, windows, "sgd", 2, normalize="samples")
    assert relative_error(samples, tokens, model) > 1e-3  # they are different objectives


def test_partial_last_window_is_exact_for_its_content():
    windows = _fixed_windows(num_windows=2, micro_batch_size=1, accumulation_steps=4)
    model = tiny_llama(torch.float64)
    # Ten micro-batches with K=4: windows of 4, 4, 2. The reference is built the same way.
    examples = [ex for window in windows for ex in window] + make_examples([9, 30], [2, 3], seed=5)
    full_windows = [examples[0:4], examples[4:8], examples[8:10]]
    reference = full_batch_reference(model, full_windows, "adamw")
    exact = copy.deepcopy(model)
    opt = torch.optim.AdamW(exact.parameters(), lr=1e-2, weight_decay=0.01)
    acc = Accumulator(exact, opt, accumulation_steps=4)
    sizes = []
    for window in acc.windows([collate([ex]) for ex in examples]):
        sizes.append(window.num_micro_batches)
        for batch in window:
            window.loss(logits_of(exact, batch), batch["labels"]).backward()
        window.step()
    assert sizes == [4, 4, 2]
    assert relative_error(exact, reference, model) < EXACT_TOL


def test_stats_loss_is_the_true_window_loss_in_both_modes():
    windows = _fixed_windows(num_windows=1)
    model = TinyLM().double()
    batch = collate(windows[0])
    logits = logits_of(model, batch)[:, :-1]
    labels = batch["labels"][:, 1:]
    true_loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                        ignore_index=IGNORE))
    for mode in ("exact", "naive"):
        _, stats = accumulated(model, windows, "sgd", 2, mode)
        assert stats[0].num_targets == int((labels != IGNORE).sum())
        assert math.isclose(stats[0].loss, true_loss, rel_tol=1e-12)
        assert stats[0].step == 1 and not stats[0].skipped


def test_micro_batch_with_zero_targets_is_fine():
    examples = make_examples([10, 12, 6, 20], [20, 3, 20, 1])  # 1st and 3rd fully masked
    model = TinyLM().double()
    reference = full_batch_reference(model, [examples], "sgd")
    exact, stats = accumulated(model, [examples], "sgd", 1)
    assert not stats[0].skipped and math.isfinite(stats[0].loss)
    assert relative_error(exact, reference, model) < EXACT_TOL
    naive, _ = accumulated(model, [examples], "sgd", 1, "naive")
    assert all(torch.isfinite(p).all() for p in naive.parameters())


def test_window_with_zero_targets_is_skipped_without_nan():
    masked = make_examples([5, 7], [10, 10])
    live = make_examples([9, 8], [2, 1], seed=3)
    model = TinyLM().double()
    before = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt, accumulation_steps=2)
    all_stats = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for window in acc.windows([collate([ex]) for ex in masked + live]):
            assert window.num_targets == (0 if window.index == 0 else 7 + 7)
            for batch in window:
                loss = window.loss(logits_of(model, batch), batch["labels"])
                assert torch.isfinite(loss)
                loss.backward()
            if window.index == 0:
                assert all(p.grad is None or not p.grad.any() for p in model.parameters())
                assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
            all_stats.append(window.step())
    assert any("no target tokens" in str(w.message) for w in caught)
    assert all_stats[0].skipped and all_stats[0].skip_reason == "no_targets" and all_stats[0].num_targets == 0
    assert not all_stats[1].skipped and all_stats[1].step == 1 and acc.num_skipped == 1


def test_clipping_happens_once_on_the_full_gradient():
    windows = _fixed_windows(num_windows=2)
    model = tiny_llama(torch.float64)
    reference = full_batch_reference(model, windows, "sgd", max_grad_norm=0.05)
    exact, stats = accumulated(model, windows, "sgd", 1, max_grad_norm=0.05)
    assert relative_error(exact, reference, model) < EXACT_TOL
    assert all(s.grad_norm > 0.05 for s in stats)  # clipping was active, not a no-op
    # Clipping each micro-batch instead (a common mistake) is visibly different.
    wrong = copy.deepcopy(model)
    opt = torch.optim.SGD(wrong.parameters(), lr=0.5)
    for window in windows:
        opt.zero_grad()
        for ex in window:
            batch = collate([ex])
            n = sum(int((collate([e])["labels"][:, 1:] != IGNORE).sum()) for e in window)
            from gradaccum.losses import token_loss_sum
            (token_loss_sum(logits_of(wrong, batch), batch["labels"]) / n).backward()
            torch.nn.utils.clip_grad_norm_(wrong.parameters(), 0.05)
        opt.step()
    assert relative_error(wrong, reference, model) > 1e-3


def test_grad_norm_is_before_clipping():
    windows = _fixed_windows(num_windows=1)
    model = TinyLM().double()
    _, unclipped = accumulated(model, windows, "sgd", 2)
    _, clipped = accumulated(model, windows, "sgd", 2, max_grad_norm=1e-3)
    assert math.isclose(unclipped[0].grad_norm, clipped[0].grad_norm, rel_tol=1e-12)


def test_scale_with_a_custom_summed_loss():
    """A user-defined summed loss (label-smoothed CE) through window.scale() equals its full batch."""
    windows = _fixed_windows(num_windows=2, micro_batch_size=1)
    model = TinyLM().double()

    def summed(logits, labels):
        logits, labels = logits[:, :-1], labels[:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum", label_smoothing=0.1)

    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for window in windows:
        batch = collate(window)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        opt.zero_grad()
        (summed(logits_of(reference, batch), batch["labels"]) / n).backward()
        opt.step()
    results = {}
    for mode in ("exact", "naive"):
        run = copy.deepcopy(model)
        acc = Accumulator(run, torch.optim.SGD(run.parameters(), lr=0.5), accumulation_steps=4,
                          accumulation=mode)
        for window in acc.windows([collate([ex]) for w in windows for ex in w]):
            assert window.num_targets > 0  # known before the first forward
            for batch in window:
                window.scale(summed(logits_of(run, batch), batch["labels"])).backward()
            window.step()
        results[mode] = relative_error(run, reference, model)
    assert results["exact"] < EXACT_TOL
    assert results["naive"] > 1e-3


def test_tuple_batches_and_count_fn():
    model = TinyLM().double()
    examples = make_examples([6, 9, 12, 4], [1, 2, 0, 3])
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2)
    tuples = [(collate([ex])["input_ids"], collate([ex])["labels"]) for ex in examples]
    assert [w.num_targets for w in _drain(acc, tuples)] == [5 + 7, 11 + 1]
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=4,
                      count_fn=lambda batch: 3)
    assert [w.num_targets for w in _drain(acc, tuples)] == [12]


def _drain(acc, batches):
    out = []
    for window in acc.windows(batches):
        out.append(window)
        window.step()
    return out


def test_forgetting_step_is_an_error():
    model = TinyLM().double()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=1)
    batches = [collate(make_examples([5], [0], seed=s)) for s in range(2)]
    with pytest.raises(RuntimeError, match="window.step"):
        for window in acc.windows(batches):
            pass


def test_nonfinite_gradient_skips_the_step():
    model = TinyLM().double()
    before = copy.deepcopy(model)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=1)
    with pytest.warns(UserWarning, match="gradient norm"):
        for window in acc.windows([collate(make_examples([6], [0]))]):
            for batch in window:
                (window.loss(logits_of(model, batch), batch["labels"]) * float("nan")).backward()
            stats = window.step()
    assert stats.skipped and stats.skip_reason == "nonfinite"
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_scheduler_steps_once_per_window():
    model = TinyLM().double()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    acc = Accumulator(model, opt, accumulation_steps=3, scheduler=sched)
    batches = [collate(make_examples([6], [0], seed=s)) for s in range(7)]
    lrs = []
    for window in acc.windows(batches):
        for batch in window:
            window.loss(logits_of(model, batch), batch["labels"]).backward()
        lrs.append(window.step().lr)
    assert lrs == [1.0, 0.5, 0.25] and acc.step == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"accumulation_steps": 0}, "accumulation_steps"),
    ({"accumulation_steps": 2.5}, "accumulation_steps"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"normalize": "mean"}, "normalize"),
    ({"accumulation": "sloppy"}, "accumulation"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    model = TinyLM()
    with pytest.raises(ValueError, match=match):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


class _RecordingSGD(torch.optim.SGD):
    """SGD that keeps, at each step, the gradients it was handed (float64 copies)."""

    def step(self, closure=None):
        self.seen = [p.grad.double().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _accumulated_grads_bf16(model, batches, accumulate_dtype):
    optimizer = _RecordingSGD(model.parameters(), lr=0.0)
    acc = Accumulator(model, optimizer, accumulation_steps=len(batches), accumulate_dtype=accumulate_dtype)
    for window in acc.windows(batches):
        for batch in window:
            window.loss(logits_of(model, batch).float(), batch["labels"]).backward()
        window.step()
    return optimizer.seen


def test_accumulate_dtype_float32_for_bf16_params_k16():
    # K = 16 micro-batches of 2 sequences with very different target counts, bf16 parameters. The
    # reference is the float32 model (same weights) over the same window, one exact mean.
    torch.manual_seed(0)
    lengths = [4 + (11 * i) % 37 for i in range(32)]
    examples = make_examples(lengths, [(5 * i) % 9 for i in range(32)], seed=3)
    batches = [collate(examples[i:i + 2]) for i in range(0, 32, 2)]
    bf16 = tiny_llama(torch.float32, seed=0).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()
    reference = _accumulated_grads_bf16(fp32, batches, None)

    def error(grads):
        num = sum(float((g - r).norm() ** 2) for g, r in zip(grads, reference))
        return (num / sum(float(r.norm() ** 2) for r in reference)) ** 0.5

    fp32_grads = Accumulator(bf16, torch.optim.SGD(bf16.parameters(), lr=0.0)).fp32_grads
    assert fp32_grads is not None and fp32_grads.accumulate_dtype == torch.float32  # "auto": on for bf16
    with_fp32 = error(_accumulated_grads_bf16(copy.deepcopy(bf16), batches, "auto"))
    without = error(_accumulated_grads_bf16(copy.deepcopy(bf16), batches, None))
    print(f"\nbf16 params, K=16, gradient vs float32 reference: accumulate_dtype=float32 {with_fp32:.2e}, "
          f"native bf16 .grad {without:.2e}")
    assert with_fp32 < 0.9 * without  # the K bf16 roundings of the running sum are gone
    assert Accumulator(fp32, torch.optim.SGD(fp32.parameters(), lr=0.0)).fp32_grads is None  # already fp32
    with pytest.raises(ValueError, match="accumulate_dtype"):
        Accumulator(bf16, torch.optim.SGD(bf16.parameters(), lr=0.0), accumulate_dtype="float32")


# ---- the float32 sums' lifetime: hooks live while a windows() loop runs ----------------------------

def _bf16_batches(num_batches=8, seed=11):
    examples = make_examples([4 + (5 * i) % 17 for i in range(num_batches)], [i % 3 for i in range(num_batches)],
                             seed=seed)
    return [collate([example]) for example in examples]


def _run_loop(acc, model, batches, fail_at=None):
    """One windows() loop; `fail_at=(window, micro_step)` raises after that micro-batch's backward."""
    stats = []
    for window in acc.windows(batches):
        for micro_step, batch in enumerate(window):
            window.loss(logits_of(model, batch).float(), batch["labels"]).backward()
            if fail_at == (window.index, micro_step):
                raise _Abandoned
        stats.append(window.step())
    return stats


class _Abandoned(Exception):
    pass


def _bf16_model():
    torch.manual_seed(0)
    return TinyLM().to(torch.bfloat16)


def _assert_native_grads_again(model, batch):
    """No float32 hook is left: a plain backward leaves its gradient in .grad."""
    model.zero_grad(set_to_none=True)
    logits_of(model, batch).float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_a_second_accumulator_on_the_same_bf16_model_trains():
    """One Accumulator per epoch (bf16 parameters, float32 sums): the second one trains like a single
    Accumulator over both epochs -- its gradients are not stolen by the first one's hooks."""
    batches = _bf16_batches()
    model = _bf16_model()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    ref_stats = _run_loop(Accumulator(reference, ref_opt, accumulation_steps=2), reference, batches)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = []
    for epoch in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        acc = Accumulator(model, opt, accumulation_steps=2)
        assert acc.fp32_grads is not None
        stats += _run_loop(acc, model, batches[4 * epoch:4 * epoch + 4])
        assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before)), f"epoch {epoch} trained nothing"
    assert [s.grad_norm for s in stats] == [s.grad_norm for s in ref_stats]
    assert all(s.grad_norm > 0 for s in stats)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    _assert_native_grads_again(model, batches[0])


def test_window_abandoned_by_an_exception_leaves_no_stale_sums():
    """An exception in the middle of a window (an OOM, say), caught by the caller, then a new loop: the
    float32 sums of the abandoned micro-batches must not leak into the next step."""
    batches = _bf16_batches()
    clean = _bf16_model()
    clean_stats = _run_loop(Accumulator(clean, torch.optim.SGD(clean.parameters(), lr=0.5), 4), clean, batches)
    model = _bf16_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.5), accumulation_steps=4)
    with pytest.raises(_Abandoned):
        _run_loop(acc, model, batches, fail_at=(0, 2))
    _assert_native_grads_again(model, batches[0])  # the loop's end removed the hooks
    stats = _run_loop(acc, model, batches)  # the retry
    assert [s.grad_norm for s in stats] == [s.grad_norm for s in clean_stats]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clean.parameters()))


def test_two_live_accumulators_on_the_same_bf16_params_are_refused():
    batches = _bf16_batches(2)
    model = _bf16_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first, second = Accumulator(model, opt, 1), Accumulator(model, opt, 1)
    loop = first.windows(batches)
    next(loop)  # the first loop is live, its hooks attached
    with pytest.raises(ValueError, match="another"):
        next(second.windows(batches))
    loop.close()  # ends the first loop: its hooks go
    assert len(_run_loop(second, model, batches)) == 2

    with Accumulator(model, opt, 1) as third:
        hanging = third.windows(batches)
        next(hanging)
    assert len(_run_loop(second, model, batches)) == 2  # leaving the `with` closed the third's loop
    with pytest.raises(RuntimeError, match="closed"):
        next(hanging)
    third.close()  # idempotent
    _assert_native_grads_again(model, batches[0])
