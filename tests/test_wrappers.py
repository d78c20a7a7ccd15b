"""Every data-parallel wrapper the Accumulator accepts gives the full batch, or it refuses.

Gloo ranks on the CPU, float64. Rank 0's sequences have 1 target token each and rank 1's about
20, so any mistake in the global count or in the world-size factor moves the step by several
percent. Workers are spawned once per fixture and run every case in turn; each case's weights,
losses and gradient norms are compared with one process taking the whole window as one batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradaccum import Accumulator
from helpers import TinyLM, collate, logits_of, make_examples

MAX_GRAD_NORM = 0.5  # below every window's gradient norm here, so clipping is active
ACCUMULATION_STEPS = 4  # micro-batches of one sequence


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_examples(rank: int, num_per_window: list[int]):
    """Windows of one rank: even ranks 1 target per sequence, odd ranks ~20."""
    windows = []
    for w, n in enumerate(num_per_window):
        if rank % 2 == 0:
            lengths = [6 + (3 * i + w) % 5 for i in range(n)]
            prompts = [length - 1 for length in lengths]  # one target after the causal shift
        else:
            lengths = [21 + (5 * i + w) % 4 for i in range(n)]
            prompts = [1 + i % 3 for i in range(n)]
        windows.append(make_examples(lengths, prompts, seed=100 * rank + w))
    return windows


# Examples per window and rank: the last window is partial and uneven (3 micro-batches vs 1).
SHAPE = [4, 4, 3], [4, 4, 1]


def _data(ranks: list[int]):
    """Per-rank windows for `ranks`, and the full-batch windows they add up to."""
    per_rank = {r: _rank_examples(r, SHAPE[r % 2]) for r in ranks}
    full = [sum((per_rank[r][w] for r in ranks), []) for w in range(len(SHAPE[0]))]
    return per_rank, full


def _new_model():
    torch.manual_seed(0)
    return TinyLM().double()


@functools.lru_cache(maxsize=None)
def _reference(ranks: tuple[int, ...]):
    return reference(list(ranks))


def reference(ranks: list[int]):
    """One process, one optimizer step per window on the whole window: weights, losses, norms."""
    model = _new_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses, norms = [], []
    for window in _data(ranks)[1]:
        batch = collate(window)
        logits, labels = logits_of(model, batch)[:, :-1], batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)))
        opt.step()
        losses.append(float(loss.detach()))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, norms


# -- the wrappers -------------------------------------------------------------------------------

def _fsdp1(model, **kwargs):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), **kwargs)


def _fsdp2(model, mesh=None):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard(model, mesh=mesh)


def _compiled_ddp(model, group=None):
    from torch.nn.parallel import DistributedDataParallel

    return torch.compile(DistributedDataParallel(model, process_group=group), backend="eager")


def _wrap(case: str, model, groups):
    from torch.nn.parallel import DistributedDataParallel

    if case == "ddp":
        return DistributedDataParallel(model), {}
    if case == "ddp_naive":  # the per-micro-batch mean, averaged by DDP: what the checks must catch
        return DistributedDataParallel(model), {"accumulation": "naive"}
    if case == "compiled_ddp":
        return _compiled_ddp(model), {}
    if case == "fsdp1":
        return _fsdp1(model), {}
    if case == "fsdp1_orig_params":  # the optimizer sees each rank's pieces of the original parameters
        return _fsdp1(model, use_orig_params=True), {}
    if case == "fsdp2":
        return _fsdp2(model), {}
    if case.startswith("hsdp"):  # hsdp_RxS: R replicas of S shards
        from torch.distributed.device_mesh import init_device_mesh

        replicas, shards = map(int, case[5:].split("x"))
        return _fsdp2(model, init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("replicate", "shard"))), {}
    if case == "fsdp1_hybrid":  # FSDP1 HYBRID_SHARD: shard within groups["pair"], replicate across
        from torch.distributed.fsdp import ShardingStrategy

        return _fsdp1(model, sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                      process_group=(groups["pair"], groups["across"])), {}
    if case == "ddp_subgroup":
        return DistributedDataParallel(model, process_group=groups["pair"]), {}
    if case == "compiled_ddp_subgroup":
        return _compiled_ddp(model, groups["pair"]), {}
    if case == "manual":  # no wrapper: the loop all-reduces (sums) the gradients itself
        return model, {"process_group": dist.group.WORLD, "gradient_average": False}
    raise AssertionError(case)


def _full_state(wrapped, case):
    if case.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped):
            return {_plain_name(n): p.detach().clone() for n, p in wrapped.named_parameters()}
    return {_plain_name(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in wrapped.named_parameters()}


def _plain_name(name: str) -> str:
    for prefix in ("_orig_mod.", "module.", "_fsdp_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def train(case: str, rank: int, ranks: list[int], groups) -> dict:
    """Train `case` on this rank's share of the windows of `ranks` (the ranks that reduce together)."""
    wrapped, kwargs = _wrap(case, _new_model(), groups)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.01)
    acc = Accumulator(wrapped, opt, accumulation_steps=ACCUMULATION_STEPS, max_grad_norm=MAX_GRAD_NORM, **kwargs)
    micro_batches = [collate([example]) for window in _data(ranks)[0][rank] for example in window]
    losses, norms = [], []
    for window in acc.grouped_windows([micro_batches[:4], micro_batches[4:8], micro_batches[8:]]):
        for batch in window:
            window.loss(logits_of(wrapped, batch), batch["labels"]).backward()
        if case == "manual":
            for p in wrapped.parameters():
                dist.all_reduce(p.grad)
        stats = window.step()
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
    return {"state": _full_state(wrapped, case), "losses": losses, "norms": norms}


