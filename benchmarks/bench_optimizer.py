"""AdamW step time: torch's for-loop (the default on the CPU), foreach and fused implementations.

    python benchmarks/bench_optimizer.py                       # SmolLM2-135M if present, else the tiny preset

One process, the three optimizers on the same parameters and gradients, interleaved step by step
(order rotated), after one warm-up step each (which allocates the state). HF Trainer defaults to
`adamw_torch_fused`; `gradaccum train` builds `torch.optim.AdamW(...)` with torch's default.
Writes benchmarks/results/optimizer.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import ROOT, Table, machine_line, write_result  # noqa: E402

SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOLLM2) if SMOLLM2.is_dir() else "tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="optimizer.md")
    args = parser.parse_args(argv)

    import torch

    from gradaccum.models import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=torch.float32)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).mul_(1e-3)
    optimizers = {"for-loop (torch default on CPU)": torch.optim.AdamW(params, lr=1e-5),
                  "foreach": torch.optim.AdamW(params, lr=1e-5, foreach=True),
                  "fused": torch.optim.AdamW(params, lr=1e-5, fused=True)}
    for optimizer in optimizers.values():
        optimizer.step()
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for step in range(args.steps):
        for name in names[step % 3:] + names[:step % 3]:
            start = time.perf_counter()
            optimizers[name].step()
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds[names[0]])
    table = Table(["AdamW implementation", "step (ms, median)", "vs for-loop"])
    for name in names:
        median = statistics.median(seconds[name])
        table.add(name, f"{median * 1e3:.0f}", f"**{median / base:.2f}**")
    count = sum(p.numel() for p in params)
    text = "\n".join([f"# AdamW step time ({Path(args.model).name}, {count / 1e6:.1f} M parameters, CPU, float32)", "",
                      f"{machine_line()}; torch threads set to {args.threads}. {args.steps} steps each after one "
                      "warm-up step, interleaved.", "", table.markdown(), ""])
    print(text)
    print(f"wrote {write_result(args.output, text)}")


if __name__ == "__main__":
    main()
