"""Long sequences: activation checkpointing, the chunked LM head, and memory vs HF Trainer.

    python benchmarks/bench_long.py                                  # all four sections
    python benchmarks/bench_long.py --sections headline --rounds 3   # the issue's long-prompt setting
    python benchmarks/bench_long.py --sections cost --cost-lengths 256,1024
    python benchmarks/bench_long.py --sections head --lengths 1024,2048
    python benchmarks/bench_long.py --sections sweep --lengths 256,512,1024,2048 --budget 4GiB

Section `headline` (whole processes, peak RSS by wait4, the sides rotated per round): SmolLM2-135M,
float32, micro-batch 1 x accumulation 2, 2 optimizer steps, --max-length 2048, on prompt/completion
records of ~1,700 tokens that are nearly all prompt (--long-data: your own). Sides: gradaccum and HF
Trainer with activation checkpointing, and both without it.

Section `head` (one fresh process per configuration, in-process measurement): a Llama with SmolLM2's
vocabulary (49152) but hidden 256 and 4 layers, float32, one sequence of L tokens, every token a
target. For each of {no checkpointing, checkpointing} x {chunked head (gradaccum's CausalLMLoss, its
default 1024 tokens per block of logits, and 256, 128), plain head (full logits + F.cross_entropy),
no head (a loss on the hidden states)}: the step's peak
resident memory above the steady state before it (weights + gradients), and its time. The head's
share of the peak = (peak - peak without head) / peak.

Section `cost`: one forward+backward of SmolLM2 (micro-batch 1 x L) with checkpointing off and on,
alternating in one process, round after round: the per-step price of checkpointing, without the
noise of separate processes.

Section `sweep` (whole processes, peak RSS by wait4, the sides alternating): `gradaccum train` and HF
Trainer (benchmarks/hf_trainer_run.py), both with activation checkpointing, SmolLM2-135M-Instruct,
float32, micro-batch 1 x accumulation 2, 2 optimizer steps (--steps; from the second on, AdamW's
state and the activations are alive together), on records long enough to fill
--max-length L. Ratios gradaccum / HF at each L; peak(L) fitted per side (least squares on the
measured points, a + b L + c L^2) and solved for the longest L under --budget (4 GiB); --verify runs
gradaccum once at its predicted longest L. gradaccum's side passes --gradient-checkpointing when
the CLI has it, and otherwise runs through train_variant.py's `checkpointing` variant (the same
models.enable_gradient_checkpointing the flag calls).

Writes benchmarks/results/long_head.md (head), long_cost.md (cost), long.md and long_memory.png
(sweep), each with the raw numbers in a .json beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (MIB, RESULTS, ROOT, Table, env_with_src, machine_line, median, pyplot,  # noqa: E402
                     run_process, write_result)

from gradaccum.losses import DEFAULT_CHUNK_SIZE  # noqa: E402

SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
HEAD_MODEL = dict(vocab_size=49152, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


# ---------------------------------------------------------------------------------------------
# Section "head": one configuration per process


def probe_head(length: int, head: str, checkpointing: bool, repeats: int = 2) -> dict:
    """Run in a fresh process: the step's peak RSS above its starting point, and its seconds (the
    fastest of `repeats`; run under PROBE_ENV for the memory, under the CLI's environment for the time)."""
    import torch
    from transformers import LlamaForCausalLM

    from gradaccum.losses import CausalLMLoss
    from gradaccum.memory import (_release_free_memory, _window_peak_rss_bytes, current_rss_bytes,
                                  reset_peak_rss)
    from gradaccum.models import enable_gradient_checkpointing, tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(**HEAD_MODEL))
    if checkpointing:
        enable_gradient_checkpointing(model)
    chunk_size = int(head.partition(":")[2] or 1024)  # "chunked:N": N tokens per block of logits
    chunked = CausalLMLoss(model, chunk_size=chunk_size)
    ids = torch.randint(0, HEAD_MODEL["vocab_size"], (1, length))
    mask = torch.ones_like(ids)

    def step():
        if head.startswith("chunked"):
            loss = chunked(ids, mask, ids)
        elif head == "plain":
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        else:  # the body alone: what the head adds is the difference
            loss = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.pow(2).mean()
        loss.backward()

    for p in model.parameters():  # the steady state of a window: gradients exist before the step
        p.grad = torch.zeros_like(p)
    step()  # warm-up: first-call allocations and lazy initialisation
    peaks, seconds = [], []
    for _ in range(repeats):
        _release_free_memory()
        before = current_rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        peaks.append(_window_peak_rss_bytes() - before)
    return {"peak_bytes": min(peaks), "seconds": min(seconds), "base_bytes": before}


