"""The fine-tuning loop: set up, resume, run windows through the Accumulator, evaluate, log, finish.

Step t (0-based) trains on global window t of the seeded order: examples
[t*B, (t+1)*B) of epoch t // windows_per_epoch's permutation, B the effective batch.
How B is split (micro-batch x accumulation x ranks) never changes which examples
form a step, so every split ends with the same weights, and a resumed run only needs
the step number to know where it is in the data.

`train()` reads top to bottom as its phases: `set_up` builds a `Run` (everything fixed for the
run), `start` resumes and makes the first write, the loop runs `train_window`, `evaluate` and
`log_step` once per window (saving.Checkpointing: background saves), and `finish` saves final/ and plots.
The loop's state is one `Progress`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import checkpoint, distributed, reporting, run_folder
from .accumulate import Accumulator, Window
from .config import TrainConfig
from .data import Example, collate, global_windows, pack, padding_fraction, read_records, split_window, tokenize
from .errors import CheckpointError, ConfigError, TrainingError
from .evaluate import eval_loss, exact_match_accuracy
from .losses import CausalLMLoss, count_target_sequences, count_targets
from .memory import peak_memory_bytes
from .models import final_state_dict, own_memory, save_final
from .packing import packing_unsupported_reason
from .saving import Checkpointing, resumable_base, snapshot_bytes
from .setup import (autocast_for, build_model, default_lr, optimizer_and_schedule, resolve_batch, resolve_device,
                    pairs_note, training_data_path, training_examples)


@dataclass
class TrainResult:
    output: Path
    steps: int  # windows trained (the data position)
    interrupted: bool
    stopped_by: int | None  # the signal that stopped the run early, if any
    metrics: list[dict[str, Any]]
    wall_seconds: float
    final_state: dict[str, torch.Tensor] | None = None  # the final weights, with keep_final_state=True


@dataclass
class Run:
    """Everything `set_up` builds; fixed for the whole run (the loop's state is `Progress`)."""

    config: TrainConfig
    device: torch.device
    rank: int
    world_size: int
    is_main: bool
    fsdp: bool
    output: Path
    model: torch.nn.Module
    tokenizer: Any
    loss_module: CausalLMLoss  # the model and its summed loss: what is wrapped and what evaluates
    train_module: torch.nn.Module  # loss_module wrapped by DDP / FSDP2 (itself in one process)
    params: list[torch.nn.Parameter]  # trainable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    acc: Accumulator
    autocast: Callable[[], Any]
    examples: list[Example]
    lengths: list[int]  # tokens per example: split_window sorts each window by them
    eval_examples: list[Example]
    eval_records: list[dict]
    encoded_as: str  # data.DataStats.encoded_as: whether final/'s tokenizer puts BOS first, as training did
    micro_batch_size: int
    accumulation_steps: int
    batch_size: int  # B = micro x accumulation x world
    windows_per_epoch: int
    total_steps: int
    eval_every: int
    # The frozen parameters (LoRA's base) that checkpoints leave out, once known (saving.Checkpointing).
    frozen_base: checkpoint.FrozenBase | None = None


@dataclass
class Progress:
    """The loop's state: where it is, what it logged, why it stops."""

    step: int  # windows trained so far (the data position)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    num_nonfinite_in_row: int = 0
    stopped_by: int | None = None  # the signal that asked the run to stop


def train(config: TrainConfig, *, keep_final_state: bool = False) -> TrainResult:
    """Fine-tune as `config` says; `keep_final_state` also returns the final weights (as final/ holds them)."""
    t_start = time.perf_counter()
    run = set_up(config)
    progress, trackers = start(run)
    from tqdm.auto import tqdm

    bar = tqdm(total=run.total_steps, initial=progress.step, disable=not (run.is_main and config.progress),
               unit="step", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)  # a log: 2/min
    with trackers, StopRequest() as stop, warnings.catch_warnings(), Checkpointing(run) as saves:
        # The Accumulator warns about skipped windows; here they get one log line each instead.
        warnings.filterwarnings("ignore", message=r"window \d+")
        for window in run.acc.grouped_windows(micro_batches(run, progress.step)):
            record = train_window(run, window, progress)
            if run.eval_examples and run.eval_every and (progress.step % run.eval_every == 0
                                                         or progress.step == run.total_steps):
                record.update(evaluate(run))
            log_step(run, progress, record, bar)
            trackers.log(record)  # --report-to: the same record, at its step
            progress.stopped_by = distributed.any_rank(stop.signal)  # every rank stops after the same window
            if progress.stopped_by is not None:
                saves.save(progress.step, wait=True)
                break
            if saves.due(progress.step):
                saves.save(progress.step)
    bar.close()
    return finish(run, progress, t_start, keep_final_state)


# ---------------------------------------------------------------------------------------------
# Set up: check everything, build everything, write nothing


def set_up(config: TrainConfig) -> Run:
    distributed.init_from_env()
    rank, world_size, is_main = distributed.rank(), distributed.world_size(), distributed.is_main_process()
    device = resolve_device(config.device)
    fsdp = config.fsdp and world_size > 1
    if config.fsdp and not fsdp:
        log("--fsdp: a single process has nothing to shard; training without it")
    if fsdp and config.lora:
        raise ConfigError("--fsdp with --lora is not supported yet; use DDP (the default) for LoRA")
    reporting.check(config.report_to)  # every rank: a tracker package that is missing fails them all
    # Nothing is written until every check has passed (`start`): a refused run leaves --output as
    # it found it, and --overwrite deletes nothing for a run that cannot start.
    output = run_folder.resolve(config)
    if is_main or config.resume:
        run_folder.check(output, config, has_checkpoint=bool(checkpoint.list_checkpoints(output)))
    resumed = resume_point(output) if config.resume else None
    if resumed is not None and resumed.get("fsdp", False) != fsdp:
        how = "with" if resumed.get("fsdp") else "without"
        raise ConfigError(f"--resume: the checkpoints in {output}/ were written {how} --fsdp under torchrun; "
                          "resume them the same way")

    model, tokenizer = build_model(config, device, log)
    frozen = resumable_base(resumed, model, output, config) if resumed is not None else None
    if config.packing and (reason := packing_unsupported_reason(model)):
        raise ConfigError(f"--packing: {reason}; train without --packing")
    loss_module = CausalLMLoss(model, normalize=config.normalize, chunked=config.chunked_loss)
    log(f"LM head loss: {loss_module.head_kernel}" + ("" if loss_module.uses_chunked_path
                                                    else f" ({loss_module.fallback_reason})"))
    examples, eval_examples, eval_records, encoded_as = _read_data(config, tokenizer)
    autocast = autocast_for(config.dtype, device)

    if config.micro_batch_size == "auto":
        from .memory import find_micro_batch_size  # measured probe; prints its choice
        # On the CPU a save's snapshot shares the memory the finder budgets (on a GPU it is host memory).
        micro_batch_size = find_micro_batch_size(loss_module, examples, config, device, tokenizer.pad_token_id,
                                                 reserved_bytes=snapshot_bytes(model) if device.type == "cpu" else 0)
    else:
        micro_batch_size = config.micro_batch_size
    accumulation_steps, batch_size = resolve_batch(config, world_size, micro_batch_size,
                                                   resumed["batch_size"] if resumed else None)
    windows_per_epoch, total_steps, warmup_steps, eval_every = _schedule(config, len(examples), batch_size)
    lr = default_lr(config)
    log(f"batch: {batch_size} sequences per step = micro-batch {micro_batch_size} x accumulation "
        f"{accumulation_steps} x world {world_size}; {total_steps} steps, {windows_per_epoch} per epoch; "
        f"accumulation={config.accumulation}, lr={lr:g}, dtype={config.dtype}, device={device}")

    own_memory(list(model.parameters()))  # before DDP broadcasts into them / FSDP2 shards them
    train_module = distributed.wrap(loss_module, fsdp, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, lr, config.weight_decay, device, warmup_steps, total_steps)
    acc = Accumulator(train_module, optimizer, accumulation_steps=accumulation_steps,
                      max_grad_norm=config.max_grad_norm, scheduler=scheduler, normalize=config.normalize,
                      accumulation=config.accumulation)
    return Run(config=config, device=device, rank=rank, world_size=world_size, is_main=is_main, fsdp=fsdp,
               output=output, model=model, tokenizer=tokenizer, loss_module=loss_module, train_module=train_module,
               params=params, optimizer=optimizer, scheduler=scheduler, acc=acc, autocast=autocast,
               examples=examples, lengths=[len(example.input_ids) for example in examples],
               eval_examples=eval_examples, eval_records=eval_records, encoded_as=encoded_as,
               micro_batch_size=micro_batch_size,
               accumulation_steps=accumulation_steps, batch_size=batch_size, windows_per_epoch=windows_per_epoch,
               total_steps=total_steps, eval_every=eval_every, frozen_base=frozen)


def _read_data(config: TrainConfig, tokenizer) -> tuple[list[Example], list[Example], list[dict], str]:
    """(training examples, eval examples, eval records, how training was encoded); eval is the bundled split
    for bundled data."""
    from . import tasks

    train_path = training_data_path(config)
    eval_path = config.eval_data or (str(tasks.default_eval_path()) if config.data is None else None)
    examples, stats = training_examples(train_path, tokenizer, config.max_length, config.format, config.chat_template)
    eval_lines = read_records(eval_path, config.format) if eval_path else []  # loss and accuracy both use it
    eval_examples = (tokenize(eval_lines, tokenizer, config.max_length, path=eval_path,
                              chat_template=config.chat_template)[0] if eval_lines else [])
    log(f"data: {len(examples)} examples from {train_path} ({stats.num_truncated} truncated to "
        f"{config.max_length} tokens, {stats.num_empty_targets} without targets); "
        f"eval: {len(eval_examples)} from {eval_path or '-'}")
    if (note := pairs_note(stats)) is not None:
        log(note)
    return examples, eval_examples, [record for _, record in eval_lines], stats.encoded_as


def _schedule(config: TrainConfig, num_examples: int, batch_size: int) -> tuple[int, int, int, int]:
    """(windows per epoch, total steps, warm-up steps, eval every) with their defaults (saving.py: when to save)."""
    windows_per_epoch = math.ceil(num_examples / batch_size)
    if config.max_steps is not None:
        total_steps = config.max_steps
    elif config.epochs is not None:
        total_steps = math.ceil(config.epochs * windows_per_epoch)
    else:
        total_steps = 1200 if config.model == "tiny" else windows_per_epoch

    def default(value: int | None, fraction: int) -> int:
        return value if value is not None else max(1, total_steps // fraction)

    return windows_per_epoch, total_steps, default(config.warmup_steps, 20), default(config.eval_every, 5)


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


# ---------------------------------------------------------------------------------------------
# Start: resume, then the first write


def start(run: Run) -> tuple[Progress, reporting.Trackers]:
    """Where the loop starts: step 0, or the newest checkpoint that loads (--resume). Then the run's
    first write: the folder is claimed, metrics.jsonl keeps only the steps before that point, and the
    --report-to trackers open; if they fail to, the claim is undone (run_folder.Claim)."""
    progress = Progress(step=0)
    metrics_path = run.output / "metrics.jsonl"
    if run.config.resume:
        progress.step = resume(run)
        if metrics_path.exists():  # drop steps logged after the checkpoint: they are redone
            progress.metrics = [m for m in _read_metrics(metrics_path) if m["step"] <= progress.step]
    trackers = reporting.Trackers([])  # only the main process reports
    if run.is_main:
        with run_folder.claim(run.output, run.config):
            if run.config.resume:
                checkpoint.remove_partial(run.output)  # what a kill during a save left behind
            metrics_path.write_text("".join(json.dumps(m) + "\n" for m in progress.metrics))
            trackers = reporting.open_trackers(run.config, run.output, progress.step, is_main=True)
    distributed.barrier()
    return progress, trackers


def resume(run: Run) -> int:
    """Load the newest checkpoint that loads (older ones after any failure); return its step."""
    def restore(path: Path) -> int:
        # Everything, every time: a failed attempt on a newer checkpoint may have loaded part of it.
        training_state, state = checkpoint.load(path, None if run.fsdp else run.model, run.frozen_base)
        if state.get("batch_size") != run.batch_size:
            raise CheckpointError(f"{path}: trained with batch {state.get('batch_size')}, not {run.batch_size}")
        if run.fsdp:  # full state dicts, sharded back over the ranks
            checkpoint.check_shapes(path, run.model)
            distributed.load_full_state_dicts(run.model, run.optimizer, checkpoint.load_weights(path),
                                              training_state["optimizer"])
        else:
            run.optimizer.load_state_dict(training_state["optimizer"])
        run.scheduler.load_state_dict(training_state["scheduler"])
        run.acc.load_state_dict(training_state["accumulator"])
        return state["step"]

    loaded = checkpoint.load_latest(run.output, restore, warn=log)
    if loaded is None:
        raise CheckpointError(f"--resume: no checkpoint in {run.output}/ could be loaded (see the messages above)")
    latest, step = loaded
    log(f"resumed from {latest.path} at step {step}")
    return step


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl up to its first unreadable line (a kill can cut the last line short)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


# ---------------------------------------------------------------------------------------------
# One window: its micro-batches, forward + backward, the optimizer step, its record


def micro_batches(run: Run, start_step: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """This rank's micro-batches of every global window from `start_step` on, one list per window."""
    for indices in global_windows(len(run.examples), run.batch_size, run.config.seed, start_step, run.total_steps):
        mine = split_window(indices, run.micro_batch_size, run.rank, run.world_size, run.lengths)
        chosen = [[run.examples[i] for i in micro_indices] for micro_indices in mine]
        if run.config.packing:
            yield [pack(examples) for examples in chosen]
        else:
            yield [collate(examples, run.tokenizer.pad_token_id) for examples in chosen]


def train_window(run: Run, window: Window, progress: Progress) -> dict[str, Any]:
    """Forward and backward every micro-batch, one optimizer step; the step's metrics record."""
    t0 = time.perf_counter()
    for batch in window:
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        with run.autocast():
            packed = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
            summed = run.train_module(batch["input_ids"], batch.get("attention_mask"), batch["labels"], **packed)
        window.scale(summed).backward()
    stats = window.step()
    progress.step += 1
    # The gradient was finite (else the step was skipped), but the update can still overflow
    # (a huge --lr): stop before such weights reach a checkpoint or final/.
    if not stats.skipped and not weights_are_finite(run.params, run.fsdp, run.device):
        last = checkpoint.find_latest(run.output, warn=lambda _: None) if run.is_main else None
        kept = f"the last checkpoint, {last.path}, is intact" if last else "no checkpoint was written"
        raise TrainingError(f"step {progress.step} made the weights not finite (the update overflowed: gradient "
                            f"norm {stats.grad_norm:.3g}, lr {stats.lr:.3g}); nothing from it was saved and {kept}. "
                            "Lower --lr")
    seconds = time.perf_counter() - t0
    return {"step": progress.step, "loss": stats.loss, "num_targets": stats.num_targets,
            "grad_norm": stats.grad_norm, "lr": stats.lr,
            "targets_per_second": stats.num_targets / seconds if seconds > 0 else None,
            "peak_memory_bytes": peak_memory_bytes(run.device),
            "padding_fraction": padding_fraction(window.batches), "skipped": stats.skipped,
            "skip_reason": stats.skip_reason, "seconds": seconds}


def weights_are_finite(params: list[torch.Tensor], fsdp: bool, device: torch.device) -> bool:
    """Whether every trainable weight is finite, on every rank; one fused reduction and one sync.

    A finite L2 norm proves every entry finite, and the fused L2 kernel is the cheap one (far below
    the inf-norm's cost, and below the fused AdamW step's); only when a norm is not finite does a
    per-tensor min/max tell overflow of large finite weights from weights that are inf or NaN.
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
        return distributed.any_rank(None if bool(finite) else 1) is None
    return bool(finite)


def evaluate(run: Run) -> dict[str, float | None]:
    """Held-out loss (token mean over the whole set) and greedy exact-match accuracy."""
    count = count_target_sequences if run.config.normalize == "samples" else count_targets
    result = {"eval_loss": eval_loss(run.loss_module, run.eval_examples, run.tokenizer.pad_token_id, run.device,
                                     count=count, autocast=run.autocast)}
    if run.fsdp:  # generate() bypasses the root's forward, which would gather its weights
        run.train_module.unshard()
    with run.autocast():
        result["eval_accuracy"] = exact_match_accuracy(distributed.unwrap(run.train_module).model, run.tokenizer,
                                                       run.eval_records[:run.config.eval_examples], run.device,
                                                       chat_template=run.config.chat_template)
    if run.fsdp:
        run.train_module.reshard()
    return result


def log_step(run: Run, progress: Progress, record: dict[str, Any], bar) -> None:
    """metrics.jsonl, the progress bar; stop after --max-nonfinite windows in a row without a step."""
    progress.metrics.append(record)
    if run.is_main:
        with open(run.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    bar.set_postfix(loss=f"{record['loss']:.4f}", targets_s=f"{record['targets_per_second'] or 0:.0f}",
                    **({"eval_acc": f"{record['eval_accuracy']:.2f}"}
                       if record.get("eval_accuracy") is not None else {}), refresh=False)
    bar.update(1)
    if record["skipped"] and run.is_main:
        bar.write(f"step {progress.step}: optimizer step skipped ({record['skip_reason']})")
    progress.num_nonfinite_in_row = progress.num_nonfinite_in_row + 1 if record["skip_reason"] == "nonfinite" else 0
    if progress.num_nonfinite_in_row >= run.config.max_nonfinite:
        raise TrainingError(f"loss or gradient was not finite for {progress.num_nonfinite_in_row} windows in a "
                            f"row (last at step {progress.step}); no NaN reached the weights. Lower --lr or "
                            "check the data")


# ---------------------------------------------------------------------------------------------
# Finish: final/, the loss curve, the summary


def finish(run: Run, progress: Progress, t_start: float, keep_final_state: bool) -> TrainResult:
    config, output, step = run.config, run.output, progress.step
    interrupted = progress.stopped_by is not None
    final_state = None
    if interrupted:
        name = signal.Signals(progress.stopped_by).name
        log(f"{name}: stopped after step {step}/{run.total_steps}; checkpoint saved in {output}/checkpoint-{step}. "
            f"Resume with: gradaccum train --output {output} --resume (and the same arguments)")
    else:
        final_state = save_final_model(run, keep_final_state)
    metrics = progress.metrics
    if run.is_main and metrics:
        from .plots import plot_training

        plot_training(metrics, output / "loss.png", title=f"{config.model}: B={run.batch_size}, "
                      f"{run.micro_batch_size}x{run.accumulation_steps}x{run.world_size}, {config.accumulation}")
    if run.is_main and not interrupted:  # samples of what it learned; the tiny preset also proves its first step
        from .proof import end_of_run_lines

        for line in end_of_run_lines(config, run.model, run.tokenizer, run.examples, run.eval_records,
                                     run.batch_size, run.micro_batch_size, run.device, run.world_size):
            log(line)
    seconds = time.perf_counter() - t_start
    if run.is_main and metrics:
        first = next((m["loss"] for m in metrics if not m["skipped"]), float("nan"))
        last = metrics[-1]
        summary = f"loss {first:.4f} -> {last['loss']:.4f}"
        if last.get("eval_accuracy") is not None:
            summary += f", eval loss {last['eval_loss']:.4f}, exact match {last['eval_accuracy']:.1%}"
        log(f"done: {step} steps in {seconds:.0f} s; {summary}; output: {output}")
    distributed.shutdown()
    return TrainResult(output, step, interrupted, progress.stopped_by, metrics, seconds, final_state)


def save_final_model(run: Run, keep_final_state: bool) -> dict[str, torch.Tensor] | None:
    """Write final/ (unless --no-save-final); return the final weights when asked to keep them."""
    config = run.config
    # FSDP2: gather the full weights, a collective that every rank joins.
    full_state = distributed.full_state_dicts(run.model, run.optimizer)[0] \
        if run.fsdp and (config.save_final or keep_final_state) else None
    kept = None
    if run.is_main:
        if keep_final_state:
            kept = final_state_dict(run.model, full_state)
        if config.save_final:
            note = save_final(run.model, run.tokenizer, run.output / "final", merge_lora=config.merge_lora,
                              state_dict=full_state, encoded_as=run.encoded_as,
                              trust_remote_code=config.trust_remote_code)
            log(f"final model: {run.output}/final ({note})")
        else:
            log("final model: not written (--no-save-final)")
    distributed.barrier()
    return kept


# ---------------------------------------------------------------------------------------------
# Signals and logging


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


def log(message: str) -> None:
    if distributed.is_main_process():
        print(message, flush=True)


def main(args) -> int:
    """`gradaccum train` from parsed arguments: 0, or 128 + the signal that stopped the run (the shell's way)."""
    result = train(TrainConfig.from_args(args))
    return 128 + result.stopped_by if result.interrupted else 0