# -- one reduction per optimizer step -------------------------------------------------------------

def count_reductions(case: str, control: bool) -> list[list[int]]:
    """Run 2 windows of 4 micro-batches under `case` with a counting communication hook; return,
    per window, the micro-step of every gradient reduction. `control` turns the sync control off."""
    import gradaccum.distributed as dist_utils
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    wrapped, _ = _wrap(case, _new_model(), {})
    seen: list[int] = []
    current = {"micro_step": None}

    def counting_hook(state, bucket):
        seen.append(current["micro_step"])
        return allreduce_hook(state, bucket)

    inner = getattr(wrapped, "_orig_mod", wrapped)
    inner.register_comm_hook(None, counting_hook)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    acc = Accumulator(wrapped, opt, accumulation_steps=4, gradient_average=True)  # the hook averages
    rank = dist.get_rank()
    micro_batches = [collate([example]) for window in _rank_examples(rank, [4, 4]) for example in window]
    original = dist_utils.gradient_sync
    if control:  # the mistake the counter must catch: no no_sync on the first K-1 micro-batches
        dist_utils.gradient_sync = lambda model, enabled: contextlib.nullcontext()
    per_window = []
    try:
        for window in acc.windows(micro_batches):
            seen.clear()
            for batch in window:
                current["micro_step"] = window.micro_step
                window.loss(logits_of(wrapped, batch), batch["labels"]).backward()
            window.step()
            per_window.append(list(seen))
    finally:
        dist_utils.gradient_sync = original
    return per_window


# -- refusals -------------------------------------------------------------------------------------