# glibc: every block over 128 KiB its own mapping, returned on free, so that resident memory follows the
# live tensors; no huge pages (2 MiB granularity would blur the small differences).
PROBE_ENV = {"OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
             "THP_MEM_ALLOC_ENABLE": "0"}
# Timing: the environment the CLI runs in (glibc's defaults, huge pages for torch's large blocks).
TIME_ENV = {"OMP_NUM_THREADS": "2"}
HEADS = ("chunked:1024", "chunked:256", "chunked:128", "plain")  # chunked:N = CausalLMLoss(chunk_size=N)


def bench_head(lengths: list[int], rounds: int) -> dict:
    configs = [(length, head, ckpt) for length in lengths for ckpt in (False, True) for head in HEADS + ("none",)]
    results: dict = {}
    for round_index in range(rounds):
        for length, head, ckpt in configs[round_index % len(configs):] + configs[:round_index % len(configs)]:
            command = [sys.executable, __file__, "--probe-head", json.dumps([length, head, ckpt])]
            out = subprocess.run(command, capture_output=True, text=True, env=env_with_src(PROBE_ENV), cwd=ROOT,
                                 timeout=1800)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            results.setdefault(f"{length}/{head}/{ckpt}", []).append(measured)
            print(f"  [head] L={length} head={head:11s} checkpointing={ckpt!s:5s}: step peak "
                  f"{measured['peak_bytes'] / MIB:7.1f} MiB", flush=True)
    # Times: one process, every configuration in turn, round after round, so load falls on all alike.
    command = [sys.executable, __file__, "--time-head", json.dumps([lengths, max(rounds, 5)])]
    out = subprocess.run(command, capture_output=True, text=True, env=env_with_src(TIME_ENV), cwd=ROOT, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    for key, seconds in json.loads(out.stdout.strip().splitlines()[-1]).items():
        for measured in results[key]:
            measured["seconds"] = seconds
    return results


def time_head(lengths: list[int], rounds: int) -> dict[str, float]:
    """Median step seconds per configuration, interleaved in this one process (checkpointing switched
    on and off on the same model)."""
    import torch
    from transformers import LlamaForCausalLM

    from gradaccum.losses import CausalLMLoss
    from gradaccum.models import disable_gradient_checkpointing, enable_gradient_checkpointing, tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(**HEAD_MODEL))
    losses = {head: CausalLMLoss(model, chunk_size=int(head.partition(":")[2] or 1024)) for head in HEADS}
    seconds: dict[str, list[float]] = {}
    for _ in range(rounds + 1):  # the first round warms up and is not kept
        for length in lengths:
            ids = torch.randint(0, HEAD_MODEL["vocab_size"], (1, length))
            mask = torch.ones_like(ids)
            for ckpt in (False, True):
                (enable_gradient_checkpointing if ckpt else disable_gradient_checkpointing)(model)
                for head in HEADS + ("none",):
                    start = time.perf_counter()
                    if head == "plain":
                        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
                    elif head == "none":
                        loss = model.model(input_ids=ids, attention_mask=mask,
                                           use_cache=False).last_hidden_state.pow(2).mean()
                    else:
                        loss = losses[head](ids, mask, ids)
                    loss.backward()
                    seconds.setdefault(f"{length}/{head}/{ckpt}", []).append(time.perf_counter() - start)
                    del loss
                    model.zero_grad(set_to_none=False)
    return {key: median(values[1:] if len(values) > 1 else values) for key, values in seconds.items()}


