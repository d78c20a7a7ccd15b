"""`torchrun -m gradaccum train` on 2 CPU ranks (gloo) equals one process with the same batch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_train import write_pairs

COMMON = ["--batch-size", "8", "--max-steps", "3", "--dtype", "float64", "--lr", "0.01", "--eval-every", "0",
          "--no-progress", "--save-every", "0"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, name, *args, nproc=2, timeout=240):
    """Run `gradaccum train` under torchrun (nproc > 1) or as one process; return its output folder."""
    out = tmp_path / name
    prefix = [sys.executable, "-m", "gradaccum"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
         str(_port()), "-m", "gradaccum"]
    cmd = prefix + ["train", "--data", str(tmp_path / "data.jsonl"), "--output", str(out), *COMMON, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def launch_two_nodes(tmp_path, name, *args, timeout=480):
    """`gradaccum train` on 2 "nodes" x 2 processes (4 ranks): two torchrun launches on this machine
    meeting at a c10d rendezvous, as on two hosts (there, the endpoint is node 0's address)."""
    out, port = tmp_path / name, _port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", name]
    train = ["-m", "gradaccum", "train", "--data", str(tmp_path / "data.jsonl"), "--output", str(out), *COMMON, *args]
    nodes = [subprocess.Popen(launcher + ["--node-rank", str(node)] + train, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    try:
        logs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-4000:]
    return out


def weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_rel(a, b):
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, micro 8 x accumulation 1, on 21 examples (the third window is partial: 5)."""
    tmp = tmp_path_factory.mktemp("single")
    write_pairs(tmp / "data.jsonl", n=21)
    out = launch(tmp, "single", "--micro-batch-size", "8", nproc=1)
    return tmp, weights(out), losses(out)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_ranks_equal_one_process(reference, wrapper):
    tmp, ref_weights, ref_losses = reference
    args = ["--micro-batch-size", "2"] + (["--fsdp"] if wrapper == "fsdp2" else [])
    out = launch(tmp, f"2ranks-{wrapper}", *args)
    # The same tensors by name: the tiny preset ties its embeddings, saved once (no extra lm_head.weight).
    assert sorted(weights(out)) == sorted(ref_weights)
    assert max_rel(weights(out), ref_weights) <= 1e-9
    assert max(abs(a - b) for a, b in zip(losses(out), ref_losses)) <= 1e-9
    assert len(losses(out)) == 3


def test_naive_over_ranks_departs(reference):
    tmp, ref_weights, _ = reference
    out = launch(tmp, "2ranks-naive", "--micro-batch-size", "2", "--accumulation", "naive")
    assert max_rel(weights(out), ref_weights) > 1e-4


def test_uneven_last_window_finishes(tmp_path):
    """17 examples, B=8: the last window holds 1 example, so rank 1 has no micro-batch at all."""
    write_pairs(tmp_path / "data.jsonl", n=17)
    single = launch(tmp_path, "single", "--micro-batch-size", "8", nproc=1)
    out = launch(tmp_path, "uneven", "--micro-batch-size", "2", timeout=180)
    assert len(losses(out)) == 3
    assert max_rel(weights(out), weights(single)) <= 1e-9


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_resume_under_two_ranks(reference, wrapper):
    tmp, ref_weights, _ = reference
    out = tmp / f"resume-{wrapper}"
    args = ["--micro-batch-size", "2", "--save-every", "2"] + (["--fsdp"] if wrapper == "fsdp2" else [])
    # First leg: 2 ranks train and checkpoint at step 2; a damaged checkpoint-3 is left behind.
    first = launch(tmp, out.name, *args)
    (first / "final").rename(first / "final-first")
    (first / "checkpoint-3").mkdir()  # incomplete: no manifest, must be skipped
    launch(tmp, out.name, *args, "--resume")
    assert max_rel(weights(out), ref_weights) <= 1e-9
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow  # 4 ranks on the CPU: ~1-3 minutes
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_nodes_of_two_ranks_equal_one_process(reference, wrapper):
    """torchrun --nnodes 2 --nproc-per-node 2 (c10d rendezvous): the 4-rank run is the one-process run."""
    tmp, ref_weights, ref_losses = reference
    args = ["--micro-batch-size", "1"] + (["--fsdp"] if wrapper == "fsdp2" else [])
    out = launch_two_nodes(tmp, f"2nodes-{wrapper}", *args)
    assert max_rel(weights(out), ref_weights) <= 1e-9
    assert max(abs(a - b) for a, b in zip(losses(out), ref_losses)) <= 1e-9
    assert len(losses(out)) == 3