class _Holder(torch.nn.Module):
    """An unknown wrapper: a module holding a DDP-wrapped model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def refusals(singletons) -> dict[str, str]:
    """The message of each setup the Accumulator must refuse (or 'accepted')."""
    from torch.nn.parallel import DistributedDataParallel

    def attempt(model, **kwargs) -> str:
        try:
            Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
        except ValueError as error:
            return str(error)
        except TypeError as error:  # an argument the code does not have yet
            return f"TypeError: {error}"
        return "accepted"

    custom_hook = DistributedDataParallel(_new_model())
    custom_hook.register_comm_hook(None, lambda state, bucket: None)  # never called
    return {
        "plain": attempt(_new_model()),
        "plain_group_only": attempt(_new_model(), process_group=dist.group.WORLD),
        "unknown_wrapper": attempt(_Holder(DistributedDataParallel(_new_model()))),
        "custom_comm_hook": attempt(custom_hook),
        "custom_comm_hook_explicit": attempt(custom_hook, gradient_average=True),
        "explicit": attempt(_new_model(), process_group=dist.group.WORLD, gradient_average=True),
        "ddp_other_group": attempt(DistributedDataParallel(_new_model()),
                                   process_group=singletons[dist.get_rank()]),
        # Hybrid sharding with one-rank shard groups: FSDP1 silently stops reducing across replicas.
        "fsdp1_hybrid_no_shard": attempt(_wrap("fsdp1_hybrid", _new_model(), {
            "pair": singletons[dist.get_rank()], "across": dist.group.WORLD})[0]),
    }


# -- workers --------------------------------------------------------------------------------------

def _job_two(rank: int) -> dict:
    ranks = [0, 1]
    singletons = [dist.new_group([r]) for r in ranks]  # every rank creates every group
    results = {}
    for case in ("ddp", "ddp_naive", "compiled_ddp", "fsdp1", "fsdp1_orig_params", "fsdp2", "hsdp_2x1", "hsdp_1x2",
                 "manual"):
        results[case] = _guard(train, case, rank, ranks, {})
    # FSDP1 hybrid sharding over both ranks, one replica (the 2x2 grid is in the 4-rank test).
    results["fsdp1_hybrid"] = _guard(train, "fsdp1_hybrid", rank, ranks,
                                     {"pair": dist.group.WORLD, "across": singletons[rank]})
    # DDP over a one-rank group: each rank is its own replica; nothing is summed over the other.
    for case in ("ddp_subgroup", "compiled_ddp_subgroup"):
        results[case] = _guard(train, case, rank, [rank], {"pair": singletons[rank]})
    for case in ("ddp", "compiled_ddp"):
        for control in (False, True):
            results[f"reductions_{case}_{'control' if control else 'exact'}"] = _guard(count_reductions, case, control)
    results["refusals"] = _guard(refusals, singletons)
    return results


def _job_four(rank: int) -> dict:
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    across = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pair, groups = [0, 1] if rank < 2 else [2, 3], {"pair": pairs[rank // 2], "across": across[rank % 2]}
    return {
        "ddp_subgroup": _guard(train, "ddp_subgroup", rank, pair, groups),  # {0,1} and {2,3}: two replicas
        "hsdp_2x2": _guard(train, "hsdp_2x2", rank, [0, 1, 2, 3], groups),
        "fsdp1_hybrid": _guard(train, "fsdp1_hybrid", rank, [0, 1, 2, 3], groups),
    }


def _guard(fn, *args):
    try:
        return fn(*args)
    except Exception as error:  # recorded per case, so one failure does not hide the others
        return {"error": f"{type(error).__name__}: {error}"}


def _worker(rank, world, port, job, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the ranks share the cores
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        results = {"two": _job_two, "four": _job_four}[job](rank)
        torch.save(results, os.path.join(out_dir, f"{job}-{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort in static destructors at interpreter exit


def _spawn(tmp_path, job, world):
    mp.start_processes(_worker, args=(world, _free_port(), job, str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    return [torch.load(tmp_path / f"{job}-{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("two"), "two", 2)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("four"), "four", 4)


def _errors(result, ref):
    """Relative weight error (to the update) and the largest loss and grad-norm differences."""
    ref_state, ref_losses, ref_norms = ref
    initial = dict(_new_model().named_parameters())
    state = result["state"]
    diff = sum(float((state[n] - ref_state[n]).pow(2).sum()) for n in ref_state)
    update = sum(float((ref_state[n] - initial[n]).pow(2).sum()) for n in ref_state)
    return (math.sqrt(diff / update), max(abs(a - b) for a, b in zip(result["losses"], ref_losses)),
            max(abs(a - b) / b for a, b in zip(result["norms"], ref_norms)))


def _assert_exact(result, ref, what):
    assert "error" not in result, f"{what}: {result['error']}"
    weights, losses, norms = _errors(result, ref)
    print(f"\n{what}: weights {weights:.1e}, losses {losses:.1e}, grad norms {norms:.1e}")
    assert len(result["losses"]) == 3
    assert weights < 1e-10 and losses < 1e-10 and norms < 1e-10, \
        f"{what} departs from the full batch: weights {weights:.2e}, loss {losses:.2e}, grad norm {norms:.2e}"


@pytest.mark.parametrize("case", ["ddp", "compiled_ddp", "fsdp1", "fsdp1_orig_params", "fsdp2", "hsdp_2x1",
                                  "hsdp_1x2", "fsdp1_hybrid", "manual"])
def test_two_ranks_equal_the_full_batch(two_ranks, case):
    ref = _reference((0, 1))
    for rank, results in enumerate(two_ranks):
        _assert_exact(results[case], ref, f"{case}, rank {rank}")


@pytest.mark.parametrize("case", ["ddp_subgroup", "compiled_ddp_subgroup"])
def test_ddp_on_one_rank_groups_is_each_rank_alone(two_ranks, case):
    for rank, results in enumerate(two_ranks):
        _assert_exact(results[case], _reference((rank,)), f"{case}, rank {rank}")


def test_naive_accumulation_departs(two_ranks):
    """Beside the exact runs: the per-micro-batch mean is far outside the tolerance."""
    weights, losses, norms = _errors(two_ranks[0]["ddp_naive"], _reference((0, 1)))
    print(f"\nnaive DDP: weights {weights:.1e}, losses {losses:.1e}, grad norms {norms:.1e}")
    assert weights > 1e-2


@pytest.mark.parametrize("case", ["ddp", "compiled_ddp"])
def test_one_gradient_reduction_per_optimizer_step(two_ranks, case):
    for results in two_ranks:
        exact, control = results[f"reductions_{case}_exact"], results[f"reductions_{case}_control"]
        assert "error" not in exact, exact
        assert len(exact) == 2 and all(exact), exact
        # Every reduction (one per DDP bucket) comes from the last micro-batch of its window ...
        assert all(step == 3 for window in exact for step in window), exact
        # ... while without no_sync the same counter sees one per micro-batch.
        assert [sorted(set(window)) for window in control] == [[0, 1, 2, 3]] * 2, control
        assert all(len(c) == 4 * len(e) for c, e in zip(control, exact))


def test_unknown_reduction_is_refused(two_ranks):
    messages = two_ranks[0]["refusals"]
    assert "error" not in messages, messages
    for case in ("plain", "plain_group_only", "unknown_wrapper", "custom_comm_hook"):
        assert messages[case] != "accepted", f"{case} was accepted"
        assert "gradient_average=" in messages[case], messages[case]
    assert "process_group=" in messages["plain"]
    assert "communication hook" in messages["custom_comm_hook"]
    assert messages["custom_comm_hook_explicit"] == "accepted"
    assert messages["explicit"] == "accepted"
    assert "ranks" in messages["ddp_other_group"], messages["ddp_other_group"]
    assert "NO_SHARD" in messages["fsdp1_hybrid_no_shard"], messages["fsdp1_hybrid_no_shard"]


@pytest.mark.slow  # 4 processes: 30-60 s on a busy 2-core machine
def test_four_ranks_subgroups_and_hybrid_sharding(four_ranks):
    """Two DDP replicas on {0,1} and {2,3} with their own data; HSDP and FSDP1 hybrid on a 2x2 grid."""
    for rank, results in enumerate(four_ranks):
        _assert_exact(results["ddp_subgroup"], _reference((0, 1) if rank < 2 else (2, 3)),
                      f"DDP on group {{{rank // 2 * 2}, {rank // 2 * 2 + 1}}}, rank {rank}")
        _assert_exact(results["hsdp_2x2"], _reference((0, 1, 2, 3)), f"HSDP 2x2, rank {rank}")
        _assert_exact(results["fsdp1_hybrid"], _reference((0, 1, 2, 3)), f"FSDP1 HYBRID_SHARD, rank {rank}")


def test_single_process_needs_no_arguments():
    """No process group (or a world of one): the plain model works with no data-parallel arguments."""
    model = _new_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2)
    for window in acc.windows([collate([e]) for e in _rank_examples(1, [2])[0]]):
        for batch in window:
            window.loss(logits_of(model, batch), batch["labels"]).backward()
        assert window.step().num_targets > 0
