"""Step time of exact vs naive accumulation (and a hand-written loop), interleaved in one process.

    python benchmarks/bench_overhead.py                     # tiny preset, 60 optimizer steps per mode
    python benchmarks/bench_overhead.py --model models/SmolLM2-135M-Instruct --steps 8

What exact accumulation adds over naive is counting the window's target tokens before the first
forward (one pass over each micro-batch's labels; one all-reduce under data parallelism): the
forward, backward and optimizer step are the same. So the modes run on one model, one optimizer and
the same windows, interleaved ABC CAB BCA ... (each mode sees each position in the cycle equally
often), and every optimizer step is timed on its own: forward + backward of every micro-batch,
clipping, optimizer and scheduler step. The overhead is the median of the per-cycle ratios
exact / naive - 1 (each ratio taken between steps run back to back), with its interquartile range.

  exact   Accumulator(accumulation="exact"): window.scale(summed).backward(), window.step()
  naive   Accumulator(accumulation="naive"): the same calls, per-micro-batch means
  manual  no Accumulator: (summed / count).backward() per micro-batch with a precomputed count,
          clip_grad_norm_, optimizer.step(), zero_grad(): the floor a hand-written loop reaches

Writes benchmarks/results/overhead.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import Table, machine_line, write_result  # noqa: E402

MODES = ("exact", "naive", "manual")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data", default=None, help="JSONL (default: the bundled train set)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per mode")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier on a shared machine)")
    parser.add_argument("--output", default=None, help="file in benchmarks/results/ (default: overhead.md for "
                        "the tiny preset, overhead_<model>.md otherwise)")
    args = parser.parse_args(argv)

    import torch

    from gradaccum import Accumulator, tasks
    from gradaccum.data import collate, read_jsonl, split_window, tokenize, window_indices
    from gradaccum.losses import CausalLMLoss, count_targets
    from gradaccum.models import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    loss_module = CausalLMLoss(model)
    path = args.data or str(tasks.default_train_path())
    examples, _ = tokenize(read_jsonl(path), tokenizer, args.max_length, path=path)
    lengths = [len(e.input_ids) for e in examples]
    batch_size = args.micro_batch_size * args.accumulation_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accumulators = {mode: Accumulator(loss_module, optimizer, accumulation_steps=args.accumulation_steps,
                                      max_grad_norm=1.0, scheduler=scheduler, accumulation=mode)
                    for mode in ("exact", "naive")}

    def windows():
        epoch = 0
        while True:
            for window in window_indices(len(examples), batch_size, 0, epoch):
                if len(window) == batch_size:
                    yield [collate([examples[i] for i in micro], tokenizer.pad_token_id)
                           for micro in split_window(window, args.micro_batch_size, 0, 1, lengths)]
            epoch += 1

    def run_accumulator(mode, micro_batches):
        acc = accumulators[mode]
        start = time.perf_counter()
        for window in acc.grouped_windows([micro_batches]):
            for batch in window:
                window.scale(loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"])).backward()
            window.step()
        return time.perf_counter() - start

    def run_manual(micro_batches):
        start = time.perf_counter()
        count = sum(count_targets(b["labels"]) for b in micro_batches)
        for batch in micro_batches:
            (loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"]) / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def run(mode, micro_batches):
        return run_manual(micro_batches) if mode == "manual" else run_accumulator(mode, micro_batches)

    source = windows()
    for _ in range(3):  # warm-up: first-touch page faults, allocator growth, optimizer state
        for mode in MODES:
            run(mode, next(source))
    seconds = {mode: [] for mode in MODES}
    for cycle in range(args.steps):
        # The same window for every mode of a cycle; the order rotates so no mode always goes first.
        micro_batches = next(source)
        order = MODES[cycle % 3:] + MODES[:cycle % 3]
        for mode in order:
            seconds[mode].append(run(mode, micro_batches))

    def ratio_stats(a, b):
        ratios = sorted(x / y for x, y in zip(seconds[a], seconds[b]))
        q = statistics.quantiles(ratios, n=4)
        return statistics.median(ratios), q[0], q[2]

    lines = [f"# Step time: exact vs naive accumulation ({Path(args.model).name}, CPU, float32)", "",
             f"{machine_line()}; torch threads set to {args.threads}. Micro-batch {args.micro_batch_size} x "
             f"accumulation {args.accumulation_steps}, max length {args.max_length}, data {Path(path).name}; "
             f"{args.steps} optimizer steps per mode after 3 warm-up cycles, the modes interleaved on the same "
             "windows (order rotated per cycle). A step = forward + backward of every micro-batch, clipping, "
             "optimizer and scheduler step.", ""]
    table = Table(["mode", "step time (ms, median)", "vs naive (median of paired ratios)", "IQR of ratios",
                   "vs manual loop"])
    naive_median = statistics.median(seconds["naive"])
    for mode in MODES:
        vs_naive = ratio_stats(mode, "naive")
        vs_manual = ratio_stats(mode, "manual")
        table.add(mode, f"{statistics.median(seconds[mode]) * 1e3:.1f}",
                  f"**{(vs_naive[0] - 1) * 100:+.2f}%**", f"{(vs_naive[1] - 1) * 100:+.2f}% .. "
                  f"{(vs_naive[2] - 1) * 100:+.2f}%", f"{(vs_manual[0] - 1) * 100:+.2f}%")
    overhead = ratio_stats("exact", "naive")[0] - 1
    lines += [table.markdown(), "",
              f"Exact vs naive overhead: **{overhead * 100:+.2f}%** (target: at most +2%; naive step "
              f"{naive_median * 1e3:.1f} ms). Counting the targets is one `(labels != -100).sum()` per "
              "micro-batch, done once per window before the first forward.", ""]
    text = "\n".join(lines)
    print(text)
    name = args.output or ("overhead.md" if args.model == "tiny" else f"overhead_{Path(args.model).name}.md")
    path_out = write_result(name, text)
    print(f"wrote {path_out}")


if __name__ == "__main__":
    main()