def report_head(results: dict, lengths: list[int]) -> str:
    def get(length, head, ckpt, key):
        return median([r[key] for r in results[f"{length}/{head}/{ckpt}"]])

    table = Table(["L", "checkpointing", "head", "step peak (MiB)", "head's share of it", "step time (s)",
                   "time vs no checkpointing", "peak vs no checkpointing"])
    for length in lengths:
        for ckpt in (False, True):
            body = get(length, "none", ckpt, "peak_bytes")
            for head in HEADS:
                peak, seconds = get(length, head, ckpt, "peak_bytes"), get(length, head, ckpt, "seconds")
                share = (peak - body) / peak if peak > 0 else float("nan")
                name = "plain (full logits)" if head == "plain" else head.replace(":", ", ") + " tokens" + (
                    " (default)" if head == f"chunked:{DEFAULT_CHUNK_SIZE}" else "")
                table.add(length, "on" if ckpt else "off", name, f"{peak / MIB:.0f}", f"**{share:.0%}**",
                          f"{seconds:.2f}", f"{seconds / get(length, head, False, 'seconds'):.2f}x",
                          f"{peak / get(length, head, False, 'peak_bytes'):.2f}x")
    return "\n".join([
        "## The LM head's share of a step's peak memory, with and without checkpointing", "",
        f"Llama, vocabulary {HEAD_MODEL['vocab_size']}, hidden {HEAD_MODEL['hidden_size']}, "
        f"{HEAD_MODEL['num_hidden_layers']} layers, float32, one sequence of L tokens (all targets), CPU. "
        "Step peak = resident peak of one forward+backward above the resident memory before it (weights "
        "and gradients already allocated), with glibc returning every block over 128 KiB on free so that "
        "resident memory follows the live tensors, a fresh process per configuration; step time = median "
        "over 5 rounds in one process that runs every configuration in turn (checkpointing switched on "
        "and off on the same model), with the CLI's allocator settings. Head's share = (step peak - step "
        "peak of the body alone) / step peak.", "",
        table.markdown(), ""])


# ---------------------------------------------------------------------------------------------
# Section "cost": what checkpointing costs per step on a real model, interleaved in one process


def time_checkpointing(model_dir: str, lengths: list[int], rounds: int) -> dict[str, list[float]]:
    """Seconds of one forward+backward (CausalLMLoss, micro-batch 1 x L) with checkpointing off and on,
    alternating on the same model, round after round."""
    import torch

    from gradaccum.losses import CausalLMLoss
    from gradaccum.models import disable_gradient_checkpointing, enable_gradient_checkpointing, load_model

    model, _ = load_model(model_dir)
    loss_module = CausalLMLoss(model)
    vocab = model.get_input_embeddings().num_embeddings
    seconds: dict[str, list[float]] = {}
    for round_index in range(rounds + 1):  # round 0 warms up
        for length in lengths:
            ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length))
            for ckpt in ((False, True) if round_index % 2 else (True, False)):
                (enable_gradient_checkpointing if ckpt else disable_gradient_checkpointing)(model)
                start = time.perf_counter()
                loss_module(ids, torch.ones_like(ids), ids).backward()
                if round_index:
                    seconds.setdefault(f"{length}/{ckpt}", []).append(time.perf_counter() - start)
                model.zero_grad(set_to_none=False)
    return seconds


def report_cost(seconds: dict[str, list[float]], lengths: list[int], model_dir: str) -> str:
    table = Table(["L", "step without (s)", "step with (s)", "with / without (median of per-round ratios)"])
    for length in lengths:
        off, on = seconds[f"{length}/False"], seconds[f"{length}/True"]
        table.add(length, f"{median(off):.2f}", f"{median(on):.2f}",
                  f"**{median([b / a for a, b in zip(off, on)]):.2f}x**")
    return "\n".join([f"## What activation checkpointing costs per step: {Path(model_dir).name}", "",
                      "One forward+backward of micro-batch 1 x L tokens through CausalLMLoss (chunked head), "
                      "float32, checkpointing switched off and on for the same model in turn, "
                      f"{len(seconds[f'{lengths[0]}/True'])} rounds in one process (a warm-up round not counted).",
                      "", table.markdown(), ""])


# ---------------------------------------------------------------------------------------------
# Section "sweep": whole processes, gradaccum vs HF Trainer


