"""`--against hf-trainer`: the same model, weights and windows through `transformers.Trainer`, GA=k
against GA=1, as the model is (Trainer passes `num_items_in_batch`) and with the count kept from
the loss, to check whether HF's own accumulation is aligned on this setup.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import Trainer, TrainingArguments

from ..config import AuditConfig
from ..data import Example, collate, split_window
from ..setup import build_model, optimizer_and_schedule
from .results import FLOOR_EPS, ROUNDING_FACTOR, HFCase, HFComparison, compare_gradients

HF_CASES = {
    "as-is": "the model as loaded: Trainer passes num_items_in_batch to its loss",
    "no-loss-kwargs": "model_accepts_loss_kwargs=False: each micro-batch's mean loss divided by k "
                      "(the behaviour before the 2024 fix)",
    "drops-num-items": "a forward that takes **kwargs but drops num_items_in_batch: micro-batch means, "
                       "summed",
}


class _DropsNumItemsInBatch(torch.nn.Module):
    """A model whose forward takes **kwargs but never hands `num_items_in_batch` to its loss.

    Trainer then believes the loss is already normalised by the window's token count, so it
    neither passes the count on nor divides by the accumulation steps: each micro-batch's own
    mean is summed, which is the naive gradient times k.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        kwargs.pop("num_items_in_batch", None)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


class _Ordered(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], order: list[int]):
        self.examples, self.order = examples, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, index):
        return self.examples[self.order[index]]


class _AuditTrainer(Trainer):
    """Sequential sampling, and the first step's accumulated gradient before clipping."""

    audit_params: list[torch.nn.Parameter] = []
    first_gradient: list[torch.Tensor] | None = None

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None
                                                  else self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        loss = super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        if self.state.global_step == 0:  # after the window's last backward this is its gradient
            self.first_gradient = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                                   for p in self.audit_params]
        return loss


def hf_trainer_comparison(config: AuditConfig, examples: list[Example], windows: list[list[int]], lr: float,
                          device: torch.device, output: Path, say: Callable[..., None],
                          tolerance: float) -> HFComparison:
    batch_size = config.batch_size
    micro = config.micro_batch_sizes[0]
    k = batch_size // micro
    # Trainer cuts a flat, sequential dataset into consecutive batches, so lay the windows out in
    # order, each sorted by length as split_window sorts it: GA=1 then sees each window as one batch
    # and GA=k sees the same micro-batches as `gradaccum train --micro-batch-size m`. A partial
    # window (end of an epoch) would shift the cut, so only full windows are used.
    lengths = [len(example.input_ids) for example in examples]
    full_windows = [w for w in windows if len(w) == batch_size]
    order = [i for w in full_windows for indices in split_window(w, batch_size, lengths=lengths) for i in indices]

    def train_hf(name: str, per_device: int, accumulation_steps: int, case: str):
        with open(output / "runs" / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            return _train_hf(config, _Ordered(examples, order), len(full_windows), lr, device,
                             output / "runs" / name, per_device, accumulation_steps, case)

    t0 = time.perf_counter()
    gradient_1, initial_1, final_1, logged_1, _ = train_hf("hf-ga1", batch_size, 1, "as-is")
    say(f"audit: transformers.Trainer, GA=1 ({batch_size} x 1) ({time.perf_counter() - t0:.0f} s)")
    update = _distance(final_1, initial_1)
    reference = math.sqrt(sum(float(a.double().pow(2).sum()) for a in final_1))
    cases = []
    for case, description in HF_CASES.items():
        t0 = time.perf_counter()
        gradient, _, final, logged, accepts = train_hf(f"hf-ga{k}-{case}", micro, k, case)
        error, cosine = compare_gradients(gradient, gradient_1)
        say(f"audit: transformers.Trainer, GA={k} ({micro} x {k}), {case}: gradient error {error:.1e} "
            f"({time.perf_counter() - t0:.0f} s)")
        distance = _distance(final, final_1)
        cases.append(HFCase(name=case, description=description, model_accepts_loss_kwargs=accepts,
                            gradient_error=error, gradient_cosine=cosine,
                            weight_distance=distance / reference if reference else math.nan,
                            weight_distance_vs_update=distance / update if update else None,
                            logged_losses=logged, departs=not error <= tolerance))
    skipped = len(windows) - len(full_windows)
    note = (f"transformers {transformers.__version__}; same model, initial weights, windows, AdamW and schedule "
            f"as the audit runs; GA={k} runs micro-batches of {micro}. The tolerance is this run's float32 bound "
            f"({tolerance:.1e}: {ROUNDING_FACTOR:g}x the float32 full batch's distance to float64, plus "
            f"{FLOOR_EPS:g} eps), because HF's causal-LM loss upcasts logits to float32 even for float64 models.")
    if skipped:
        note += f" {skipped} partial window(s) at an epoch end were left out."
    return HFComparison(transformers_version=transformers.__version__, micro_batch_size=micro,
                        accumulation_steps=k, steps=len(full_windows), tolerance=tolerance,
                        aligned=not cases[0].departs, reference_logged_losses=logged_1, cases=cases, note=note)


def _train_hf(config: AuditConfig, dataset: _Ordered, steps: int, lr: float, device: torch.device, folder: Path,
              per_device: int, accumulation_steps: int, case: str) -> tuple[Any, ...]:
    """One Trainer run: (first gradient, initial weights, final weights, logged losses, model_accepts_loss_kwargs)."""
    model, tokenizer = build_model(config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    optimizer, scheduler = optimizer_and_schedule(params, lr, 0.0, device, max(1, steps // 20), steps)
    args = TrainingArguments(
        output_dir=str(folder), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation_steps, max_steps=steps,
        max_grad_norm=config.max_grad_norm or 0.0, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=config.seed, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=device.type == "cpu")
    trainer = _AuditTrainer(model=_DropsNumItemsInBatch(model) if case == "drops-num-items" else model,
                            args=args, train_dataset=dataset, optimizers=(optimizer, scheduler),
                            data_collator=lambda features: collate(features, tokenizer.pad_token_id))
    if case == "no-loss-kwargs":
        trainer.model_accepts_loss_kwargs = False
    trainer.audit_params = params
    trainer.train()
    logged = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    final = [p.detach().clone() for p in params]
    return trainer.first_gradient, initial, final, logged, bool(trainer.model_accepts_loss_kwargs)


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)))
