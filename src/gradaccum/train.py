"""The fine-tuning loop: one explicit loop, top to bottom, through the Accumulator.

Step t (0-based) trains on global window t of the seeded order: examples
[t*B, (t+1)*B) of epoch t // windows_per_epoch's permutation, B the effective batch.
How B is split (micro-batch x accumulation x ranks) never changes which examples
form a step, so every split ends with the same weights, and a resumed run only needs
the step number to know where it is in the data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, distributed
from .accumulate import Accumulator
from .config import RESUMABLE_CHANGES, TrainConfig
from .data import collate, global_windows, pack, padding_fraction, read_jsonl, split_window, tokenize
from .evaluate import eval_loss, exact_match
from .losses import CausalLMLoss, count_target_sequences, count_targets
from .memory import peak_memory_bytes
from .models import apply_lora, load_model, own_memory, packing_unsupported_reason, save_final

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}  # bf16: autocast


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite losses, disk full, ...); the message says why."""


@dataclass
class TrainResult:
    output: Path
    steps: int  # windows trained (the data position)
    interrupted: bool
    stopped_by: int | None  # the signal that stopped the run early, if any
    metrics: list[dict[str, Any]]
    wall_seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return device


def resolve_batch(config: TrainConfig, world_size: int, micro_batch_size: int) -> tuple[int, int]:
    """(accumulation_steps, effective batch B) with B = micro x accumulation x world."""
    per_step = micro_batch_size * world_size
    if config.batch_size is not None:
        if config.batch_size % per_step:
            raise ValueError(f"--batch-size {config.batch_size} is not a multiple of micro-batch size "
                             f"{micro_batch_size} x world size {world_size} = {per_step}")
        return config.batch_size // per_step, config.batch_size
    accumulation_steps = config.accumulation_steps or 4
    return accumulation_steps, per_step * accumulation_steps


def default_lr(config) -> float:
    """--lr, or a default that suits the kind of run: from scratch, LoRA, or full fine-tune."""
    return config.lr or (3e-3 if config.model == "tiny" else 2e-4 if config.lora else 5e-5)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up to 1, then cosine decay to 10% at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def prepare_output(config: TrainConfig, is_main: bool) -> Path:
    """Create or check the output folder; refuse to mix two different runs in one folder."""
    output = Path(config.output or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    run_file = output / "run_config.json"
    if config.resume:
        if not checkpoint.list_checkpoints(output):
            raise ValueError(f"--resume: no checkpoint in {output}/ to resume from")
    if run_file.exists() and is_main:
        old = json.loads(run_file.read_text())
        new = config.to_dict()
        changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
        if changed and not config.overwrite:
            k = changed[0]
            raise ValueError(f"{output}/ holds a different run ({k}: {old.get(k)!r} there, {new[k]!r} now); "
                             "use another --output or --overwrite")
        if not config.resume and not config.overwrite:
            raise ValueError(f"{output}/ already holds a run; pass --resume to continue it or --overwrite")
    if is_main:
        if config.overwrite and not config.resume and output.exists():
            for child in output.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        output.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(config.to_dict(), indent=2))
    distributed.barrier()
    return output


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the current window, saves and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop right now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl up to its first unreadable line (a kill can cut the last line short)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def log(message: str) -> None:
    if distributed.is_main_process():
        print(message, flush=True)