def long_records(path: Path, num_records: int = 8, num_chars: int = 48000) -> None:
    """Records of ~num_chars characters (~11k SmolLM2 tokens): every --max-length up to the model's 8192 is filled."""
    from gradaccum import tasks
    from gradaccum.data import read_jsonl

    texts = []
    for _, record in read_jsonl(str(tasks.default_train_path())):
        texts.append(" ".join(str(v) for v in record.values() if isinstance(v, str)))
    with open(path, "w") as f:
        for index in range(num_records):
            text, cursor = [], index * 97
            while sum(len(t) for t in text) < num_chars:
                text.append(texts[cursor % len(texts)])
                cursor += 1
            f.write(json.dumps({"text": "\n".join(text)}) + "\n")


def long_prompt_records(path: Path, tokenizer_dir: str, num_tokens: int = 1700, num_records: int = 8) -> None:
    """Prompt/completion records of ~num_tokens tokens each, nearly all prompt: a long context (a few
    hundred bundled task lines) and one short question whose answer is the completion, so that only
    ~1% of the positions are targets -- the shape of long-context fine-tuning data (documents + a
    question), and of the issue's hidden long-prompt data."""
    from transformers import AutoTokenizer

    from gradaccum import tasks
    from gradaccum.data import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs = [record for _, record in read_jsonl(str(tasks.default_train_path()))]
    with open(path, "w") as f:
        cursor = 0
        for _ in range(num_records):
            lines = []
            # stop ~40 tokens short: the chat template and the answer take the rest
            while len(tokenizer("\n".join(lines))["input_ids"]) < num_tokens - 40:
                lines += [f"{p['prompt']}{p['completion']}" for p in pairs[cursor:cursor + 20]]
                cursor += 20
            question = pairs[cursor]
            cursor += 1
            f.write(json.dumps({"prompt": "\n".join(lines) + "\n" + question["prompt"],
                                "completion": question["completion"]}) + "\n")


def cli_has_checkpointing_flag() -> bool:
    out = subprocess.run([sys.executable, "-m", "gradaccum", "train", "--help"], capture_output=True, text=True,
                         env=env_with_src(), cwd=ROOT, timeout=300)
    return "--gradient-checkpointing" in out.stdout


def gradaccum_command(model: str, data: Path, length: int, output: Path, flag: bool | None, steps: int) -> list[str]:
    """flag: True, pass --gradient-checkpointing; False, switch it on through train_variant.py; None: off."""
    args = ["train", "--model", model, "--data", str(data), "--micro-batch-size", "1", "--accumulation-steps", "2",
            "--max-length", str(length), "--max-steps", str(steps), "--save-every", "0", "--eval-every", "0",
            "--no-progress", "--output", str(output)]
    if flag is None:
        return [sys.executable, "-m", "gradaccum", *args]
    if flag:
        return [sys.executable, "-m", "gradaccum", *args, "--gradient-checkpointing"]
    return [sys.executable, str(ROOT / "benchmarks" / "train_variant.py"), "--variant", "checkpointing", "--", *args]


def hf_command(model: str, data: Path, length: int, output: Path, steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "hf_trainer_run.py"), "--model", model, "--data", str(data),
            "--micro-batch-size", "1", "--accumulation-steps", "2", "--max-length", str(length), "--max-steps",
            str(steps),
            "--gradient-checkpointing", "--output", str(output)]


PLAIN = "gradaccum, no checkpointing"


def bench_sweep(model: str, lengths: list[int], rounds: int, data: Path, flag: bool, plain: bool, steps: int) -> dict:
    sides = ["gradaccum", "HF"] + ([PLAIN] if plain else [])
    runs: dict = {side: {} for side in sides}
    for round_index in range(rounds):
        for length in lengths:
            for side in sides[round_index % len(sides):] + sides[:round_index % len(sides)]:
                output = Path(tempfile.mkdtemp(prefix="bench_long_"))
                try:
                    if side == "HF":
                        command = hf_command(model, data, length, output, steps)
                    else:
                        command = gradaccum_command(model, data, length, output,
                                                    flag if side == "gradaccum" else None, steps)
                    run = run_process(command, env=env_with_src())
                    if run.returncode != 0:
                        raise RuntimeError(f"{side} at L={length} failed:\n{run.stdout[-1500:]}\n{run.stderr[-3000:]}")
                    runs[side].setdefault(length, []).append(run)
                    print(f"  [sweep] round {round_index + 1}/{rounds} L={length:5d} {side:28s} peak RSS "
                          f"{run.peak_rss_bytes / MIB:6.0f} MiB, wall {run.wall_seconds:6.1f} s", flush=True)
                finally:
                    shutil.rmtree(output, ignore_errors=True)
    return runs


