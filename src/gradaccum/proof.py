"""The proof on the run itself: the first window's gradient, accumulated exactly and naively, vs the full batch.

    exact, naive = first_window_errors(model, micro_batches, pad_token_id)
    # relative L2 distance to the one-big-batch gradient: exact ~1e-16 (float64), naive ~0.1-0.5

The full batch is the window's examples in one padded batch: one forward and backward of the summed
loss over all their target tokens. The accumulated gradients go through the same `Accumulator` and
`CausalLMLoss` the training loop runs, once with accumulation="exact" and once with "naive", and are
read before the (lr 0) optimizer step. Three forward+backward passes over one window: well under a
second for the `tiny` preset, which is why `train` ends with it there.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from .accumulate import Accumulator
from .data import Example, collate, global_windows, split_window
from .losses import CausalLMLoss, count_target_sequences, count_targets

__all__ = ["first_window_errors", "first_window_line", "end_of_run_lines"]


def _gradient(loss_module: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
             for p in loss_module.parameters() if p.requires_grad]
    return torch.cat(grads).detach().clone()


def _accumulated_gradient(loss_module: CausalLMLoss, micro_batches: list[dict], accumulation: str) -> torch.Tensor:
    # lr=0 and no clipping: the Accumulator's own scaling is all that acts on the gradient.
    optimizer = torch.optim.SGD([p for p in loss_module.parameters() if p.requires_grad], lr=0.0)
    acc = Accumulator(loss_module, optimizer, accumulation_steps=len(micro_batches), max_grad_norm=None,
                      normalize=loss_module.normalize, accumulation=accumulation)
    window = next(iter(acc.windows(micro_batches)))
    for batch in window:
        window.scale(loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"])).backward()
    gradient = _gradient(loss_module)
    window.step()  # lr 0: leaves the weights as they were, and zeroes the gradients
    return gradient


def first_window_errors(model: torch.nn.Module, micro_batches: Sequence[Sequence[Example]], pad_token_id: int,
                        normalize: str = "tokens") -> tuple[float, float]:
    """(exact, naive): relative L2 distance of each accumulated gradient to the full-batch gradient.

    `micro_batches` are the window's examples as the loop cuts them. The gradients are taken on a
    float64 copy of `model`, so that the exact error is float64 rounding (~1e-16) and cannot be
    mistaken for a small real difference; `model` is not changed.
    """
    if len(micro_batches) < 2:
        raise ValueError("a window of one micro-batch has nothing to accumulate")
    model = copy.deepcopy(model).to(torch.float64)
    model.zero_grad(set_to_none=True)
    loss_module = CausalLMLoss(model, normalize=normalize)
    count = count_target_sequences if normalize == "samples" else count_targets
    everything = collate([example for micro in micro_batches for example in micro], pad_token_id)
    num_targets = count(everything["labels"])
    (loss_module(everything["input_ids"], everything["attention_mask"], everything["labels"]) / num_targets).backward()
    full = _gradient(loss_module)
    model.zero_grad(set_to_none=True)
    collated = [collate(micro, pad_token_id) for micro in micro_batches]
    errors = []
    for accumulation in ("exact", "naive"):
        gradient = _accumulated_gradient(loss_module, collated, accumulation)
        errors.append(float((gradient - full).norm() / full.norm()))
    return errors[0], errors[1]


def first_window_line(model: torch.nn.Module, examples: Sequence[Example], batch_size: int, micro_batch_size: int,
                      seed: int, pad_token_id: int, normalize: str = "tokens") -> str | None:
    """One line for the end of a run: its first window (seeded order, sorted and cut as the loop does)
    on `model`, which should hold the run's initial weights. None when the window is a single
    micro-batch (nothing is accumulated).
    """
    window = next(global_windows(len(examples), batch_size, seed, 0, 1))
    lengths = [len(example.input_ids) for example in examples]
    micro = [[examples[i] for i in indices] for indices in split_window(window, micro_batch_size, lengths=lengths)]
    if len(micro) < 2:
        return None
    exact, naive = first_window_errors(model, micro, pad_token_id, normalize)
    sizes = "+".join(str(count_targets(collate(m, pad_token_id)["labels"])) for m in micro)
    return (f"proof: first window's gradient vs the full batch of {len(window)} sequences "
            f"({sizes} target tokens per micro-batch): exact {exact:.1e}, naive {naive:.0%} (relative L2)")


def end_of_run_lines(config: Any, model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example],
                     eval_records: list[dict], batch_size: int, micro_batch_size: int, device: torch.device,
                     world_size: int) -> list[str]:
    """What the default run ends with: held-out sample generations, and the proof on its first window.

    The proof needs the initial weights: for the `tiny` preset they are rebuilt from the seed in a
    fraction of a second, so it runs only there (and in a single process, whose micro-batches it
    recomputes). Other models would have to be loaded again; `gradaccum audit` is their proof.
    """
    from .evaluate import sample_lines
    from .models import TINY_PRESET, load_model

    lines = []
    if eval_records and not (config.fsdp and world_size > 1):  # FSDP: no rank holds the whole model
        samples = sample_lines(model, tokenizer, eval_records, device, chat_template=config.chat_template)
        if samples:
            lines += [f"held-out samples ({len(samples)}):", *samples]
    if config.model == TINY_PRESET and not config.lora and world_size == 1:
        initial, _ = load_model(TINY_PRESET, seed=config.seed)
        line = first_window_line(initial, examples, batch_size, micro_batch_size, config.seed,
                                 tokenizer.pad_token_id, config.normalize)
        if line:
            lines.append(line)
    return lines
