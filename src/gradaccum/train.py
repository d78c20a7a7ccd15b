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
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, distributed, run_folder
from .accumulate import Accumulator
from .config import TrainConfig
from .errors import CheckpointError, ConfigError, DataError, ModelError, TrainingError
from .data import DataStats, collate, global_windows, pack, padding_fraction, read_jsonl, split_window, tokenize
from .evaluate import eval_loss, exact_match
from .losses import CausalLMLoss, count_target_sequences, count_targets
from .memory import peak_memory_bytes
from .models import apply_lora, load_model, own_memory, packing_unsupported_reason, save_final

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}  # bf16: autocast


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
        raise ConfigError(f"--device: unknown device {name!r}") from None
    # Only kinds that hold real data and that torch can train on here: `meta` holds no data, and an
    # unavailable backend would fail deep inside the first forward.
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                 "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}
    if device.type not in available:
        raise ConfigError(f"--device {name}: cannot train on a {device.type!r} device; use cpu, cuda, cuda:N, "
                         "mps or xpu")
    if not available[device.type]:
        raise ConfigError(f"--device {name}: no {device.type.upper()} device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_batch(config: TrainConfig, world_size: int, micro_batch_size: int,
                  resumed_batch_size: int | None = None) -> tuple[int, int]:
    """(accumulation_steps, effective batch B) with B = micro x accumulation x world.

    A resumed run keeps the B of its checkpoint: B decides which examples form each step (and the
    schedule's length), so a different B would silently train another run from the next step on.
    Any split of the same B is fine; without --batch-size the accumulation steps follow from it.
    """
    per_step = micro_batch_size * world_size
    if resumed_batch_size is not None:
        return _resumed_batch(config, world_size, micro_batch_size, resumed_batch_size)
    if config.batch_size is not None:
        if config.batch_size % per_step:
            raise ConfigError(f"--batch-size {config.batch_size} is not a multiple of micro-batch size "
                             f"{micro_batch_size} x world size {world_size} = {per_step}")
        return config.batch_size // per_step, config.batch_size
    accumulation_steps = config.accumulation_steps or 4
    return accumulation_steps, per_step * accumulation_steps


def _resumed_batch(config: TrainConfig, world_size: int, micro_batch_size: int, batch_size: int) -> tuple[int, int]:
    per_step = micro_batch_size * world_size
    if config.batch_size is not None and config.batch_size != batch_size:
        asked = f"--batch-size {config.batch_size}"
    elif config.accumulation_steps is not None and per_step * config.accumulation_steps != batch_size:
        asked = (f"micro-batch {micro_batch_size} x --accumulation-steps {config.accumulation_steps} x world "
                 f"{world_size} = {per_step * config.accumulation_steps}")
    else:
        asked = None
    if asked:
        raise ConfigError(f"--resume: the checkpoint trained with an effective batch of {batch_size} sequences per "
                         f"step, and {asked} would change it from the next step on; resume with --batch-size "
                         f"{batch_size} (any split of it gives the same weights) or start a new run")
    if batch_size % per_step:
        raise ConfigError(f"--resume: the checkpoint's effective batch of {batch_size} sequences is not a multiple of "
                         f"micro-batch size {micro_batch_size} x world size {world_size} = {per_step}; choose a "
                         f"--micro-batch-size (and number of processes) whose product divides {batch_size}")
    return batch_size // per_step, batch_size


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


def check_targets(examples: list, stats: DataStats, path: str, max_length: int) -> None:
    """Refuse data in which no example keeps a target token: every step would be skipped."""
    if examples and stats.num_empty_targets == len(examples):
        cause = (f"; {stats.num_truncated} were cut to --max-length {max_length} tokens (the longest has "
                 f"{stats.max_example_tokens}): raise --max-length or shorten the prompts"
                 if stats.num_truncated else "")
        raise DataError(f"{path}: {stats.num_empty_targets} of {len(examples)} examples have no target token "
                         f"left, so there is nothing to train on{cause}")


def weights_are_finite(params: list[torch.Tensor], fsdp: bool, device: torch.device) -> bool:
    """Whether every trainable weight is finite, on every rank; one fused reduction and one sync.

    A finite L2 norm proves every entry finite. The fused L2 kernel is the cheap one (on CPU, 46 ms
    for SmolLM2-135M against 900 ms for the inf-norm, and 210 ms for its fused AdamW step); only
    when a norm is not finite does a per-tensor min/max tell overflow of large finite weights from
    weights that are inf or NaN.
    """
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # FSDP2: this rank's shard
    local = [t.detach() for t in local if t.numel()]
    finite = torch.tensor(True, device=device)
    if local:
        norms = torch.stack(torch._foreach_norm(local, 2))
        finite = norms.isfinite().all()
        if not finite:
            finite = torch.stack([torch.stack(torch.aminmax(local[i])) for i in
                                  (~norms.isfinite()).nonzero().flatten().tolist()]).isfinite().all()
    if fsdp:  # each rank holds different shards: agree, or one rank would stop and the others hang
        bad = (~finite).to(device=device, dtype=torch.int32).reshape(1)
        return int(distributed.all_reduce_sum(bad)) == 0
    return bool(finite)


