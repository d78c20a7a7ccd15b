"""Chunked LM-head cross-entropy (`linear_cross_entropy_sum`) vs the plain `F.cross_entropy(hidden @ W.T)`: time and peak memory.

    python benchmarks/bench_chunked_ce.py                 # SmolLM2 head: vocab 49,152, hidden 576, 2048 tokens
    python benchmarks/bench_chunked_ce.py --tokens 4096 --chunk-sizes 1024,256

Each variant runs in a fresh subprocess, so its peak resident memory (getrusage ru_maxrss) is its
own. "Peak extra" is that high-water mark after one forward+backward minus the resident memory the
process held just before it, with the inputs built: the memory the loss itself needs. Times are the
median of --repeats forward+backward passes after one warm-up, measured in one process with the
variants interleaved (so load from other processes hits all alike). Ratios are chunked / plain, from
one run; the rel. diff columns compare losses and sampled gradients with the plain path.
Prints a markdown table and writes it to benchmarks/results/chunked_ce.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "chunked_ce.md"


def _maxrss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _rss_bytes() -> int:
    """Resident memory now (Linux: /proc/self/statm); elsewhere the high-water mark so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _maxrss_bytes()


def make_problem(args: argparse.Namespace):
    """hidden, weight (both requiring grad) and targets, from a fixed seed."""
    import torch

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    # Built in place: a temporary here would raise the high-water mark before the measurement starts.
    hidden = torch.randn(args.tokens, args.hidden, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(args.vocab, args.hidden, generator=g, dtype=dtype).div_(args.hidden ** 0.5).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    return hidden, weight, targets


def make_step(variant: str, hidden, weight, targets):
    """One forward+backward of the summed loss of `variant` ("plain" or "fused chunk_size=C")."""
    import torch.nn.functional as F

    from gradaccum.losses import linear_cross_entropy_sum

    if variant == "plain":
        def loss_fn():
            return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    else:  # "fused chunk_size=C": linear_cross_entropy_sum, the path CausalLMLoss takes
        chunk_size = int(variant.split("=")[1])

        def loss_fn():
            return linear_cross_entropy_sum(hidden, weight, targets, chunk_size=chunk_size)

    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return step


def measure_memory(args: argparse.Namespace) -> dict:
    """One variant in this (fresh) process: peak memory of one forward+backward, and its results."""
    hidden, weight, targets = make_problem(args)
    step = make_step(args.variant, hidden, weight, targets)
    baseline = _rss_bytes()
    loss = step()
    peak = _maxrss_bytes()
    return {
        "variant": args.variant,
        "peak_rss": peak,
        "peak_extra": peak - baseline,
        "loss": float(loss),
        # For an exactness check across processes (same seed, same inputs).
        "grad_hidden_sample": hidden.grad.double().flatten()[:: max(1, hidden.grad.numel() // 4096)].tolist(),
        "grad_weight_sample": weight.grad.double().flatten()[:: max(1, weight.grad.numel() // 4096)].tolist(),
    }


def measure_time(variants: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Median forward+backward seconds per variant, the variants interleaved round by round so that
    load from other processes falls on all of them alike."""
    hidden, weight, targets = make_problem(args)
    steps = {variant: make_step(variant, hidden, weight, targets) for variant in variants}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(args.repeats):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)
    return {variant: statistics.median(values) for variant, values in times.items()}


def spawn(variant: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--_variant", variant, "--tokens", str(args.tokens), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-sizes", default="1024,256")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--_variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._variant:
        args.variant = args._variant
        print(json.dumps(measure_memory(args)))
        return

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sizes = [int(c) for c in args.chunk_sizes.split(",")]
    variants = ["plain"] + [f"fused chunk_size={c}" for c in sizes]
    results = [spawn(variant, args) for variant in variants]
    seconds = measure_time(variants, args)
    for r in results:
        r["seconds"] = seconds[r["variant"]]
    plain = results[0]
    mib = 2 ** 20
    logits_mib = args.tokens * args.vocab * 4 / mib
    lines = [
        f"# Chunked LM-head cross-entropy vs plain (CPU, {args.dtype})",
        "",
        f"tokens {args.tokens}, vocab {args.vocab:,}, hidden {args.hidden}; one float32 logits tensor "
        f"[tokens x vocab] is {logits_mib:.0f} MiB. Forward + backward of the summed loss, gradients for "
        f"hidden and weight. torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.",
        "",
        "| variant | fwd+bwd (s, median) | time / plain | peak extra RSS (MiB) | memory / plain "
        "| peak RSS (MiB) | loss rel. diff | grad h rel. diff | grad W rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        loss_diff = abs(r["loss"] - plain["loss"]) / abs(plain["loss"])
        grad_diffs = []
        for key in ("grad_hidden_sample", "grad_weight_sample"):
            sample, ref = torch.tensor(r[key]), torch.tensor(plain[key])
            grad_diffs.append(float((sample - ref).norm() / ref.norm()))
        lines.append(
            f"| {r['variant']} | {r['seconds']:.3f} | {r['seconds'] / plain['seconds']:.2f} | "
            f"{r['peak_extra'] / mib:.0f} | {r['peak_extra'] / plain['peak_extra']:.2f} | "
            f"{r['peak_rss'] / mib:.0f} | {loss_diff:.1e} | {grad_diffs[0]:.1e} | {grad_diffs[1]:.1e} |")
    lines += [
        "",
        "Peak extra RSS: the process's resident high-water mark after the first forward+backward minus its "
        "resident memory just before, with the inputs built (each variant in a fresh process). `fused` "
        "(`linear_cross_entropy_sum`, what `CausalLMLoss` uses) takes each chunk's gradient in forward, so "
        "the logits are computed once, and backward only scales it; it needs about one chunk of logits "
        "plus the float32 weight gradient at a time.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
