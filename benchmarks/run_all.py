"""Run every benchmark (for `make bench`); each writes its table and plot into benchmarks/results/.

    python benchmarks/run_all.py            # everything; SmolLM2 parts are skipped without the model
    python benchmarks/run_all.py --quick    # the tiny preset only, fewer rounds and steps (*_quick.md)

Benchmarks print ratios measured in one run, never absolute times in tests. Expect ~30-60 minutes
for the full set on 2 CPU cores (SmolLM2-135M runs dominate), a few minutes with --quick.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"


def plan(quick: bool) -> list[tuple[str, list[str]]]:
    """(title, [script, args...]) in order. --quick writes *_quick.md files, so the full results stay."""
    have_smollm2 = SMOLLM2.is_dir() and not quick

    def out(name: str) -> list[str]:
        return ["--output", name.replace(".md", "_quick.md") if quick else name]

    steps = [
        ("chunked vs plain cross-entropy",
         ["bench_chunked_ce.py"] + (["--repeats", "2", "--output", "benchmarks/results/chunked_ce_quick.md"]
                                    if quick else [])),
        ("exact vs naive step time, tiny",
         ["bench_overhead.py", "--steps", "15" if quick else "60"] + out("overhead.md")),
        ("AdamW implementations",
         ["bench_optimizer.py"] + (["--model", "tiny"] if quick else []) + out("optimizer.md")),
    ]
    if have_smollm2:
        steps.append(("exact vs naive step time, SmolLM2-135M",
                      ["bench_overhead.py", "--model", str(SMOLLM2), "--micro-batch-size", "2", "--steps", "10"]))
    steps.append(("peak memory vs accumulation and micro-batch",
                  ["bench_memory.py"] + (["--model", "tiny", "--accumulation", "1,4,16", "--micro-batch-sizes", "1,16"]
                                         if quick else []) + out("memory.md")))
    presets = "smollm2,tiny" if have_smollm2 else "tiny"
    rounds = "1" if quick else "3"
    steps.append(("gradaccum vs HF Trainer",
                  ["bench_vs_hf.py", "--presets", presets, "--rounds", rounds] + out("vs_hf.md")))
    if not quick:  # one thread per process: steadier ratios where other jobs share the cores
        steps.append(("gradaccum vs HF Trainer, one thread",
                      ["bench_vs_hf.py", "--presets", presets, "--rounds", rounds, "--threads", "1",
                       "--output", "vs_hf_1thread.md"]))
    if have_smollm2:
        steps.append(("long sequences: long prompts, the head, checkpointing's cost, peak vs length",
                      ["bench_long.py", "--rounds", "2"]))
        steps.append(("background checkpoint saves", ["bench_checkpoint.py"]))
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset only, fewer rounds and steps")
    args = parser.parse_args(argv)
    if not SMOLLM2.is_dir():
        print(f"note: {SMOLLM2} is missing (make smollm2): the SmolLM2 benchmarks are skipped")
    failed = []
    for title, command in plan(args.quick):
        print(f"\n=== {title}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], cwd=ROOT)
        print(f"=== {title}: {'ok' if done.returncode == 0 else 'FAILED'} in {time.perf_counter() - start:.0f} s",
              flush=True)
        if done.returncode:
            failed.append(title)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        return 1
    print(f"\nall benchmarks done; results in {HERE / 'results'}/ (summary: benchmarks/README.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