HEADLINE_SIDES = ("gradaccum", "HF", PLAIN, "HF, no checkpointing")


def bench_headline(model: str, data: Path, length: int, rounds: int, steps: int,
                   sides: tuple[str, ...] = HEADLINE_SIDES) -> dict:
    """The issue's setting: each side at one --max-length on long-prompt records, sides rotated per round."""
    runs: dict = {side: [] for side in sides}
    for round_index in range(rounds):
        shift = round_index % len(sides)
        for side in sides[shift:] + sides[:shift]:
            output = Path(tempfile.mkdtemp(prefix="bench_long_"))
            try:
                if side.startswith("HF"):
                    command = hf_command(model, data, length, output, steps)
                    if side != "HF":
                        command.remove("--gradient-checkpointing")
                else:
                    command = gradaccum_command(model, data, length, output, True if side == "gradaccum" else None,
                                                steps)
                run = run_process(command, env=env_with_src())
                if run.returncode != 0:
                    raise RuntimeError(f"{side} failed:\n{run.stdout[-1500:]}\n{run.stderr[-3000:]}")
                runs[side].append(run)
                print(f"  [headline] round {round_index + 1}/{rounds} {side:28s} peak RSS "
                      f"{run.peak_rss_bytes / MIB:6.0f} MiB, wall {run.wall_seconds:6.1f} s", flush=True)
            finally:
                shutil.rmtree(output, ignore_errors=True)
    return runs


def report_headline(runs: dict, length: int, steps: int, num_tokens: int, weights_bytes: int) -> str:
    hf = runs["HF"]
    table = Table(["side", "wall (s, median)", "wall / HF", "per round", "peak RSS (MiB, median)", "peak / HF",
                   "per round"])
    for side, side_runs in runs.items():
        table.add(side, f"{median([r.wall_seconds for r in side_runs]):.1f}",
                  f"**{median([r.wall_seconds for r in side_runs]) / median([r.wall_seconds for r in hf]):.2f}**",
                  ", ".join(f"{a.wall_seconds / b.wall_seconds:.2f}" for a, b in zip(side_runs, hf)),
                  f"{median([r.peak_rss_bytes for r in side_runs]) / MIB:.0f}",
                  f"**{median([r.peak_rss_bytes for r in side_runs]) / median([r.peak_rss_bytes for r in hf]):.2f}**",
                  ", ".join(f"{a.peak_rss_bytes / b.peak_rss_bytes:.2f}" for a, b in zip(side_runs, hf)))
    floor = 4 * weights_bytes  # weights, gradients, AdamW's two moments
    return "\n".join([
        "## Long prompts: the issue's setting", "",
        f"SmolLM2-135M-Instruct, float32, CPU, micro-batch 1 x accumulation 2, {steps} optimizer steps, "
        f"--max-length {length}, prompt/completion records of ~{num_tokens} tokens (a long context of task "
        "lines, then one question; ~1% of positions are targets), each run a fresh process (imports, load, "
        "tokenize, train, save final/), peak RSS of that process (wait4). 'gradaccum' and 'HF' both use "
        "activation checkpointing; the rows 'no checkpointing' are the same runs without it. Ratios are of medians "
        "against 'HF' (with checkpointing); 'per round' pairs the runs of one round.", "",
        table.markdown(), "",
        f"Floor of any float32 AdamW fine-tune of this model: weights + gradients + two moments = "
        f"{floor / MIB:.0f} MiB = **{floor / median([r.peak_rss_bytes for r in hf]):.2f}x** HF's peak, "
        "before the interpreter, torch and transformers themselves.", ""])


