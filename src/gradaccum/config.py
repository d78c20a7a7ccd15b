"""Run arguments as dataclasses, one doc string per field; the CLI is generated from them.

`RunConfig` holds what every job that trains a model shares (model, data, dtype, LoRA, ...), declared
and checked once; `TrainConfig` and `AuditConfig` add their own fields. A field without a default is
a required flag. No torch here: `gradaccum --help` reads these classes and must stay fast.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .records import FORMATS  # records.py imports no torch either

DTYPES = ("float32", "bfloat16", "float64")  # `gradaccum train --dtype`
AUDIT_DTYPES = ("float64", "float32")  # the audit measures rounding, so no bfloat16
AGAINST = ("hf-trainer",)
TRACKERS = ("tensorboard", "wandb")  # `gradaccum train --report-to`


def _f(default: Any, help: str, **metadata: Any) -> Any:
    """A field with its CLI help; `MISSING` makes it required."""
    if default is MISSING:
        return field(metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(kw_only=True)
class RunConfig:
    """What every job that trains a model needs: which model on which data, how, and where."""

    model: str = _f("tiny", "'tiny' (embedded default), a local HF directory, a hub id, or a .gguf file")
    data: str | None = _f(None, "JSONL/JSON/CSV/TSV/parquet file, or a datasets folder (DIR[:SPLIT]); "
                                "default: bundled tasks")
    format: str = _f("auto", "record format of --data/--eval-data: auto (from each record's keys) | text | "
                             "prompt_completion | messages | alpaca | sharegpt", choices=FORMATS)
    chat_template: bool = _f(True, "prompt/completion and Alpaca records through the tokenizer's chat template "
                                   "when it has one; --no-chat-template: raw text")
    max_length: int = _f(256, "tokens per example; longer examples are truncated and counted")
    lr: float | None = _f(None, "peak learning rate (default: 3e-3 tiny, 2e-4 LoRA, 5e-5 full fine-tune)")
    max_grad_norm: float | None = _f(1.0, "clip the full accumulated gradient to this L2 norm once per step "
                                          "(0 disables)")
    seed: int = _f(0, "seed for initialisation and data order")
    dtype: str = _f("float32", "float32 | bfloat16 (bf16 autocast over float32 master weights; final/ and "
                               "checkpoints keep float32) | float64", choices=DTYPES)
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    lora: bool = _f(False, "train LoRA adapters through peft instead of all weights")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    gradient_checkpointing: bool = _f(False, "non-reentrant activation checkpointing per decoder layer: less "
                                             "activation memory for ~1/3 more compute per micro-batch; exact "
                                             "(same weights); --micro-batch-size auto measures with it")
    output: str | None = _f(None, "output folder (default: a new folder under runs/, named after the time)")
    trust_remote_code: bool = _f(False, "allow model code from the model's folder or hub repo to run")
    progress: bool = _f(True, "show progress (train: a progress bar; audit: one line per run)")

    def __post_init__(self) -> None:
        for name in ("max_length", "lora_r"):
            _at_least(name, getattr(self, name), 1)
        _at_least("seed", self.seed, 0)
        # inf passes `> 0` and nan fails every comparison: both are refused by name here, before
        # they become NaN weights.
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:  # inf: measure, never clip
            raise ConfigError(f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        if self.max_grad_norm == 0:
            self.max_grad_norm = None
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                shown = ", ".join(str(choice) for choice in choices if choice is not None)
                raise ConfigError(f"{_flag(f.name)}: unknown value {getattr(self, f.name)!r} (choose from {shown})")

    @classmethod
    def from_args(cls, args: Any) -> "RunConfig":
        """The config from parsed arguments (an argparse Namespace): one attribute per field."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def recorded(self) -> dict[str, Any]:
        """The settings as run_config.json (and a tracker) records them: `COMMAND_LINE_ONLY` ones false."""
        return {**self.to_dict(), **{name: False for name in COMMAND_LINE_ONLY if hasattr(self, name)}}


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{_flag(name)} must be >= {low}, got {value}")


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """`gradaccum train`."""

    eval_data: str | None = _f(None, "held-out data (the same kinds as --data) for eval loss and exact-match "
                                     "accuracy; default: bundled split when --data is the default, else none")
    micro_batch_size: int | str = _f(8, "sequences per forward/backward on each rank, or 'auto'")
    memory_budget: str | None = _f(None, "with --micro-batch-size auto: memory the run may use, e.g. 4GB, 12GiB, "
                                         "512MiB (default: 80% of available RAM on the CPU; the GPU's memory on CUDA)")
    accumulation_steps: int | None = _f(None, "micro-batches per optimizer step (default: from --batch-size, else 4)")
    batch_size: int | None = _f(None, "effective batch in sequences per optimizer step over all ranks "
                                      "(= micro-batch size x accumulation steps x world size)")
    max_steps: int | None = _f(None, "optimizer steps to take (default: --epochs, else 1200 for the tiny preset, "
                                     "1 epoch otherwise)")
    epochs: float | None = _f(None, "passes over the training data (alternative to --max-steps)")
    warmup_steps: int | None = _f(None, "linear warm-up steps before the cosine decay (default: 5% of the steps)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    accumulation: str = _f("exact", "exact | naive (reproduces the per-micro-batch-mean bug, for audits only)",
                           choices=("exact", "naive"))
    normalize: str = _f("tokens", "tokens: mean over all target tokens (= full batch) | samples: mean of "
                                  "per-sequence means", choices=("tokens", "samples"))
    merge_lora: bool = _f(True, "save final/ as the merged full model (else the adapter only)")
    fsdp: bool = _f(False, "shard with FSDP2 (fully_shard) instead of DDP under torchrun")
    chunked_loss: bool = _f(True, "LM-head cross-entropy in chunks, never materialising full logits")
    packing: bool = _f(False, "padding-free micro-batches: each micro-batch's examples concatenated into one "
                              "row, kept apart by position_ids (HF models with sdpa/eager/flash attention; refused "
                              "when a probe finds packed documents mixing; --normalize tokens)")
    eval_every: int | None = _f(None, "evaluate every N steps (default: 5 evaluations per run; 0 disables)")
    eval_examples: int = _f(200, "held-out examples used for exact-match accuracy")
    save_every: int | None = _f(None, "write checkpoint-N/ every N steps, in the background (default: every 30 "
                                      "minutes of wall time while waiting for saves stays under 5% of the run; "
                                      "0 disables; SIGINT/SIGTERM always save)")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    resume: bool = _f(False, "continue from the newest complete checkpoint in --output")
    overwrite: bool = _f(False, "reuse an --output folder that holds a different run")
    max_nonfinite: int = _f(5, "stop after this many windows in a row with a non-finite loss or gradient")
    save_final: bool = _f(True, "write final/ (the audit turns it off)")
    report_to: str = _f("none", "also send every metrics.jsonl record, and the run config, to: none | tensorboard "
                                "(event files in DIR/tensorboard/) | wandb (DIR/wandb/); a comma list for both, "
                                "e.g. tensorboard,wandb")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.micro_batch_size, str) and self.micro_batch_size != "auto":
            try:
                self.micro_batch_size = int(self.micro_batch_size)
            except ValueError:
                raise ConfigError(f"--micro-batch-size must be a positive integer or 'auto', "
                                  f"got {self.micro_batch_size!r}") from None
        if self.micro_batch_size != "auto":
            _at_least("micro_batch_size", self.micro_batch_size, 1)
        elif self.batch_size is None:
            raise ConfigError("--micro-batch-size auto needs --batch-size")
        if self.memory_budget is not None:
            parse_size(self.memory_budget)
            if self.micro_batch_size != "auto":
                raise ConfigError("--memory-budget only applies with --micro-batch-size auto")
        for name in ("accumulation_steps", "batch_size", "max_steps", "eval_examples", "keep_checkpoints",
                     "max_nonfinite"):
            _at_least(name, getattr(self, name), 1)
        for name in ("eval_every", "save_every", "warmup_steps"):
            _at_least(name, getattr(self, name), 0)
        if self.accumulation_steps is not None and self.batch_size is not None:
            raise ConfigError("give --accumulation-steps or --batch-size, not both")
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("give --max-steps or --epochs, not both")
        if self.epochs is not None and not 0 < self.epochs < math.inf:  # inf: an endless schedule
            raise ConfigError(f"--epochs must be a finite number > 0, got {self.epochs}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.packing and self.normalize == "samples":
            raise ConfigError("--packing needs --normalize tokens: a packed row holds several sequences")
        self.report_to = ",".join(trackers(self.report_to)) or "none"


def trackers(report_to: str) -> tuple[str, ...]:
    """--report-to as the trackers it names, in order, each once; () for none."""
    names = [name.strip() for name in str(report_to).split(",")]
    if names == ["none"]:
        return ()
    if "none" in names:
        raise ConfigError(f"--report-to {report_to}: 'none' cannot be combined with a tracker")
    if unknown := [name for name in names if name not in TRACKERS]:
        raise ConfigError(f"--report-to: unknown value {unknown[0]!r} (choose none, {', '.join(TRACKERS)}, or a "
                          f"comma list such as {','.join(TRACKERS)})")
    return tuple(dict.fromkeys(names))


# Settings that act on --output as it is at the time: a run_config.json records them as false, and a
# --config file may not turn them on (it would act again on every run made from that file).
COMMAND_LINE_ONLY = ("resume", "overwrite")

# Settings of which a run takes one: a flag given on the command line drops a --config file's value of
# the settings it excludes (`--epochs 2` over the file's `max_steps: 20`); both given the same way are
# still refused by TrainConfig.
_EXCLUDES = {"max_steps": ("epochs",), "epochs": ("max_steps",),
             "batch_size": ("accumulation_steps",), "accumulation_steps": ("batch_size",),
             "micro_batch_size": ("memory_budget",)}


def excluded_by(name: str, value: Any) -> tuple[str, ...]:
    """The settings that a flag `name` given as `value` replaces (a budget goes only with an 'auto' size)."""
    if name == "micro_batch_size" and value == "auto":
        return ()
    return _EXCLUDES.get(name, ())


# Fields that may change between a run and its --resume without changing what is trained:
# how the effective batch is split, where it runs, and how it reports. The effective batch itself
# (batch_size, or micro x accumulation x world) is checked against the checkpoint's by train.
RESUMABLE_CHANGES = {"micro_batch_size", "memory_budget", "accumulation_steps", "batch_size", "device", "fsdp",
                     "resume", "overwrite",
                     "output", "save_every", "keep_checkpoints", "progress", "eval_every", "eval_examples",
                     "max_nonfinite", "chunked_loss", "save_final", "gradient_checkpointing", "report_to"}


@dataclass(kw_only=True)
class AuditConfig(RunConfig):
    """`gradaccum audit`: every run is a `gradaccum train` run built from these fields."""

    batch_size: int = _f(MISSING, "effective batch B in sequences per optimizer step: the full batch")
    micro_batch_sizes: str | list[int] | None = _f(None, "comma-separated micro-batch sizes, each dividing "
                                                         "--batch-size (default: every power of two below it)")
    steps: int = _f(10, "optimizer steps of every run")
    dtype: str = _f("float64", "float64 | float32; the gate's bound is this run's own rounding in that dtype",
                    choices=AUDIT_DTYPES)
    against: str | None = _f(None, "hf-trainer: also train with transformers.Trainer, GA=k against GA=1",
                             choices=(None, *AGAINST))
    save_models: bool = _f(False, "also write every run's final model to DIR/runs/<run>/final (a full model "
                                  "per run; the report does not need them)")

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ConfigError(f"--batch-size must be an integer >= 2 (the full batch to split), "
                              f"got {self.batch_size!r}")
        super().__post_init__()
        _at_least("steps", self.steps, 1)
        self.micro_batch_sizes = _micro_batch_sizes(self.micro_batch_sizes, self.batch_size)


def _micro_batch_sizes(value: Any, batch_size: int) -> list[int]:
    """--micro-batch-sizes as a sorted list of divisors of the batch size, the batch size left out."""
    if value is None:
        sizes = [2 ** i for i in range(batch_size.bit_length()) if 2 ** i < batch_size and batch_size % 2 ** i == 0]
    else:
        items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else list(value)
        sizes = []
        for item in items:
            try:
                sizes.append(int(str(item).strip()))
            except ValueError:
                raise ConfigError(f"--micro-batch-sizes: {str(item).strip()!r} is not an integer "
                                  f"(expected e.g. 1,2,4)") from None
    if not sizes:
        raise ConfigError("--micro-batch-sizes: no sizes given")
    for size in sizes:
        if size < 1 or batch_size % size:
            raise ConfigError(f"--micro-batch-sizes: {size} does not divide --batch-size {batch_size}")
    # m = B is the full batch itself: it is always run, as the reference.
    sizes = sorted(set(size for size in sizes if size != batch_size))
    if not sizes:
        raise ConfigError(f"--micro-batch-sizes: give at least one size below --batch-size {batch_size}")
    return sizes


_UNITS = {"": 1, "b": 1,
          "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40,  # a bare letter: binary, like `free -g`
          "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(value: str | int | float) -> int:
    """Bytes in a size (--memory-budget): 4GB = 4e9, 4GiB = 4G = 4 x 2^30, 512MiB, 1.5 GB, 1000000.

    Decimal units (KB, MB, GB, TB) are powers of 1000 and binary ones (KiB, ..., or a bare K, M, G, T)
    powers of 1024; case does not matter. Raises ConfigError naming the value otherwise.
    """
    if isinstance(value, bool):
        raise ConfigError(f"memory size must be a number of bytes or a string like '4GB', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"cannot read memory size {value!r}: use a number of bytes or e.g. 4GB, 4GiB, "
                              f"512MiB, 1.5GB")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise ConfigError(f"memory size must be positive, got {value!r}")
    return int(size)
