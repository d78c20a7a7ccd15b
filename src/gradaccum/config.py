"""Run configuration: one dataclass, one doc string per field; the CLI is generated from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

DTYPES = ("float32", "bfloat16", "float64")


def _f(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    model: str = _f("tiny", "'tiny' (embedded default), a local HF directory, a hub id, or a .gguf file")
    data: str | None = _f(None, "training JSONL ({text} | {prompt, completion} | {messages}); default: bundled tasks")
    eval_data: str | None = _f(None, "held-out JSONL for eval loss and exact-match accuracy; default: bundled split "
                                     "when --data is the default, else none")
    micro_batch_size: int | str = _f(8, "sequences per forward/backward on each rank, or 'auto'")
    memory_budget: str | None = _f(None, "with --micro-batch-size auto: memory the run may use, e.g. 4GB, 12GiB, "
                                         "512MiB (default: 80% of available RAM on the CPU; the GPU's memory on CUDA)")
    accumulation_steps: int | None = _f(None, "micro-batches per optimizer step (default: from --batch-size, else 4)")
    batch_size: int | None = _f(None, "effective batch in sequences per optimizer step over all ranks "
                                      "(= micro-batch size x accumulation steps x world size)")
    max_steps: int | None = _f(None, "optimizer steps to take (default: --epochs, else 1200 for the tiny preset, "
                                     "1 epoch otherwise)")
    epochs: float | None = _f(None, "passes over the training data (alternative to --max-steps)")
    max_length: int = _f(256, "tokens per example; longer examples are truncated and counted")
    lr: float | None = _f(None, "peak learning rate (default: 3e-3 tiny, 2e-4 LoRA, 5e-5 full fine-tune)")
    warmup_steps: int | None = _f(None, "linear warm-up steps before the cosine decay (default: 5% of the steps)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float | None = _f(1.0, "clip the full accumulated gradient to this L2 norm once per step "
                                          "(0 disables)")
    seed: int = _f(0, "seed for initialisation and data order")
    dtype: str = _f("float32", "float32 | bfloat16 (autocast, fp32 master weights) | float64", choices=DTYPES)
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    accumulation: str = _f("exact", "exact | naive (reproduces the per-micro-batch-mean bug, for audits only)",
                           choices=("exact", "naive"))
    normalize: str = _f("tokens", "tokens: mean over all target tokens (= full batch) | samples: mean of "
                                  "per-sequence means", choices=("tokens", "samples"))
    lora: bool = _f(False, "train LoRA adapters through peft instead of all weights")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    merge_lora: bool = _f(True, "save final/ as the merged full model (else the adapter only)")
    fsdp: bool = _f(False, "shard with FSDP2 (fully_shard) instead of DDP under torchrun")
    chunked_loss: bool = _f(True, "LM-head cross-entropy in chunks, never materialising full logits")
    packing: bool = _f(False, "padding-free micro-batches: each micro-batch's examples concatenated into one "
                              "row, kept apart by position_ids (HF models with sdpa/eager/flash attention; "
                              "--normalize tokens)")
    eval_every: int | None = _f(None, "evaluate every N steps (default: 5 evaluations per run; 0 disables)")
    eval_examples: int = _f(200, "held-out examples used for exact-match accuracy")
    save_every: int | None = _f(None, "write checkpoint-N/ every N steps (default: 4 per run; 0 disables)")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    resume: bool = _f(False, "continue from the newest complete checkpoint in --output")
    output: str | None = _f(None, "output folder (default: runs/<timestamp>)")
    overwrite: bool = _f(False, "reuse an --output folder that holds a different run")
    max_nonfinite: int = _f(5, "stop after this many windows in a row with a non-finite loss or gradient")
    trust_remote_code: bool = _f(False, "allow model code from the model's folder or hub repo to run")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        if isinstance(self.micro_batch_size, str):
            if self.micro_batch_size != "auto":
                try:
                    self.micro_batch_size = int(self.micro_batch_size)
                except ValueError:
                    raise ValueError(f"--micro-batch-size must be a positive integer or 'auto', "
                                     f"got {self.micro_batch_size!r}") from None
        if self.micro_batch_size != "auto" and self.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.micro_batch_size == "auto" and self.batch_size is None:
            raise ValueError("--micro-batch-size auto needs --batch-size")
        if self.memory_budget is not None:
            from .memory import parse_size

            parse_size(self.memory_budget)  # ValueError naming the value
            if self.micro_batch_size != "auto":
                raise ValueError("--memory-budget only applies with --micro-batch-size auto")
        for name in ("accumulation_steps", "batch_size", "max_steps", "max_length", "eval_examples",
                     "keep_checkpoints", "max_nonfinite", "lora_r"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("eval_every", "save_every", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.accumulation_steps is not None and self.batch_size is not None:
            raise ValueError("give --accumulation-steps or --batch-size, not both")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give --max-steps or --epochs, not both")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        if self.packing and self.normalize == "samples":
            raise ValueError("--packing needs --normalize tokens: a packed row holds several sequences")
        if self.max_grad_norm == 0:
            self.max_grad_norm = None
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')}: unknown value {getattr(self, f.name)!r} "
                                 f"(choose from {', '.join(choices)})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Fields that may change between a run and its --resume without changing what is trained:
# how the effective batch is split, where it runs, and how it reports.
RESUMABLE_CHANGES = {"micro_batch_size", "memory_budget", "accumulation_steps", "device", "fsdp", "resume", "overwrite",
                     "output", "save_every", "keep_checkpoints", "progress", "eval_every", "eval_examples",
                     "max_nonfinite", "chunked_loss"}