def fit_peak(points: dict[int, float]):
    """peak(L) ~ a + b L + c L^2 by least squares (c = 0 with fewer than 3 points); returns the function."""
    import numpy as np

    xs = np.array(sorted(points), dtype=float)
    ys = np.array([points[int(x)] for x in xs], dtype=float)
    degree = 2 if len(xs) >= 3 else 1
    coefficients = np.polyfit(xs, ys, degree)
    if degree == 2 and coefficients[0] < 0:  # a concave fit would promise too much at long L
        coefficients = np.concatenate([[0.0], np.polyfit(xs, ys, 1)])
    return lambda length: float(np.polyval(coefficients, length))


def longest_fitting(peak, budget_bytes: int, upper: int = 8192) -> int:
    """The largest L (multiple of 64, at most `upper`, SmolLM2's context) with peak(L) <= budget, by
    bisection on the fitted curve."""
    if peak(upper) <= budget_bytes:
        return upper
    low, high = 0, upper
    while high - low > 64:
        middle = (low + high) // 2 // 64 * 64
        if peak(middle) <= budget_bytes:
            low = middle
        else:
            high = middle
    return low


def report_sweep(runs: dict, lengths: list[int], budget_bytes: int, verified: dict, steps: int) -> tuple[str, dict]:
    table = Table(["max length", "gradaccum peak RSS (MiB)", "HF Trainer peak RSS (MiB)", "peak / HF",
                   "gradaccum wall (s)", "HF wall (s)", "wall / HF"])
    medians = {side: {L: median([r.peak_rss_bytes for r in runs[side][L]]) for L in lengths} for side in runs}
    for length in lengths:
        ga, hf = runs["gradaccum"][length], runs["HF"][length]
        ga_wall, hf_wall = median([r.wall_seconds for r in ga]), median([r.wall_seconds for r in hf])
        table.add(length, f"{medians['gradaccum'][length] / MIB:.0f}", f"{medians['HF'][length] / MIB:.0f}",
                  f"**{medians['gradaccum'][length] / medians['HF'][length]:.2f}**", f"{ga_wall:.1f}",
                  f"{hf_wall:.1f}", f"{ga_wall / hf_wall:.2f}")
    fits = {side: fit_peak(medians[side]) for side in ("gradaccum", "HF")}
    longest = {side: longest_fitting(fits[side], budget_bytes) for side in fits}
    lines = ["## Peak memory vs sequence length: gradaccum vs HF Trainer, both with activation checkpointing", "",
             f"SmolLM2-135M-Instruct, float32, CPU, micro-batch 1 x accumulation 2, {steps} optimizer steps (from "
             "the second on, AdamW's state exists while the activations do, as in any longer run), each run a "
             "fresh process (imports, load, tokenize, train, save final/); peak RSS of that process (wait4). "
             "gradaccum: chunked LM head (never the [tokens, vocab] logits); HF Trainer: the model's own loss "
             "on full logits.", "", table.markdown(), "",
             f"Longest --max-length under a memory budget of {budget_bytes / 2 ** 30:.2f} GiB (peak RSS), from "
             f"a least-squares fit of the measured peaks (extrapolated beyond {max(lengths)}): gradaccum "
             f"**{longest['gradaccum']}**, HF Trainer **{longest['HF']}** tokens "
             f"(**{longest['gradaccum'] / max(longest['HF'], 1):.2f}x**; the search stops at 8192, SmolLM2's "
             "context)."]
    if PLAIN in runs:
        cost = Table(["max length", "peak with / without checkpointing", "wall with / without"])
        for length in lengths:
            walls = [median([r.wall_seconds for r in runs[side][length]]) for side in ("gradaccum", PLAIN)]
            cost.add(length, f"**{medians['gradaccum'][length] / medians[PLAIN][length]:.2f}**",
                     f"**{walls[0] / walls[1]:.2f}**")
        lines += ["", "What checkpointing costs and saves in gradaccum (the same runs without it):", "",
                  cost.markdown()]
    if verified:
        lines += ["", f"Checked: gradaccum at --max-length {verified['length']}: measured peak RSS "
                  f"{verified['peak_bytes'] / MIB:.0f} MiB (fit {fits['gradaccum'](verified['length']) / MIB:.0f} MiB; "
                  f"budget {budget_bytes / MIB:.0f} MiB)."]
    return "\n".join(lines) + "\n", {"medians": medians, "longest": longest, "fits": fits}


