"""make_exact under torchrun: 2 CPU ranks (gloo, DDP) train exactly as one process with the same windows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_hf import causal_lm, lm_examples, own_loss_reference, relative_error, train, close_losses

WORKER = Path(__file__).with_name("hf_ddp_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~20 s each: two interpreters import transformers
@pytest.mark.parametrize("name", ["bart", "llama"])
def test_two_ranks_equal_one_process(tmp_path, name):
    """BART's causal LM drops num_items_in_batch: plain Trainer departs under DDP too, make_exact does not.
    Llama takes the chunked LM head, inside DDP's forward. 12 examples: each rank's last window holds
    one micro-batch."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent / "src"),
                                                        str(Path(__file__).parent)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
           str(WORKER), name, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")

    initial, data = causal_lm(name), lm_examples()
    single, single_losses, _ = train(initial, data, tmp_path, 2, 4)
    own, own_losses = own_loss_reference(initial, data, 8)

    class Weights(torch.nn.Module):
        def __init__(self, tensors):
            super().__init__()
            self.tensors = torch.nn.ParameterList(tensors)

    exact, plain = Weights(result["exact"]), Weights(result["plain"])
    assert relative_error(exact, single, initial) <= 1e-9
    # HF's causal-LM loss (Llama's, not BART's, which the model drops) rounds through float32.
    assert relative_error(single, own, initial) <= (1e-9 if name == "bart" else 1e-6)
    assert close_losses(result["exact_losses"], single_losses) and len(single_losses) == 2
    assert close_losses(result["exact_losses"], own_losses)
    assert (result["head_path"] == "chunked") == (name == "llama"), result["head_path"]
    if name == "bart":
        assert relative_error(plain, own, initial) > 1.0
    else:  # Llama honours the count: plain Trainer is aligned too (to float32 rounding)
        assert relative_error(plain, own, initial) <= 1e-6
