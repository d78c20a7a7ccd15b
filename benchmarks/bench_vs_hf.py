"""gradaccum vs HF Trainer on the same model, data, micro-batch, accumulation and steps.

    python benchmarks/bench_vs_hf.py                       # SmolLM2-135M and the tiny preset, 2 rounds
    python benchmarks/bench_vs_hf.py --presets smollm2 --rounds 3
    python benchmarks/bench_vs_hf.py --variants fused,keep_grads+mallopt   # also proposed loop changes

Each run is a whole fresh process -- imports, model load, tokenization, training, saving the final
model -- measured from outside: wall time from spawn to exit, and the child's own peak resident set
size (wait4's ru_maxrss). The sides alternate round by round (the order rotates each round), so
machine load falls on both alike; the table reports ratios of medians, and every round's own ratio.

  gradaccum  `python -m gradaccum train --model M --micro-batch-size m --accumulation-steps k
             --max-length L --max-steps N --save-every 0 --eval-every 0 --no-progress --output TMP`
             (it writes final/, metrics.jsonl and loss.png)
  HF         benchmarks/hf_trainer_run.py: Trainer with the same model, the same tokenized
             micro-batches in the same order, AdamW, lr, warm-up and clipping; it saves the model and
             tokenizer at the end too
  gradaccum (THP on)  the gradaccum command with THP_MEM_ALLOC_ENABLE=1 (torch's huge pages), which
             the CLI used to set
  HF (mmap 4 MiB)  HF Trainer given the CLI's allocator setting (glibc's mmap threshold fixed at 4 MiB,
             which the CLI sets with mallopt), so the ratio that is *not* the allocator can be read off
  gradaccum+X  the gradaccum command with proposed loop changes X applied (train_variant.py)

Writes benchmarks/results/vs_hf.md, vs_hf.png and the raw measurements in vs_hf.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (MIB, ROOT, Table, env_with_src, machine_line, median, pyplot, run_process,  # noqa: E402
                     write_result)

SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
PRESETS = {
    # The configuration of issue #5.
    "smollm2": dict(model=str(SMOLLM2), micro_batch_size=2, accumulation_steps=4, max_length=256, max_steps=3),
    "tiny": dict(model="tiny", micro_batch_size=8, accumulation_steps=4, max_length=256, max_steps=20),
}


def gradaccum_command(preset: dict, output: Path, data: str | None, variant: str | None) -> list[str]:
    args = ["train", "--model", preset["model"], "--micro-batch-size", str(preset["micro_batch_size"]),
            "--accumulation-steps", str(preset["accumulation_steps"]), "--max-length", str(preset["max_length"]),
            "--max-steps", str(preset["max_steps"]), "--save-every", "0", "--eval-every", "0", "--no-progress",
            "--output", str(output)]
    if data:
        args += ["--data", data]
    if variant:
        return [sys.executable, str(ROOT / "benchmarks" / "train_variant.py"), "--variant", variant, "--", *args]
    return [sys.executable, "-m", "gradaccum", *args]


def hf_command(preset: dict, output: Path, data: str | None) -> list[str]:
    command = [sys.executable, str(ROOT / "benchmarks" / "hf_trainer_run.py"), "--model", preset["model"],
               "--micro-batch-size", str(preset["micro_batch_size"]),
               "--accumulation-steps", str(preset["accumulation_steps"]),
               "--max-length", str(preset["max_length"]), "--max-steps", str(preset["max_steps"]),
               "--output", str(output)]
    if data:
        command += ["--data", data]
    return command


def first_losses(side: str, run, output: Path) -> list[float]:
    """Per-step losses, to show both sides trained on the same batches (step 1 must agree)."""
    if side.startswith("HF"):
        return json.loads(run.stdout.strip().splitlines()[-1])["losses"]
    metrics = output / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def bench_preset(name: str, preset: dict, rounds: int, data: str | None, variants: list[str],
                 threads: int | None) -> dict:
    sides = ["gradaccum", "HF", "gradaccum (THP on)", "HF (mmap 4 MiB)"] + [f"gradaccum+{v}" for v in variants]
    runs: dict[str, list] = {side: [] for side in sides}
    losses: dict[str, list[float]] = {}
    for round_index in range(rounds):
        order = sides[round_index % len(sides):] + sides[:round_index % len(sides)]
        for side in order:
            output = Path(tempfile.mkdtemp(prefix=f"bench_vs_hf_{name}_"))
            try:
                if side.startswith("HF"):
                    command = hf_command(preset, output, data)
                else:
                    command = gradaccum_command(preset, output, data, side.partition("+")[2] or None)
                extra = {"OMP_NUM_THREADS": str(threads)} if threads else {}
                if side.endswith("(THP on)"):
                    extra["THP_MEM_ALLOC_ENABLE"] = "1"
                elif side.endswith("(mmap 4 MiB)"):
                    extra["MALLOC_MMAP_THRESHOLD_"] = str(4 * 2 ** 20)  # what gradaccum.cli sets with mallopt
                env = env_with_src(extra)
                if "THP_MEM_ALLOC_ENABLE" not in extra:
                    env.pop("THP_MEM_ALLOC_ENABLE", None)  # each side's own default
                run = run_process(command, env=env)
                if run.returncode != 0:
                    raise RuntimeError(f"{side} failed ({run.returncode}):\n{run.stderr[-3000:]}")
                if not (output / "final" / "model.safetensors").exists():
                    raise RuntimeError(f"{side} did not save final/model.safetensors")
                losses.setdefault(side, first_losses(side, run, output))
                # float32 weights: the file is ~4 bytes per parameter (tied embeddings stored once).
                model_bytes = (output / "final" / "model.safetensors").stat().st_size
                runs[side].append(run)
                print(f"  [{name}] round {round_index + 1}/{rounds} {side:24s} wall {run.wall_seconds:6.1f} s  "
                      f"peak RSS {run.peak_rss_bytes / MIB:6.0f} MiB  user {run.user_seconds:5.1f} s  "
                      f"sys {run.system_seconds:5.1f} s  minor faults {run.minor_faults}", flush=True)
            finally:
                shutil.rmtree(output, ignore_errors=True)
    return {"runs": runs, "losses": losses, "sides": sides, "model_bytes": model_bytes}


def report(results: dict[str, dict], rounds: int, data: str | None, threads: int | None) -> str:
    threads_note = f"OMP_NUM_THREADS={threads} for both sides" if threads else "torch's default threads"
    lines = ["# gradaccum vs HF Trainer: whole-process wall time and peak RSS", "",
             f"{machine_line()}; runs with {threads_note}. Data: {data or 'bundled src/gradaccum/assets/train.jsonl'}. "
             f"{rounds} rounds; each run a fresh process, the sides alternating (order rotated per round). "
             "Ratios are side / HF Trainer, of the medians; 'per round' lists each round's own ratio "
             "(both sides of a round ran back to back, under the same load). Both sides save the final "
             "model; gradaccum also writes metrics.jsonl and loss.png. The gradaccum CLI sets "
             "glibc's mmap threshold at 4 MiB unless the user set MALLOC_MMAP_THRESHOLD_; 'HF (mmap 4 MiB)' "
             "runs HF Trainer with that setting, 'gradaccum (THP on)' runs gradaccum with torch's huge pages.", ""]
    for name, result in results.items():
        preset = PRESETS[name]
        runs, sides = result["runs"], result["sides"]
        hf_wall = median([r.wall_seconds for r in runs["HF"]])
        hf_rss = median([r.peak_rss_bytes for r in runs["HF"]])
        lines += [f"## {name}: {Path(preset['model']).name}, float32, CPU, micro-batch "
                  f"{preset['micro_batch_size']} x accumulation {preset['accumulation_steps']}, max length "
                  f"{preset['max_length']}, {preset['max_steps']} optimizer steps", ""]
        hf_cpu = median([r.user_seconds + r.system_seconds for r in runs["HF"]])
        table = Table(["side", "wall (s, median)", "wall / HF", "per round", "peak RSS (MiB, median)",
                       "peak RSS / HF", "per round", "CPU s (user+sys)", "CPU / HF", "sys s", "minor faults",
                       "step-1 loss"])
        for side in sides:
            rs = runs[side]
            wall, rss = median([r.wall_seconds for r in rs]), median([r.peak_rss_bytes for r in rs])
            per_wall = ", ".join(f"{a.wall_seconds / b.wall_seconds:.2f}" for a, b in zip(rs, runs["HF"]))
            per_rss = ", ".join(f"{a.peak_rss_bytes / b.peak_rss_bytes:.2f}" for a, b in zip(rs, runs["HF"]))
            loss = result["losses"].get(side) or [float("nan")]
            table.add(side, f"{wall:.1f}", f"**{wall / hf_wall:.2f}**", per_wall, f"{rss / MIB:.0f}",
                      f"**{rss / hf_rss:.2f}**", per_rss,
                      f"{median([r.user_seconds + r.system_seconds for r in rs]):.1f}",
                      f"{median([r.user_seconds + r.system_seconds for r in rs]) / hf_cpu:.2f}",
                      f"{median([r.system_seconds for r in rs]):.1f}",
                      f"{median([r.minor_faults for r in rs]):.0f}", f"{loss[0]:.4f}")
        floor = 4 * result["model_bytes"]
        lines += [table.markdown(), "",
                  f"Floor of any float32 AdamW fine-tune of this model: parameters + gradients + AdamW's two "
                  f"moments = 4 x the weights = {floor / MIB:.0f} MiB = **{floor / hf_rss:.2f}x** HF's peak, "
                  "before the interpreter, torch and transformers themselves.", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(len(r["sides"]) for r in results.values())
    for metric, ax, label, target in (("wall_seconds", axes[0], "wall time / HF Trainer", 0.9),
                                      ("peak_rss_bytes", axes[1], "peak RSS / HF Trainer", 0.7)):
        for p, (name, result) in enumerate(results.items()):
            runs = result["runs"]
            hf = median([getattr(r, metric) for r in runs["HF"]])
            for s, side in enumerate(result["sides"]):
                value = median([getattr(r, metric) for r in runs[side]]) / hf
                ax.bar(p + s * width, value, width, color=f"C{s}", label=side if p == 0 else None)
                ax.text(p + s * width, value, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.axhline(target, color="red", lw=0.8, ls=":", label=f"target {target}" if metric == "wall_seconds" else None)
        ax.text(ax.get_xlim()[1], target, f" target {target}", color="red", fontsize=7, va="center", ha="right")
        ax.set_xticks([p + width * (len(results[n]["sides"]) - 1) / 2 for p, n in enumerate(results)])
        ax.set_xticklabels(list(results))
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("gradaccum vs HF Trainer (same model, data, batches; whole process)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="smollm2,tiny")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", default=None, help="JSONL for both sides (default: the bundled train set)")
    parser.add_argument("--variants", default="", help="comma-separated train_variant.py variant sets, "
                        "each joined with '+' (e.g. 'fused,fused+keep_grads+mallopt')")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both sides (default: torch's default, one per core)")
    parser.add_argument("--output", default="vs_hf.md")
    args = parser.parse_args(argv)
    variants = [v.replace("+", ",") for v in args.variants.split(",") if v]
    names = [n for n in args.presets.split(",") if n]
    for name in names:
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if "smollm2" in names and not SMOLLM2.is_dir():
        print(f"skipping smollm2: {SMOLLM2} is missing (make smollm2)")
        names.remove("smollm2")
    results = {}
    for name in names:
        print(f"{name}: {args.rounds} rounds", flush=True)
        results[name] = bench_preset(name, PRESETS[name], args.rounds, args.data, variants, args.threads)
    text = report(results, args.rounds, args.data, args.threads)
    print(text)
    path = write_result(args.output, text)
    raw = {name: {side: [{k: v for k, v in vars(r).items() if k not in ("stdout", "stderr")} for r in runs]
                  for side, runs in result["runs"].items()} for name, result in results.items()}
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