def plot_sweep(medians: dict, fits: dict, budget_bytes: int, longest: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    top = max(max(longest.values()), max(max(m) for m in medians.values()))
    if PLAIN in medians:
        lengths = sorted(medians[PLAIN])
        ax.plot(lengths, [medians[PLAIN][L] / 2 ** 30 for L in lengths], "s--", color="C2", alpha=0.7,
                label="gradaccum, no checkpointing")
    xs = list(range(128, top + 129, 64))
    for index, side in enumerate(("gradaccum", "HF")):  # the fits and budget lines are for these two
        lengths = sorted(medians[side])
        ax.plot(lengths, [medians[side][L] / 2 ** 30 for L in lengths], "o-", color=f"C{index}",
                label=f"{side if side == 'gradaccum' else 'HF Trainer'} (measured)")
        ax.plot(xs, [fits[side](x) / 2 ** 30 for x in xs], ":", color=f"C{index}", lw=1)
        ax.axvline(longest[side], color=f"C{index}", lw=0.8, ls="--")
        ax.text(longest[side], budget_bytes / 2 ** 30 * 0.6, f" {longest[side]}", color=f"C{index}", fontsize=8)
    ax.axhline(budget_bytes / 2 ** 30, color="red", lw=0.8, ls="--", label=f"budget {budget_bytes / 2 ** 30:.0f} GiB")
    ax.set_xlabel("--max-length (tokens)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("SmolLM2-135M, activation checkpointing, micro-batch 1 (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="headline,head,cost,sweep")
    parser.add_argument("--lengths", default="256,512,1024,2048", help="sweep: --max-length values")
    parser.add_argument("--head-lengths", default="1024,2048")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", default=str(SMOLLM2))
    parser.add_argument("--budget", default="4GiB")
    parser.add_argument("--verify", action="store_true", help="sweep: run gradaccum at its predicted longest L")
    parser.add_argument("--no-plain", action="store_true", help="sweep: skip gradaccum without checkpointing")
    parser.add_argument("--steps", type=int, default=2, help="sweep: optimizer steps per run")
    parser.add_argument("--output", default="long.md", help="the sweep's results")
    parser.add_argument("--head-output", default="long_head.md", help="the head section's results")
    parser.add_argument("--probe-head", help=argparse.SUPPRESS)
    parser.add_argument("--time-head", help=argparse.SUPPRESS)
    parser.add_argument("--time-checkpointing", help=argparse.SUPPRESS)
    parser.add_argument("--long-tokens", type=int, default=1700, help="headline: tokens per generated record")
    parser.add_argument("--long-length", type=int, default=2048, help="headline: --max-length")
    parser.add_argument("--long-data", help="headline: your own long records instead of generated ones")
    parser.add_argument("--headline-pair", action="store_true",
                        help="headline: only gradaccum and HF with checkpointing (not the runs without it)")
    parser.add_argument("--headline-output", default="long_prompts.md", help="the headline's results")
    parser.add_argument("--cost-lengths", default="256,1024", help="cost: sequence lengths")
    parser.add_argument("--cost-output", default="long_cost.md", help="the cost section's results")
    args = parser.parse_args(argv)
    if args.probe_head:
        import torch

        torch.set_num_threads(2)
        print(json.dumps(probe_head(*json.loads(args.probe_head))))
        return
    if args.time_checkpointing:
        import torch

        torch.set_num_threads(2)
        print(json.dumps(time_checkpointing(*json.loads(args.time_checkpointing))))
        return
    if args.time_head:
        import torch

        torch.set_num_threads(2)
        print(json.dumps(time_head(*json.loads(args.time_head))))
        return

    from gradaccum.memory import parse_size

    sections = [s for s in args.sections.split(",") if s]
    header = [machine_line() + ".", ""]
    if "head" in sections:
        head_lengths = [int(x) for x in args.head_lengths.split(",")]
        head = bench_head(head_lengths, args.rounds)
        text = "\n".join(["# The LM head under activation checkpointing", "", *header, report_head(head, head_lengths)])
        print(text)
        path = write_result(args.head_output, text)
        path.with_suffix(".json").write_text(json.dumps(head, indent=1))
        print(f"wrote {path}")
    if "cost" in sections:
        cost_lengths = [int(x) for x in args.cost_lengths.split(",")]
        command = [sys.executable, __file__, "--time-checkpointing", json.dumps([args.model, cost_lengths,
                                                                                 max(args.rounds, 3)])]
        out = subprocess.run(command, capture_output=True, text=True, env=env_with_src(TIME_ENV), cwd=ROOT,
                             timeout=7200)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        seconds = json.loads(out.stdout.strip().splitlines()[-1])
        text = "\n".join(["# Activation checkpointing: the cost per step", "", *header,
                          report_cost(seconds, cost_lengths, args.model)])
        print(text)
        path = write_result(args.cost_output, text)
        path.with_suffix(".json").write_text(json.dumps(seconds, indent=1))
        print(f"wrote {path}")
    if "headline" in sections:
        if not Path(args.model).is_dir():
            raise SystemExit(f"{args.model} is missing: make smollm2")
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(args.long_data) if args.long_data else Path(tmp) / "long_prompt.jsonl"
            if not args.long_data:
                long_prompt_records(data, args.model, args.long_tokens)
            sides = HEADLINE_SIDES[:2] if args.headline_pair else HEADLINE_SIDES
            runs = bench_headline(args.model, data, args.long_length, args.rounds, args.steps, sides)
        weights = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors")) or \
            sum(f.stat().st_size for f in Path(args.model).glob("*.gguf"))
        text = "\n".join(["# Long prompts: gradaccum vs HF Trainer", "", *header,
                          report_headline(runs, args.long_length, args.steps, args.long_tokens, weights)])
        print(text)
        path = write_result(args.headline_output, text)
        path.with_suffix(".json").write_text(json.dumps(
            {side: {"peak_bytes": [r.peak_rss_bytes for r in rs], "wall_seconds": [r.wall_seconds for r in rs]}
             for side, rs in runs.items()}, indent=1))
        print(f"wrote {path}")
    if "sweep" in sections:
        if not Path(args.model).is_dir():
            raise SystemExit(f"{args.model} is missing: make smollm2")
        lengths = [int(x) for x in args.lengths.split(",")]
        budget = parse_size(args.budget)
        flag = cli_has_checkpointing_flag()
        print(f"sweep: gradaccum {'--gradient-checkpointing' if flag else 'via train_variant.py checkpointing'}")
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "long.jsonl"
            long_records(data)
            runs = bench_sweep(args.model, lengths, args.rounds, data, flag, not args.no_plain, args.steps)
            verified = {}
            if args.verify:
                _, fitted = report_sweep(runs, lengths, budget, {}, args.steps)
                length = fitted["longest"]["gradaccum"]
                output = Path(tmp) / "verify"
                run = run_process(gradaccum_command(args.model, data, length, output, flag, args.steps),
                                  env=env_with_src())
                verified = {"length": length, "peak_bytes": run.peak_rss_bytes, "returncode": run.returncode}
        section, fitted = report_sweep(runs, lengths, budget, verified, args.steps)
        text = "\n".join(["# Long sequences: gradaccum vs HF Trainer with activation checkpointing", "", *header,
                          section])
        print(text)
        path = write_result(args.output, text)
        raw = {"peak_bytes": {side: {L: [r.peak_rss_bytes for r in rs] for L, rs in by_length.items()}
                              for side, by_length in runs.items()},
               "wall_seconds": {side: {L: [r.wall_seconds for r in rs] for L, rs in by_length.items()}
                                for side, by_length in runs.items()},
               "longest": fitted["longest"], "verified": verified}
        path.with_suffix(".json").write_text(json.dumps(raw, indent=1))
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot_sweep(fitted["medians"], fitted["fits"], budget, fitted["longest"], RESULTS / "long_memory.png")
        print(f"wrote {path} and {RESULTS / 'long_memory.png'}")


if __name__ == "__main__":
    main()
