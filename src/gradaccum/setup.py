"""What a job builds before its first step: device, dtype, model + tokenizer, examples, optimizer and
schedule, batch geometry.

`gradaccum train` and `gradaccum audit` both build through here, so the audit's models, data and
optimizer are those of the training runs it checks, by construction rather than by copy.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, ContextManager

import torch

from .config import RunConfig, TrainConfig
from .data import IGNORE_INDEX, DataStats, Example, read_records, tokenize
from .errors import ConfigError, DataError, ModelError
from .models import apply_lora, enable_gradient_checkpointing, load_model

# The parameters' dtype for each --dtype: bfloat16 trains float32 master weights under autocast.
PARAMETER_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}


def resolve_device(name: str) -> torch.device:
    """--device as a torch device; auto: this rank's GPU when there is one, else the CPU."""
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


def autocast_for(dtype: str, device: torch.device) -> Callable[[], ContextManager[Any]]:
    """A fresh context per forward: bfloat16 autocast for --dtype bfloat16, else nothing."""
    if dtype == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_model(config: RunConfig, device: torch.device, log: Callable[[str], None] = lambda _: None):
    """(model, tokenizer) on `device`: the same weights for the same seed, LoRA adapters included, with
    activation checkpointing when asked (before any DDP/FSDP2 wrapping, which must see the layers as
    they will run; the micro-batch finder then measures with it)."""
    torch.manual_seed(config.seed)  # LoRA adapters and anything else random start from the seed
    model, tokenizer = load_model(config.model, dtype=PARAMETER_DTYPES[config.dtype], seed=config.seed,
                                  trust_remote_code=config.trust_remote_code)
    if config.lora:
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha)
    if config.gradient_checkpointing:
        log(enable_gradient_checkpointing(model))
    if tokenizer.pad_token_id is None:
        raise ModelError(f"--model {config.model}: its tokenizer has no pad token")
    return model.to(device), tokenizer


def training_data_path(config: RunConfig) -> str:
    from . import tasks

    return config.data or str(tasks.default_train_path())


def training_examples(path: str, tokenizer: Any, max_length: int, format: str = "auto",
                      chat_template: bool = True) -> tuple[list[Example], DataStats]:
    """The training data read (as --format) and tokenized (pairs through the chat template unless
    --no-chat-template); data in which no example keeps a target is refused."""
    examples, stats = tokenize(read_records(path, format), tokenizer, max_length, path=path,
                               chat_template=chat_template)
    if examples and stats.num_empty_targets == len(examples):  # every step would be skipped
        cause = (f"; {stats.num_truncated} were cut to --max-length {max_length} tokens (the longest has "
                 f"{stats.max_example_tokens}): raise --max-length or shorten the prompts"
                 if stats.num_truncated else "")
        raise DataError(f"{path}: {stats.num_empty_targets} of {len(examples)} examples have no target token "
                        f"left, so there is nothing to train on{cause}")
    return examples, stats


def pairs_note(stats: DataStats) -> str | None:
    """How prompt/completion (and Alpaca) pairs were trained, for the log; None when there were none."""
    return {"chat": "prompt/completion pairs: through the chat template",
            "raw": "prompt/completion pairs: as raw text"}.get(stats.pairs_as)


def num_targets(example: Example) -> int:
    """Target tokens of one example as the loss counts them: position 0 predicts nothing."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def default_lr(config: RunConfig) -> float:
    """--lr, or a default that suits the kind of run: from scratch, LoRA, or full fine-tune."""
    return config.lr or (3e-3 if config.model == "tiny" else 2e-4 if config.lora else 5e-5)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to 10% at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def optimizer_and_schedule(params: list[torch.Tensor], lr: float, weight_decay: float, device: torch.device,
                           warmup_steps: int, total_steps: int):
    """(AdamW, its warm-up + cosine schedule), stepped once per window."""
    # fused: one kernel per parameter on CPU and CUDA, with no parameter-sized temporaries.
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                  fused=device.type in ("cpu", "cuda") or None)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))


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
        raise ConfigError(f"--resume: the checkpoint's effective batch of {batch_size} sequences is not a multiple "
                          f"of micro-batch size {micro_batch_size} x world size {world_size} = {per_step}; choose "
                          f"a --micro-batch-size (and number of processes) whose product divides {batch_size}")
    return batch_size // per_step, batch_size
