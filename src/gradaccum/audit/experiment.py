"""The experiment: the first window's gradient for every split, then one `gradaccum train` run each.

Every model here is `setup.build_model`'s and every run is `train.train` itself (no second
training loop), so the audit measures the code that trains.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import time
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..accumulate import Accumulator
from ..config import AuditConfig, RunConfig, TrainConfig
from ..data import Example, collate, global_windows, split_window
from ..errors import ConfigError
from ..losses import CausalLMLoss
from ..models import final_state_dict
from ..setup import (build_model, default_lr, num_targets, pairs_note, resolve_device, training_data_path,
                     training_examples)
from .report import write_report
from .results import (AuditResult, GradientBound, MicroBatchAudit, RunAudit, TargetSpread, compare_gradients,
                      gradient_bound)

Weights = dict[str, torch.Tensor]


def run_audit(config: AuditConfig) -> AuditResult:
    t_start = time.perf_counter()
    say = print if config.progress else (lambda *_: None)
    if config.against == "hf-trainer" and importlib.util.find_spec("accelerate") is None:
        # Found out now rather than after every other run has finished.
        raise ConfigError("--against hf-trainer needs accelerate for transformers.Trainer: "
                          "pip install 'gradaccum[hf]'")
    output = _prepare_output(config)
    device = resolve_device(config.device)
    model, tokenizer = build_model(config, device)
    data_path = training_data_path(config)
    examples, stats = training_examples(data_path, tokenizer, config.max_length, config.format,
                                        config.chat_template)
    if len(examples) < config.batch_size:
        raise ConfigError(f"--batch-size {config.batch_size} exceeds the {len(examples)} examples in {data_path}")
    windows = list(global_windows(len(examples), config.batch_size, config.seed, 0, config.steps))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"audit: {config.model} on {data_path} ({len(examples)} examples); B={config.batch_size}, micro-batches "
        f"{', '.join(map(str, config.micro_batch_sizes))}; {config.steps} steps; {config.dtype}; {device}")
    if (note := pairs_note(stats)) is not None:
        say(note)

    initial_weights = final_state_dict(model)
    gate, gradient_figures, full_first_loss = _first_step_gradients(model, config, examples, windows[0],
                                                                    tokenizer.pad_token_id, device, say)
    del model
    full_losses, micro_batches = _training_runs(config, output, examples, windows, initial_weights,
                                                gradient_figures, gate, say)
    hf = None
    if config.against == "hf-trainer":
        from .hf_trainer import hf_trainer_comparison

        # Trainer's loss runs in float32 whatever the model's dtype: the float32 bound of this run.
        hf_tolerance = gradient_bound("float32", gate.float32_error).tolerance
        hf = hf_trainer_comparison(config, examples, windows, default_lr(config), device, output, say, hf_tolerance)

    max_exact = max(mb.exact.gradient_error for mb in micro_batches)
    max_naive = max(mb.naive.gradient_error for mb in micro_batches)
    passed = max_exact <= gate.tolerance and (hf is None or hf.aligned)
    setup = {
        "model": config.model, "data": str(data_path), "num_examples": len(examples),
        "batch_size": config.batch_size, "micro_batch_sizes": config.micro_batch_sizes, "steps": config.steps,
        "dtype": config.dtype, "lr": default_lr(config), "seed": config.seed, "max_length": config.max_length,
        "max_grad_norm": config.max_grad_norm, "lora": config.lora, "trainable_parameters": trainable,
        "device": str(device), "optimizer": "AdamW, warm-up + cosine schedule (as gradaccum train)",
        "loss": "chunked LM-head CE", "first_window": list(windows[0]), "torch": torch.__version__,
        "save_models": config.save_models,
    }
    result = AuditResult(
        passed=passed, exit_code=0 if passed else 1, verdict="", tolerance=gate.tolerance, gate=gate,
        max_exact_gradient_error=max_exact, max_naive_gradient_error=max_naive,
        naive_departs=not max_naive <= gate.tolerance, setup=setup, full_losses=full_losses,
        first_window_consistency=(abs(full_first_loss - full_losses[0])
                                  if full_losses and full_losses[0] is not None else math.nan),
        micro_batches=micro_batches, hf_trainer=hf, output=str(output),
        files={"report_md": str(output / "report.md"), "report_json": str(output / "report.json"),
               "figure": str(output / "audit.png")},
        seconds=0.0)
    write_report(result, output, seconds=time.perf_counter() - t_start)
    say(f"audit: {result.verdict}")
    say(f"audit: report {output / 'report.md'}, figure {output / 'audit.png'} ({result.seconds:.0f} s)")
    return result


def _prepare_output(config: AuditConfig) -> Path:
    output = Path(config.output or f"runs/audit-{datetime.now():%Y%m%d-%H%M%S}")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file")
    if output.is_dir() and any(output.iterdir()) and not ((output / "report.json").exists()
                                                          or (output / "runs").is_dir()):
        raise ConfigError(f"--output {output}/ holds something other than an audit; use another folder")
    (output / "runs").mkdir(parents=True, exist_ok=True)
    return output


# ---------------------------------------------------------------------------------------------
# The first window's gradient, for every split: where the gate is checked


def _first_step_gradients(model, config: AuditConfig, examples: list[Example], window_indices: list[int],
                          pad_token_id: int, device: torch.device, say: Callable[..., None]):
    """Window 0's gradient for every split against the full batch's, and the gate's bound.

    Returns (gate, {(micro, accumulation): (error, cosine, error against float64)}, the full
    batch's window loss). The full batch is computed once more in the other precision, a float64
    copy of a float32 model or a float32 copy of a float64 one (twice the model's memory for a
    moment): the two are this run's float32 rounding, which `gradient_bound` turns into the gate.
    """
    batch_size = config.batch_size

    def gradient(micro: int, accumulation: str, of=model):
        return window_gradient(of, examples, window_indices, batch_size // micro, micro, pad_token_id,
                               accumulation, device)

    full_gradient, full_loss = gradient(batch_size, "exact")
    other_dtype = torch.float64 if config.dtype == "float32" else torch.float32
    try:
        other = copy.deepcopy(model).to(other_dtype)
        other_gradient, _ = gradient(batch_size, "exact", of=other)
    except torch.OutOfMemoryError:
        raise ConfigError(f"audit: the gate measures this run's rounding on a {other_dtype} copy of the model and "
                          f"one full batch of {batch_size} on {device}, which does not fit; use a smaller "
                          "--batch-size or --device cpu") from None
    del other
    float64_gradient, float32_gradient = ((other_gradient, full_gradient) if config.dtype == "float32"
                                          else (full_gradient, other_gradient))
    gate = gradient_bound(config.dtype, compare_gradients(float32_gradient, float64_gradient)[0])
    del other_gradient, float32_gradient
    say(f"audit: first-step gradient, full batch: float32 against float64 {gate.float32_error:.1e}; "
        f"gate: exact within {gate.tolerance:.1e} of the full batch")
    figures: dict[tuple[int, str], tuple[float, float, float]] = {}
    for micro in config.micro_batch_sizes:
        for accumulation in ("exact", "naive"):
            split_gradient, _ = gradient(micro, accumulation)
            figures[micro, accumulation] = (*compare_gradients(split_gradient, full_gradient),
                                            compare_gradients(split_gradient, float64_gradient)[0])
            del split_gradient
        say(f"audit: first-step gradient, micro-batch {micro}: exact error {figures[micro, 'exact'][0]:.1e}, "
            f"naive error {figures[micro, 'naive'][0]:.1e}")
    return gate, figures, full_loss


def window_gradient(model, examples: list[Example], window_indices: list[int], accumulation_steps: int,
                    micro_batch_size: int, pad_token_id: int, accumulation: str,
                    device: torch.device) -> tuple[list[torch.Tensor], float]:
    """The accumulated gradient of one window split into micro-batches, and its loss.

    The same pieces as the training loop: `split_window` (length-sorted), `collate`,
    `CausalLMLoss` (chunked) and `Accumulator.grouped_windows`; an SGD step with lr=0 closes the
    window without moving the weights.
    """
    loss_module = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    acc = Accumulator(loss_module, torch.optim.SGD(params, lr=0.0), accumulation_steps=accumulation_steps,
                      max_grad_norm=None, accumulation=accumulation)
    lengths = [len(example.input_ids) for example in examples]
    micro_batches = [collate([examples[i] for i in indices], pad_token_id)
                     for indices in split_window(window_indices, micro_batch_size, lengths=lengths)]
    gradient, loss = None, math.nan
    for window in acc.grouped_windows([micro_batches]):
        for batch in window:
            batch = {k: v.to(device) for k, v in batch.items()}
            window.scale(loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"])).backward()
        gradient = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        loss = window.step().loss
    assert gradient is not None
    return gradient, loss


# ---------------------------------------------------------------------------------------------
# The training runs: gradaccum.train.train, one folder each


def _training_runs(config: AuditConfig, output: Path, examples: list[Example], windows: list[list[int]],
                   initial_weights: Weights, gradient_figures: dict, gate: GradientBound,
                   say: Callable[..., None]) -> tuple[list[float | None], list[MicroBatchAudit]]:
    """The full-batch run, then exact and naive for every micro-batch size, against it."""
    full_metrics, full_weights = _train_run(config, output, config.batch_size, "exact", "full", say)
    keys = sorted(set(full_weights) & set(initial_weights))
    update_norm = norm_of_difference(full_weights, initial_weights, keys) if keys else 0.0
    del initial_weights
    full_losses = [_loss_of(m) for m in full_metrics]
    full_norm = math.sqrt(sum(float(tensor.double().pow(2).sum()) for tensor in full_weights.values()))
    targets = [num_targets(example) for example in examples]
    lengths = [len(example.input_ids) for example in examples]
    micro_batches = []
    for micro in config.micro_batch_sizes:
        audits = {}
        for accumulation in ("exact", "naive"):
            name = f"{accumulation}-m{micro}"
            metrics, weights = _train_run(config, output, micro, accumulation, name, say)
            losses = [_loss_of(m) for m in metrics]
            differences = [abs(a - b) for a, b in zip(losses, full_losses) if a is not None and b is not None]
            error, cosine, error_vs_float64 = gradient_figures[micro, accumulation]
            audits[accumulation] = RunAudit(
                accumulation=accumulation, gradient_error=error, gradient_cosine=cosine,
                gradient_error_vs_float64=error_vs_float64,
                weight_distance=(norm_of_difference(weights, full_weights, sorted(full_weights)) / full_norm
                                 if full_norm else math.nan),
                weight_distance_vs_update=(norm_of_difference(weights, full_weights, keys) / update_norm
                                           if update_norm else None),
                losses=losses, max_loss_difference=max(differences, default=math.nan),
                final_loss_difference=(losses[-1] - full_losses[-1]
                                       if losses and losses[-1] is not None and full_losses[-1] is not None
                                       else math.nan),
                departs=not error <= gate.tolerance, output=str(output / "runs" / name))
            del weights
        first_counts = _micro_counts(windows[0], micro, lengths, targets)
        micro_batches.append(MicroBatchAudit(
            micro_batch_size=micro, accumulation_steps=config.batch_size // micro,
            exact=audits["exact"], naive=audits["naive"],
            targets_first_window=_spread([first_counts]),
            targets_all_windows=_spread([_micro_counts(w, micro, lengths, targets) for w in windows]),
            targets_per_micro_batch_first_window=first_counts))
    return full_losses, micro_batches


def _train_run(config: AuditConfig, output: Path, micro: int, accumulation: str, name: str,
               say: Callable[..., None]) -> tuple[list[dict[str, Any]], Weights]:
    """One `gradaccum train` run into DIR/runs/<name>: its metrics and its final weights.

    Its log goes to DIR/runs/<name>.log; its model to DIR/runs/<name>/final only with --save-models
    (the report needs the weights, not a merged full model written per run).
    """
    from ..train import train

    shared = {f.name: getattr(config, f.name) for f in fields(RunConfig)}
    train_config = TrainConfig(**{
        **shared, "micro_batch_size": micro, "batch_size": config.batch_size, "max_steps": config.steps,
        "accumulation": accumulation, "eval_every": 0, "save_every": 0, "progress": False,
        "output": str(output / "runs" / name), "overwrite": True, "save_final": config.save_models})
    t0 = time.perf_counter()
    with open(output / "runs" / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        result = train(train_config, keep_final_state=True)
    if result.final_state is None:  # a signal stopped the run: stop the audit too
        raise KeyboardInterrupt
    losses = [m["loss"] for m in result.metrics]
    label = "full batch" if name == "full" else f"{accumulation}, micro-batch {micro}"
    say(f"audit: trained {label} ({micro} x {config.batch_size // micro}): loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    return result.metrics, result.final_state


def _loss_of(record: dict[str, Any]) -> float | None:
    loss = record.get("loss")
    return None if loss is None or record.get("skipped") or not math.isfinite(loss) else float(loss)


def norm_of_difference(a: Weights, b: Weights, keys: Sequence[str]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys))


def _micro_counts(window_indices: Sequence[int], micro: int, lengths: list[int], targets: list[int]) -> list[int]:
    return [sum(targets[i] for i in indices) for indices in split_window(window_indices, micro, lengths=lengths)]


def _spread(windows_counts: list[list[int]]) -> TargetSpread:
    counts = [n for window in windows_counts for n in window]
    mean = sum(counts) / len(counts)
    std = math.sqrt(sum((n - mean) ** 2 for n in counts) / len(counts))
    weights = [sum(window) / (len(window) * n) for window in windows_counts for n in window if n > 0]
    return TargetSpread(min=min(counts), max=max(counts), mean=mean, cv=std / mean if mean else math.nan,
                        naive_weight_min=min(weights, default=None), naive_weight_max=max(weights, default=None))