def train(config: TrainConfig) -> TrainResult:
    t_start = time.perf_counter()
    torch.manual_seed(config.seed)  # LoRA adapters and anything else random start from the seed
    distributed.init_from_env()
    rank, world_size, is_main = distributed.rank(), distributed.world_size(), distributed.is_main_process()
    device = resolve_device(config.device)
    fsdp = config.fsdp and world_size > 1
    if config.fsdp and not fsdp:
        log("--fsdp: a single process has nothing to shard; training without it")
    if fsdp and config.lora:
        raise ValueError("--fsdp with --lora is not supported yet; use DDP (the default) for LoRA")
    output = prepare_output(config, is_main)

    # ---- model -------------------------------------------------------------------
    model, tokenizer = load_model(config.model, dtype=DTYPES[config.dtype], seed=config.seed,
                                  trust_remote_code=config.trust_remote_code)
    if config.lora:
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha)
    model.to(device)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"--model {config.model}: its tokenizer has no pad token")
    if config.packing and (reason := packing_unsupported_reason(model)):
        raise ValueError(f"--packing: {reason}; train without --packing")
    loss_module = CausalLMLoss(model, normalize=config.normalize, chunked=config.chunked_loss)
    log(f"LM head loss: {loss_module.head_kernel}" + ("" if loss_module.uses_chunked_path
                                                    else f" ({loss_module.fallback_reason})"))

    # ---- data --------------------------------------------------------------------
    from . import tasks

    train_path = config.data or str(tasks.default_train_path())
    eval_path = config.eval_data or (str(tasks.default_eval_path()) if config.data is None else None)
    examples, data_stats = tokenize(read_jsonl(train_path), tokenizer, config.max_length, path=train_path)
    eval_lines = read_jsonl(eval_path) if eval_path else []  # read once: loss and accuracy both use it
    eval_records = [record for _, record in eval_lines]
    eval_examples = tokenize(eval_lines, tokenizer, config.max_length, path=eval_path)[0] if eval_lines else []
    lengths = [len(example.input_ids) for example in examples]
    log(f"data: {len(examples)} examples from {train_path} ({data_stats.num_truncated} truncated to "
        f"{config.max_length} tokens, {data_stats.num_empty_targets} without targets); "
        f"eval: {len(eval_examples)} from {eval_path or '-'}")

    # ---- batch geometry and schedule ------------------------------------------------
    if config.micro_batch_size == "auto":
        from .memory import find_micro_batch_size  # measured probe; prints its choice
        micro_batch_size = find_micro_batch_size(loss_module, examples, config, device, tokenizer.pad_token_id)
    else:
        micro_batch_size = config.micro_batch_size
    accumulation_steps, batch_size = resolve_batch(config, world_size, micro_batch_size)
    windows_per_epoch = math.ceil(len(examples) / batch_size)
    if config.max_steps is not None:
        total_steps = config.max_steps
    elif config.epochs is not None:
        total_steps = math.ceil(config.epochs * windows_per_epoch)
    else:
        total_steps = 1200 if config.model == "tiny" else windows_per_epoch
    lr = default_lr(config)
    warmup_steps = config.warmup_steps if config.warmup_steps is not None else max(1, total_steps // 20)
    eval_every = config.eval_every if config.eval_every is not None else max(1, total_steps // 5)
    save_every = config.save_every if config.save_every is not None else max(1, total_steps // 4)
    log(f"batch: {batch_size} sequences per step = micro-batch {micro_batch_size} x accumulation "
        f"{accumulation_steps} x world {world_size}; {total_steps} steps, {windows_per_epoch} per epoch; "
        f"accumulation={config.accumulation}, lr={lr:g}, dtype={config.dtype}, device={device}")

    own_memory(list(model.parameters()))  # before DDP broadcasts into them / FSDP2 shards them
    train_module = distributed.wrap(loss_module, fsdp, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per parameter on CPU and CUDA, with no parameter-sized temporaries (the
    # for-each path allocates several); 7x faster than the for-loop step on SmolLM2-135M on CPU.
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay,
                                  fused=device.type in ("cpu", "cuda") or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
    acc = Accumulator(train_module, optimizer, accumulation_steps=accumulation_steps,
                      max_grad_norm=config.max_grad_norm, scheduler=scheduler, normalize=config.normalize,
                      accumulation=config.accumulation)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if config.dtype == "bfloat16" \
        else (lambda: contextlib.nullcontext())
    count = count_target_sequences if config.normalize == "samples" else count_targets

    # ---- resume ------------------------------------------------------------------
    start_step, metrics = 0, []
    metrics_path = output / "metrics.jsonl"
    if config.resume:
        checkpoint.remove_partial(output)  # what a kill during a save left behind
        latest = checkpoint.find_latest(output, warn=log)
        if latest is None:
            raise ValueError(f"--resume: no complete checkpoint in {output}/ (all were damaged)")
        training_state, state = checkpoint.load(latest.path, None if fsdp else model)
        if state.get("fsdp", False) != fsdp:
            raise ValueError(f"--resume: {latest.path} was written {'with' if state.get('fsdp') else 'without'} "
                             "--fsdp under torchrun; resume it the same way")
        if fsdp:  # full state dicts, sharded back over the ranks
            distributed.load_full_state_dicts(model, optimizer, checkpoint.load_weights(latest.path),
                                              training_state["optimizer"])
        else:
            optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        acc.load_state_dict(training_state["accumulator"])
        start_step = state["step"]
        log(f"resumed from {latest.path} at step {start_step}")
        if metrics_path.exists():  # drop steps logged after the checkpoint: they are redone
            metrics = [m for m in _read_metrics(metrics_path) if m["step"] <= start_step]
    if is_main:
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))

    def save_checkpoint(step: int) -> None:
        # FSDP2: gather full tensors (a collective on every rank); otherwise rank 0 holds them all.
        model_state, optimizer_state = distributed.full_state_dicts(model, optimizer) if fsdp \
            else (None, optimizer.state_dict())
        training_state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                          "accumulator": acc.state_dict()}
        state = {"step": step, "epoch": step // windows_per_epoch, "window_in_epoch": step % windows_per_epoch,
                 "batch_size": batch_size, "seed": config.seed, "fsdp": fsdp, "world_size": world_size,
                 "config": config.to_dict()}
        if is_main:
            try:
                checkpoint.save(output, step, model, training_state, state, keep=config.keep_checkpoints,
                                model_state=model_state)
            except OSError as exc:
                previous = checkpoint.find_latest(output, warn=lambda _: None)
                raise TrainingError(f"could not write {output}/checkpoint-{step}: {exc.strerror or exc}; "
                                    f"the previous checkpoint is intact: {previous.path if previous else 'none'}"
                                    ) from None
        distributed.barrier()

    # ---- the data order: global window t -> this rank's micro-batches ---------------
    def window_batches():
        for window in global_windows(len(examples), batch_size, config.seed, start_step, total_steps):
            micro = split_window(window, micro_batch_size, rank, world_size, lengths)
            if config.packing:
                yield [pack([examples[i] for i in indices]) for indices in micro]
            else:
                yield [collate([examples[i] for i in indices], tokenizer.pad_token_id) for indices in micro]

    # ---- the loop ----------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not (is_main and config.progress),
               unit="step", dynamic_ncols=True)
    step, num_nonfinite_in_row, stopped_by = start_step, 0, None
    with StopRequest() as stop, warnings.catch_warnings():
        # The Accumulator warns about skipped windows; here they get one log line each instead.
        warnings.filterwarnings("ignore", message=r"window \d+")
        for window in acc.grouped_windows(window_batches()):
            t0 = time.perf_counter()
            for batch in window:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast():
                    packed = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
                    summed = train_module(batch["input_ids"], batch.get("attention_mask"), batch["labels"], **packed)
                window.scale(summed).backward()
            stats = window.step()
            step += 1
            seconds = time.perf_counter() - t0
            record = {"step": step, "loss": stats.loss, "num_targets": stats.num_targets,
                      "grad_norm": stats.grad_norm, "lr": stats.lr,
                      "tokens_per_second": stats.num_targets / seconds if seconds > 0 else None,
                      "peak_memory_bytes": peak_memory_bytes(device),
                      "padding_fraction": padding_fraction(window.batches), "skipped": stats.skipped,
                      "skip_reason": stats.skip_reason, "seconds": seconds}

            if eval_examples and eval_every and (step % eval_every == 0 or step == total_steps):
                eval_model = distributed.unwrap(train_module).model
                record["eval_loss"] = eval_loss(loss_module, eval_examples, tokenizer.pad_token_id, device,
                                                count=count, autocast=autocast)
                if fsdp:  # generate() bypasses the root's forward, which would gather its weights
                    train_module.unshard()
                with autocast():
                    record["eval_accuracy"] = exact_match(eval_model, tokenizer,
                                                          eval_records[:config.eval_examples], device)
                if fsdp:
                    train_module.reshard()
            metrics.append(record)
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{record['tokens_per_second'] or 0:.0f}",
                            **({"eval_acc": f"{record['eval_accuracy']:.2f}"}
                               if record.get("eval_accuracy") is not None else {}))
            bar.update(1)
            if stats.skipped and is_main:
                bar.write(f"step {step}: optimizer step skipped ({stats.skip_reason})")

            num_nonfinite_in_row = num_nonfinite_in_row + 1 if stats.skip_reason == "nonfinite" else 0
            if num_nonfinite_in_row >= config.max_nonfinite:
                raise TrainingError(f"loss or gradient was not finite for {num_nonfinite_in_row} windows in a "
                                    f"row (last at step {step}); no NaN reached the weights. Lower --lr or "
                                    "check the data")

            stopped_by = distributed.any_rank(stop.signal)  # every rank stops after the same window
            if stopped_by is not None:
                save_checkpoint(step)
                break
            if save_every and step % save_every == 0 and step < total_steps:
                save_checkpoint(step)
    bar.close()

    interrupted = stopped_by is not None
    if interrupted:
        name = signal.Signals(stopped_by).name
        log(f"{name}: stopped after step {step}/{total_steps}; checkpoint saved in {output}/checkpoint-{step}. "
            f"Resume with: gradaccum train --output {output} --resume (and the same arguments)")
    else:
        full_state = distributed.full_state_dicts(model, optimizer)[0] if fsdp else None
        if is_main:
            note = save_final(model, tokenizer, output / "final", merge_lora=config.merge_lora,
                              state_dict=full_state)
            log(f"final model: {output}/final ({note})")
        distributed.barrier()
    if is_main and metrics:
        from .plots import plot_training
        plot_training(metrics, output / "loss.png", title=f"{config.model}: B={batch_size}, "
                      f"{micro_batch_size}x{accumulation_steps}x{world_size}, {config.accumulation}")
    if is_main and not interrupted:  # samples of what it learned; the tiny preset also proves its first step
        from .proof import end_of_run_lines
        for line in end_of_run_lines(config, model, tokenizer, examples, eval_records, batch_size,
                                     micro_batch_size, device, world_size):
            log(line)
    wall = time.perf_counter() - t_start
    if metrics and is_main:
        first = next((m["loss"] for m in metrics if not m["skipped"]), float("nan"))
        last = metrics[-1]
        summary = f"loss {first:.4f} -> {last['loss']:.4f}"
        if last.get("eval_accuracy") is not None:
            summary += f", eval loss {last['eval_loss']:.4f}, exact match {last['eval_accuracy']:.1%}"
        log(f"done: {step} steps in {wall:.0f} s; {summary}; output: {output}")
    distributed.shutdown()
    return TrainResult(output, step, interrupted, stopped_by, metrics, wall)
