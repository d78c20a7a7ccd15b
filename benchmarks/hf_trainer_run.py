"""The HF Trainer side of bench_vs_hf.py: the same model, data, batch geometry and steps as

    gradaccum train --model M --data D --micro-batch-size m --accumulation-steps k --max-length L
                    --max-steps N --save-every 0 --eval-every 0 --no-progress --output OUT

run the way an HF user would: `AutoModelForCausalLM.from_pretrained`, `Trainer` with
`per_device_train_batch_size=m`, `gradient_accumulation_steps=k`, AdamW, the same learning
rate, warm-up and clipping, and `save_model` + tokenizer at the end (gradaccum writes final/).

The inputs are identical: the examples come from gradaccum's own `tokenize` and `collate`, in the
order gradaccum trains on them (window t = examples of `window_indices(...)[t]`, each window cut
into length-sorted micro-batches by `split_window`), fed to the Trainer with a sequential sampler.
So both sides run the very same micro-batches; only the training machinery differs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--data", default=None, help="JSONL; default: gradaccum's bundled train set")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="TrainingArguments(gradient_checkpointing=True), transformers' defaults otherwise")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    import torch
    from transformers import Trainer, TrainingArguments

    from gradaccum import tasks
    from gradaccum.data import collate, read_jsonl, split_window, tokenize, window_indices
    from gradaccum.models import load_model

    torch.manual_seed(args.seed)
    # load_model("tiny") builds the preset; a directory is one AutoModelForCausalLM.from_pretrained
    # (sdpa attention, float32), exactly what an HF user writes.
    model, tokenizer = load_model(args.model, dtype=torch.float32, seed=args.seed)
    data_path = args.data or str(tasks.default_train_path())
    examples, _ = tokenize(read_jsonl(data_path), tokenizer, args.max_length, path=data_path)

    batch_size = args.micro_batch_size * args.accumulation_steps
    lengths = [len(e.input_ids) for e in examples]
    windows_per_epoch = math.ceil(len(examples) / batch_size)
    ordered = []
    for step in range(args.max_steps):
        epoch, position = divmod(step, windows_per_epoch)
        window = window_indices(len(examples), batch_size, args.seed, epoch)[position]
        for micro in split_window(window, args.micro_batch_size, 0, 1, lengths):
            ordered += micro
    dataset = [examples[i] for i in ordered]

    is_tiny = args.model == "tiny"
    lr = args.lr or (3e-3 if is_tiny else 5e-5)
    warmup_steps = max(1, args.max_steps // 20)  # gradaccum's default
    training_args = TrainingArguments(
        output_dir=args.output,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=lr,
        warmup_steps=warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
        remove_unused_columns=False,
        # Only when asked: transformers 5 warns about the old name even for False.
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))
    result = trainer.train()
    trainer.save_model(str(Path(args.output) / "final"))
    tokenizer.save_pretrained(str(Path(args.output) / "final"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(json.dumps({"train_loss": result.training_loss, "losses": losses,
                      "wall_seconds": time.perf_counter() - T_START}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
