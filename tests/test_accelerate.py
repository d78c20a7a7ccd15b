"""gradaccum.Accumulator inside a Hugging Face Accelerate loop equals the big batch on one process.

Accelerate's `prepare` wraps the model in DDP (more than one process), the optimizer in an
AcceleratedOptimizer (whose step() and zero_grad() do nothing while `sync_gradients` is False)
and the dataloader in a DataLoaderShard (global batch i goes to rank i % world size; with the
default even_batches=True, ranks that run out are topped up with the *first* examples again).
These tests pin down what a user must set for the Accumulator to stay exact:

- Accelerator(gradient_accumulation_steps=1) (the default): `accelerator.backward` divides the
  loss by it, and `accelerator.accumulate()` would switch optimizer steps off;
- DataLoaderConfiguration(even_batches=False): no example is repeated to even out the ranks
  (the Accumulator itself pads a rank that ran out with a masked micro-batch);
- the learning-rate scheduler goes to the Accumulator unprepared: a prepared one steps once per
  process at every optimizer step.

Each run trains a float64 tiny Llama with SGD on examples with 1 to 19 targets (10 examples,
windows of 8: a full and a partial one) and compares with one optimizer step per window on the
whole window as one batch, on one process, with no Accelerate at all.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradaccum import Accumulator
from helpers import collate, logits_of, make_examples, relative_error, tiny_llama

accelerate = pytest.importorskip("accelerate")

NUM_EXAMPLES = 10
WINDOW = 8  # examples per optimizer step, over all micro-batches and ranks
LR = 0.5
WORKER = Path(__file__).with_name("accelerate_worker.py")


def examples():
    lengths = [5, 20, 3, 12, 8, 17, 2, 9, 14, 6]
    prompts = [1, 3, 0, 10, 6, 0, 0, 2, 12, 4]
    return make_examples(lengths, prompts, seed=3)


def schedule(step: int) -> float:
    return 1.0 / (1 + step)  # a decaying learning rate: a scheduler stepped twice shows


def big_batch(initial, data):
    """The definition: one SGD step per window of WINDOW examples, on their token mean, one process."""
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    for start in range(0, len(data), WINDOW):
        batch = collate(data[start:start + WINDOW])
        logits, labels = logits_of(model, batch)[:, :-1], batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return model, losses


def accelerate_run(initial, data, micro_batch_size: int, accumulation: str = "exact", even_batches: bool = False,
                   gradient_accumulation_steps: int = 1, prepare_scheduler: bool = False):
    """The documented loop: model, optimizer and dataloader through `accelerator.prepare`, the
    Accumulator around them, `accelerator.backward`. Returns the unwrapped model and what it saw."""
    from accelerate import Accelerator, DataLoaderConfiguration

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(even_batches=even_batches))
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    inner_steps = []  # one entry per real optimizer step on this rank
    optimizer.register_step_post_hook(lambda *_: inner_steps.append(1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loader = torch.utils.data.DataLoader(data, batch_size=micro_batch_size, shuffle=False, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if prepare_scheduler:
        scheduler = accelerator.prepare(scheduler)
    steps_per_window = WINDOW // (micro_batch_size * accelerator.num_processes)
    acc = Accumulator(model, optimizer, accumulation_steps=steps_per_window, scheduler=scheduler,
                      accumulation=accumulation)
    stats = []
    for window in acc.windows(loader):
        for batch in window:
            accelerator.backward(window.loss(logits_of(model, batch), batch["labels"]))
        stats.append(window.step())
    inner = accelerator.unwrap_model(model)
    return inner, {"wrapper": type(model).__name__, "optimizer": type(optimizer).__name__,
                   "num_processes": accelerator.num_processes, "inner_steps": len(inner_steps),
                   "scheduler_steps": scheduler.scheduler.last_epoch if prepare_scheduler else scheduler.last_epoch,
                   "losses": [s.loss for s in stats], "num_targets": [s.num_targets for s in stats]}


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its process state and gradient-accumulation settings in singletons:
    leave none behind for the Trainer tests that share this interpreter."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_one_process_equals_big_batch(fresh_accelerate_state):
    initial, data = tiny_llama(), examples()
    reference, reference_losses = big_batch(initial, data)
    for micro_batch_size in (1, 2):
        exact, seen = accelerate_run(initial, data, micro_batch_size)
        assert relative_error(exact, reference, initial) <= 1e-10, micro_batch_size
        assert seen["optimizer"] == "AcceleratedOptimizer" and seen["num_processes"] == 1
        # window.step() steps the wrapped optimizer once per window (two windows), and the scheduler too.
        assert seen["inner_steps"] == 2 and seen["scheduler_steps"] == 2
        assert seen["losses"] == pytest.approx(reference_losses, rel=1e-12)
    naive, _ = accelerate_run(initial, data, 2, accumulation="naive")
    assert relative_error(naive, reference, initial) > 1e-2


def test_accelerate_gradient_accumulation_steps_must_stay_1(fresh_accelerate_state):
    """Accelerator(gradient_accumulation_steps=K): accelerator.backward would divide the exact share by K
    (a K times smaller step, measured 0.78 off the big batch before this was refused). The Accumulator
    does the accumulation, so it refuses an optimizer prepared for Accelerate's own."""
    initial, data = tiny_llama(), examples()
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        accelerate_run(initial, data, 2, gradient_accumulation_steps=4)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes_equal_big_batch(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: 2 CPU ranks, gloo, DDP.
    Each rank runs micro-batches of 2, two per window: rank 1 has no data for the second window.
    ~15 s, most of it `accelerate launch` and two interpreters importing transformers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent / "src"), str(Path(__file__).parent)])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_port()), str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")

    initial, data = tiny_llama(), examples()
    reference, reference_losses = big_batch(initial, data)

    def model_of(name):
        model = copy.deepcopy(initial)
        model.load_state_dict(result[name]["state"])
        return model

    exact = result["exact"]
    assert exact["wrapper"] == "DistributedDataParallel" and exact["num_processes"] == 2
    assert exact["inner_steps"] == 2 and exact["scheduler_steps"] == 2
    assert relative_error(model_of("exact"), reference, initial) <= 1e-10
    assert exact["losses"] == pytest.approx(reference_losses, rel=1e-12)
    # The controls: naive accumulation; even_batches=True, which trains examples 0 and 1 again in the
    # second window (rank 1 has none left); a prepared scheduler, stepped once per process.
    assert relative_error(model_of("naive"), reference, initial) > 1e-2
    assert relative_error(model_of("even_batches"), reference, initial) > 1e-2
    assert result["even_batches"]["num_targets"][1] > exact["num_targets"][1]
    assert result["prepared_scheduler"]["scheduler_steps"] == 4
    assert relative_error(model_of("prepared_scheduler"), reference, initial) > 1e-2
