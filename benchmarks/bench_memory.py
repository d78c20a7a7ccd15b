"""Peak memory of `gradaccum train` vs accumulation steps (fixed micro-batch) and vs micro-batch size.

    python benchmarks/bench_memory.py                        # SmolLM2-135M if present, else the tiny preset
    python benchmarks/bench_memory.py --model tiny --accumulation 1,2,4,8,16 --micro-batch-sizes 1,2,4,8,16

Every point is a whole `python -m gradaccum train` process (fresh, so its peak is its own), measured
from outside with wait4's ru_maxrss: model load, training and saving included. With exact
accumulation the gradient buffers exist once whatever the number of micro-batches, and a
micro-batch's activations are freed by its backward, so the peak should be flat in accumulation
steps and grow with the micro-batch size only. Two optimizer steps per point: the first allocates
the optimizer state, the second runs every micro-batch with parameters + gradients + state resident
(the steady-state peak). The in-loop `peak_memory_bytes` of metrics.jsonl is reported alongside.

By default the data is generated: every example is longer than --max-length, so every micro-batch is
exactly micro-batch x max-length tokens. With variable-length data, a run of more micro-batches sees
longer examples, and its activation peak grows with *which* examples it saw, not with the number of
micro-batches; uniform data keeps that out of the comparison. `--data bundled` (or a path) uses real data.

Writes benchmarks/results/memory.md and memory.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MIB, ROOT, Table, env_with_src, machine_line, pyplot, run_process, write_result  # noqa: E402

SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"


def _run(command: list[str], args: argparse.Namespace, what: str):
    """Run one measured child with the benchmark's data and thread settings; raise if it fails."""
    if args.data:
        command = [*command, "--data", args.data]
    env = env_with_src({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    run = run_process(command, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{run.stderr[-3000:]}")
    return run


def run_point(model: str, micro: int, accumulation: int, args: argparse.Namespace) -> dict:
    output = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        command = [sys.executable, "-m", "gradaccum", "train", "--model", model, "--micro-batch-size", str(micro),
                   "--accumulation-steps", str(accumulation), "--max-length", str(args.max_length),
                   "--max-steps", str(args.steps), "--save-every", "0", "--eval-every", "0", "--no-progress",
                   "--output", str(output)]
        run = _run(command, args, f"micro {micro} x accumulation {accumulation}")
        metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        return {"micro": micro, "accumulation": accumulation, "peak_rss": run.peak_rss_bytes,
                "loop_peak": max(m["peak_memory_bytes"] for m in metrics), "wall": run.wall_seconds}
    finally:
        shutil.rmtree(output, ignore_errors=True)


def predict(args: argparse.Namespace) -> None:
    """In a fresh process: the micro-batch finder's predicted training peak for each size (JSON)."""
    import torch

    from gradaccum import memory, tasks
    from gradaccum.data import read_jsonl, tokenize
    from gradaccum.losses import CausalLMLoss
    from gradaccum.models import load_model

    model, tokenizer = load_model(args.model, dtype=torch.float32)
    path = args.data or str(tasks.default_train_path())
    examples, _ = tokenize(read_jsonl(path), tokenizer, args.max_length, path=path)
    sizes = [int(m) for m in args.micro_batch_sizes.split(",") if m]
    peaks = memory.predicted_peaks(CausalLMLoss(model), examples, sizes, device="cpu",
                                   pad_token_id=tokenizer.pad_token_id)
    print(json.dumps({str(m): p for m, p in peaks.items()}))


def finder_predictions(args: argparse.Namespace) -> dict[int, int | None]:
    command = [sys.executable, str(Path(__file__).resolve()), "--_predict", "--model", args.model,
               "--micro-batch-sizes", args.micro_batch_sizes, "--max-length", str(args.max_length)]
    run = _run(command, args, "finder predictions")
    return {int(m): p for m, p in json.loads(run.stdout.strip().splitlines()[-1]).items()}


def write_uniform_data(path: Path, max_length: int, num_examples: int = 256) -> str:
    """Text examples of 8 x max_length characters: longer than max_length tokens for any tokenizer
    (a token is at least one character here), so each is truncated to exactly max_length."""
    import random

    rng = random.Random(0)
    words = ["gradient", "window", "token", "batch", "memory", "step", "loss", "rank", "model", "layer"]
    with open(path, "w") as f:
        for _ in range(num_examples):
            text = ""
            while len(text) < 8 * max_length:
                text += rng.choice(words) + " "
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


def describe_data(data: str | None) -> str:
    if data is None:
        return "bundled train.jsonl"
    if Path(data).name == "uniform.jsonl":
        return "generated, every example truncated to the max length (every micro-batch the same size)"
    return Path(data).name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOLLM2) if SMOLLM2.is_dir() else "tiny")
    parser.add_argument("--data", default="uniform",
                        help="'uniform' (generated: every example truncated to --max-length), 'bundled' "
                             "(the bundled train set) or a JSONL path")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="for the accumulation sweep")
    parser.add_argument("--accumulation", default="1,2,4,8,16")
    parser.add_argument("--micro-batch-sizes", default="1,2,4,8,16", help="at accumulation 1")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (memory barely depends on it)")
    parser.add_argument("--output", default="memory.md")
    parser.add_argument("--_predict", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._predict:
        predict(args)
        return
    if args.data == "uniform":
        args.data = write_uniform_data(Path(tempfile.mkdtemp(prefix="bench_memory_data_")) / "uniform.jsonl",
                                       args.max_length)
    elif args.data == "bundled":
        args.data = None
    accumulations = [int(k) for k in args.accumulation.split(",") if k]
    micros = [int(m) for m in args.micro_batch_sizes.split(",") if m]

    by_accumulation = []
    for k in accumulations:
        by_accumulation.append(run_point(args.model, args.micro_batch_size, k, args))
        print(f"  micro {args.micro_batch_size} x accumulation {k:2d}: peak RSS "
              f"{by_accumulation[-1]['peak_rss'] / MIB:.0f} MiB", flush=True)
    by_micro = []
    for m in micros:
        by_micro.append(run_point(args.model, m, 1, args))
        print(f"  micro {m:2d} x accumulation 1: peak RSS {by_micro[-1]['peak_rss'] / MIB:.0f} MiB", flush=True)

    name = Path(args.model).name
    lines = [f"# Peak memory vs accumulation steps and micro-batch size ({name}, CPU, float32)", "",
             f"{machine_line()}; OMP_NUM_THREADS={args.threads}. Each point is a fresh `gradaccum train` process, "
             f"{args.steps} optimizer steps, max length {args.max_length}, data "
             f"{describe_data(args.data)}; peak RSS from wait4 (whole process), "
             "loop peak = max `peak_memory_bytes` logged per step.", ""]
    if by_accumulation:
        base = by_accumulation[0]["peak_rss"]
        table = Table(["micro-batch", "accumulation steps", "effective batch", "peak RSS (MiB)", f"vs accumulation "
                       f"{by_accumulation[0]['accumulation']}", "loop peak (MiB)"])
        for r in by_accumulation:
            table.add(r["micro"], r["accumulation"], r["micro"] * r["accumulation"], f"{r['peak_rss'] / MIB:.0f}",
                      f"**{r['peak_rss'] / base:.3f}**", f"{r['loop_peak'] / MIB:.0f}")
        spread = max(r["peak_rss"] for r in by_accumulation) / min(r["peak_rss"] for r in by_accumulation) - 1
        last = by_accumulation[-1]
        lines += ["## Fixed micro-batch, growing accumulation", "", table.markdown(), "",
                  f"Accumulation {last['accumulation']} vs {by_accumulation[0]['accumulation']}: "
                  f"**{(last['peak_rss'] / base - 1) * 100:+.1f}%** (target: within 5%); largest spread over all "
                  f"points {spread * 100:.1f}%.", ""]
        multi = [r for r in by_accumulation if r["accumulation"] >= 2]
        if len(multi) >= 2 and by_accumulation[0]["accumulation"] == 1:
            lines += [f"From accumulation {multi[0]['accumulation']} to {multi[-1]['accumulation']}: "
                      f"**{(multi[-1]['peak_rss'] / multi[0]['peak_rss'] - 1) * 100:+.1f}%**. Accumulation 1 "
                      "is lower for a structural reason, in any loop that frees gradients after the step (torch's "
                      "default zero_grad(set_to_none=True); HF Trainer too): from the second micro-batch of a "
                      "window on, the window's gradient buffers (4 bytes per parameter) and that micro-batch's "
                      "activations are alive together; at accumulation 1 they never fully are, because "
                      "zero_grad frees the gradients and the next backward re-creates them layer by layer "
                      "while it frees activations.", ""]
    if by_micro:
        base = by_micro[0]["peak_rss"]
        table = Table(["micro-batch", "accumulation steps", "peak RSS (MiB)", f"vs micro-batch {by_micro[0]['micro']}",
                       "extra per sequence (MiB)", "loop peak (MiB)"])
        for r in by_micro:
            per = (r["peak_rss"] - base) / (r["micro"] - by_micro[0]["micro"]) / MIB if r is not by_micro[0] else 0
            table.add(r["micro"], r["accumulation"], f"{r['peak_rss'] / MIB:.0f}", f"{r['peak_rss'] / base:.3f}",
                      f"{per:.1f}" if r is not by_micro[0] else "-", f"{r['loop_peak'] / MIB:.0f}")
        lines += ["## Growing micro-batch, accumulation 1", "", table.markdown(), ""]
        predicted = finder_predictions(args)
        table = Table(["micro-batch", "finder's predicted peak (MiB)", "measured peak, training (MiB)",
                       "predicted / measured"])
        for r in by_micro:
            p = predicted.get(r["micro"])
            table.add(r["micro"], "OOM" if p is None else f"{p / MIB:.0f}", f"{r['peak_rss'] / MIB:.0f}",
                      "-" if p is None else f"{p / r['peak_rss']:.2f}")
        lines += ["## The micro-batch finder's predictions vs these measurements", "",
                  "`memory.predicted_peaks` (what `--micro-batch-size auto` compares with the budget): one probe "
                  "forward+backward per size on the *longest* examples of the data, with gradients present, plus "
                  "2 x the trainable parameter bytes for AdamW's state. A prediction at or somewhat above the "
                  "measurement is the intended (worst-case) reading; below it would be a miss.", "",
                  table.markdown(), ""]
    text = "\n".join(lines)
    print(text)
    path = write_result(args.output, text)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    if by_accumulation:
        axes[0].plot([r["accumulation"] for r in by_accumulation], [r["peak_rss"] / MIB for r in by_accumulation],
                     "o-", label="peak RSS (whole process)")
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel(f"accumulation steps (micro-batch {args.micro_batch_size})")
        axes[0].set_ylabel("MiB")
        axes[0].legend(fontsize=8)
        axes[0].set_title("flat in accumulation steps")
    if by_micro:
        axes[1].plot([r["micro"] for r in by_micro], [r["peak_rss"] / MIB for r in by_micro], "o-", color="C1")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("micro-batch size (accumulation 1)")
        axes[1].set_title("grows with the micro-batch")
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"gradaccum train, {name}: peak memory")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