def resume(output: Path, model, optimizer, scheduler, acc: Accumulator, fsdp: bool, batch_size: int) -> int:
    """Load the newest checkpoint that loads (older ones after any failure); return its step."""
    def restore(path: Path) -> int:
        # Everything, every time: a failed attempt on a newer checkpoint may have loaded part of it.
        training_state, state = checkpoint.load(path, None if fsdp else model)
        if state.get("batch_size") != batch_size:
            raise CheckpointError(f"{path}: trained with batch {state.get('batch_size')}, not {batch_size}")
        if fsdp:  # full state dicts, sharded back over the ranks
            distributed.load_full_state_dicts(model, optimizer, checkpoint.load_weights(path),
                                              training_state["optimizer"])
        else:
            optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        acc.load_state_dict(training_state["accumulator"])
        return state["step"]

    loaded = checkpoint.load_latest(output, restore, warn=log)
    if loaded is None:
        raise CheckpointError(f"--resume: no checkpoint in {output}/ could be loaded (see the messages above)")
    latest, step = loaded
    log(f"resumed from {latest.path} at step {step}")
    return step


def resume_point(output: Path) -> dict[str, Any]:
    """state.json of the newest checkpoint that verifies: the run's effective batch and wrapper."""
    for candidate in reversed(checkpoint.list_checkpoints(output)):
        try:
            checkpoint.verify(candidate.path)
            state = checkpoint.read_state(candidate.path)
        except CheckpointError:
            continue  # load_latest reports it
        if isinstance(state.get("batch_size"), int):
            return state
    raise CheckpointError(f"--resume: no complete checkpoint in {output}/ (all were damaged)")


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
        raise ConfigError("--fsdp with --lora is not supported yet; use DDP (the default) for LoRA")
    # Nothing is written until every check has passed (run_folder.claim below): a refused run leaves
    # --output as it found it, and --overwrite deletes nothing for a run that cannot start.
    output = run_folder.resolve(config)
    if is_main or config.resume:
        run_folder.check(output, config, has_checkpoint=bool(checkpoint.list_checkpoints(output)))
    resumed = resume_point(output) if config.resume else None
    if resumed is not None and resumed.get("fsdp", False) != fsdp:
        how = "with" if resumed.get("fsdp") else "without"
        raise ConfigError(f"--resume: the checkpoints in {output}/ were written {how} --fsdp under torchrun; "
                         "resume them the same way")

    # ---- model -------------------------------------------------------------------
    model, tokenizer = load_model(config.model, dtype=DTYPES[config.dtype], seed=config.seed,
                                  trust_remote_code=config.trust_remote_code)
    if config.lora:
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha)
    model.to(device)
    if tokenizer.pad_token_id is None:
        raise ModelError(f"--model {config.model}: its tokenizer has no pad token")
    if config.packing and (reason := packing_unsupported_reason(model)):
        raise ConfigError(f"--packing: {reason}; train without --packing")
    loss_module = CausalLMLoss(model, normalize=config.normalize, chunked=config.chunked_loss)
    log(f"LM head loss: {loss_module.head_kernel}" + ("" if loss_module.uses_chunked_path
                                                    else f" ({loss_module.fallback_reason})"))

    # ---- data --------------------------------------------------------------------
    from . import tasks

    train_path = config.data or str(tasks.default_train_path())
    eval_path = config.eval_data or (str(tasks.default_eval_path()) if config.data is None else None)
    examples, data_stats = tokenize(read_jsonl(train_path), tokenizer, config.max_length, path=train_path)
    check_targets(examples, data_stats, train_path, config.max_length)
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
    accumulation_steps, batch_size = resolve_batch(config, world_size, micro_batch_size,
                                                   resumed["batch_size"] if resumed else None)
    windows_per_epoch = math.ceil(len(examples) / batch_size)
    if config.max_steps is not None:
        total_steps = config.max_steps
    elif config.epochs is not None:
        total_steps = math.ceil(config.epochs * windows_per_epoch)
    else:
        total_steps = 300 if config.model == "tiny" else windows_per_epoch
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
        start_step = resume(output, model, optimizer, scheduler, acc, fsdp, batch_size)
        if metrics_path.exists():  # drop steps logged after the checkpoint: they are redone
            metrics = [m for m in _read_metrics(metrics_path) if m["step"] <= start_step]

    # ---- every check passed: the first write ------------------------------------------
    if is_main:
        run_folder.claim(output, config)
        if config.resume:
            checkpoint.remove_partial(output)  # what a kill during a save left behind
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    distributed.barrier()

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
            # The gradient was finite (else the step was skipped), but the update can still overflow
            # (a huge --lr): stop before such weights reach a checkpoint or final/.
            if not stats.skipped and not weights_are_finite(params, fsdp, device):
                last = checkpoint.find_latest(output, warn=lambda _: None) if is_main else None
                kept = f"the last checkpoint, {last.path}, is intact" if last else "no checkpoint was written"
                raise TrainingError(f"step {step} made the weights not finite (the update overflowed: gradient norm "
                                    f"{stats.grad_norm:.3g}, lr {stats.lr:.3g}); nothing from it was saved and "
                                    f"{kept}. Lower --lr")
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
