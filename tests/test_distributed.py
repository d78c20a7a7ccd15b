"""2 processes over gloo on the CPU, each with its share of every window, equal the full batch."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradaccum import Accumulator
from helpers import collate, full_batch_reference, logits_of, make_examples, relative_error, tiny_llama

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _windows():
    # 2 windows of 8 examples with 3 to 40 tokens and varying prompt masks.
    n = 16
    examples = make_examples([3 + (13 * i) % 38 for i in range(n)], [(7 * i) % 11 for i in range(n)], seed=4)
    return [examples[:8], examples[8:]]


def _worker(rank, port, wrapper, accumulation, micro_batch_size, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = tiny_llama(torch.float64)
        if wrapper == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        windows = _windows()
        share = len(windows[0]) // WORLD  # each rank takes a contiguous half of every window
        micro_batches = []
        for window in windows:
            mine = window[rank * share:(rank + 1) * share]
            micro_batches += [collate(mine[i:i + micro_batch_size]) for i in range(0, share, micro_batch_size)]
        acc = Accumulator(model, opt, accumulation_steps=share // micro_batch_size, accumulation=accumulation,
                          max_grad_norm=1.0)
        losses = []
        for window in acc.windows(micro_batches):
            for batch in window:
                window.loss(logits_of(model, batch), batch["labels"]).backward()
            losses.append(window.step().loss)
        state = {}
        for name, param in model.named_parameters():
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            state[name.replace("module.", "")] = full.detach().clone()
        if rank == 0:
            torch.save({"state": state, "losses": losses}, os.path.join(out_dir, "result.pt"))
        dist.barrier()  # no rank tears gloo down while a peer is still talking to it
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads can abort in C++ static destructors at exit
    # ("terminate called without an active exception") after all the work is done and saved.
    os._exit(0)


def _run(tmp_path, wrapper, accumulation="exact", micro_batch_size=2):
    mp.start_processes(_worker, args=(_free_port(), wrapper, accumulation, micro_batch_size, str(tmp_path)),
                       nprocs=WORLD, join=True, start_method="spawn")
    return torch.load(tmp_path / "result.pt", weights_only=True)


def _reference():
    torch.manual_seed(0)
    model = tiny_llama(torch.float64)
    ref = full_batch_reference(model, _windows(), "adamw", max_grad_norm=1.0)
    return model, ref


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_ranks_equal_single_process_full_batch(tmp_path, wrapper):
    initial, reference = _reference()
    exact = _run(tmp_path, wrapper)
    model = copy.deepcopy(initial)
    model.load_state_dict(exact["state"], strict=False)
    err = relative_error(model, reference, initial)
    assert err < 1e-10, f"{wrapper}: 2-rank exact accumulation departs from the full batch by {err:.2e}"
    assert len(exact["losses"]) == 2


def test_naive_over_ranks_departs(tmp_path):
    initial, reference = _reference()
    naive = _run(tmp_path, "ddp", accumulation="naive")
    model = copy.deepcopy(initial)
    model.load_state_dict(naive["state"], strict=False)
    assert relative_error(model, reference, initial) > 1e-4
