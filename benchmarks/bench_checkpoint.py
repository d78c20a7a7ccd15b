"""How long training waits for a checkpoint: blocking `checkpoint.save` vs `checkpoint.AsyncSaver`.

    python benchmarks/bench_checkpoint.py                    # tiny preset and SmolLM2-135M-size state
    python benchmarks/bench_checkpoint.py --presets tiny --rounds 5

For each preset: a float32 model (random init from its config), AdamW with its state (one step), and
per round, interleaved:
  save      checkpoint.save(...): the whole blocking write (safetensors, optimizer.pt, RNG, manifest
            with sha256, fsync, rename) -- what the training loop waits for today
  stall     AsyncSaver.save(...): what the loop waits for with background saves (the CPU snapshot)
  stall, reused buffers   the same with AsyncSaver(reuse_buffers=True) kept across rounds: the copy
            goes into the previous snapshot's memory instead of freshly allocated (page-faulted) pages
  write     the background thread's write of that snapshot (the loop does not wait for it)
  steps     a few training steps of the tiny preset (batch 8 x 256 tokens), alone and while a write is
            in flight, to show what the background write takes from training on this machine
Ratios are of medians over the rounds; absolute seconds are for context (2 shared cores here).
Writes benchmarks/results/checkpoint.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MIB, Table, machine_line, median, write_result  # noqa: E402

PRESETS = {
    "tiny": {},
    # SmolLM2-135M's shape: 134.5M parameters, 540 MB of float32 weights, 1.08 GB of AdamW moments.
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048),
}


def build(name: str):
    import torch
    from transformers import LlamaForCausalLM

    from gradaccum.models import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(**PRESETS[name]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def training_state(optimizer) -> dict:
    return {"optimizer": optimizer.state_dict(), "accumulator": {"step": 1}}


def tiny_steps(num_steps: int) -> float:
    """Seconds for `num_steps` forward+backward+AdamW steps of the tiny preset on 8 x 256 tokens."""
    import torch
    from transformers import LlamaForCausalLM

    from gradaccum.models import tiny_config

    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 256, (8, 256))
    start = time.perf_counter()
    for _ in range(num_steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def bench(name: str, rounds: int) -> dict:
    from gradaccum import checkpoint

    model, optimizer = build(name)
    results = {"save": [], "stall": [], "write": [], "bytes": 0, "steps_alone": [], "steps_writing": [],
               "stall_reused": []}
    root = Path(tempfile.mkdtemp(prefix=f"bench_checkpoint_{name}_"))
    reusing = checkpoint.AsyncSaver(root / "reused", keep=1, reuse_buffers=True)
    try:
        for round_index in range(rounds + 1):
            # Reused buffers: the first save allocates them, the timed ones copy into them.
            stall = reusing.save(round_index + 1, model, training_state(optimizer), {"step": round_index})
            reusing.wait()
            if round_index == 0:
                continue
            results["stall_reused"].append(stall)
            start = time.perf_counter()
            checkpoint.save(root / "sync", round_index + 1, model, training_state(optimizer), {"step": round_index},
                            keep=1)
            results["save"].append(time.perf_counter() - start)
            with checkpoint.AsyncSaver(root / "async", keep=1) as saver:
                results["stall"].append(saver.save(round_index + 1, model, training_state(optimizer),
                                                   {"step": round_index}))
                results["bytes"] = saver.last_snapshot_bytes
                results["steps_writing"].append(tiny_steps(3))  # training while the write runs
                writing = saver.in_flight
            results["write"].append(saver.last_write_seconds)
            results["steps_alone"].append(tiny_steps(3))
            print(f"  [{name}] round {round_index}/{rounds}: save {results['save'][-1]:.2f} s, stall "
                  f"{results['stall'][-1]:.3f} s ({results['stall_reused'][-1]:.3f} s reused), write "
                  f"{results['write'][-1]:.2f} s; 3 tiny steps "
                  f"{results['steps_alone'][-1]:.2f} s alone, {results['steps_writing'][-1]:.2f} s while writing "
                  f"({'write still running after them' if writing else 'write done before them'})", flush=True)
    finally:
        reusing.close()
        shutil.rmtree(root, ignore_errors=True)
    return results


def report(results: dict, rounds: int) -> str:
    lines = ["# Checkpoint saves: blocking vs background (checkpoint.AsyncSaver)", "",
             f"{machine_line()}. {rounds} rounds, interleaved; medians. 'stall' is what the training loop "
             "waits for: the snapshot (private CPU copies of weights + AdamW state + RNG). 'write' runs in "
             "a background thread: safetensors, optimizer.pt, sha256 manifest, fsync, atomic rename. "
             "'steps while writing': 3 training steps of the tiny preset (8 x 256 tokens) run right after "
             "the save returns, against the same steps with no write in flight.", ""]
    table = Table(["state", "size (MiB)", "blocking save (s)", "stall (s)", "stall / save", "stall, reused (s)",
                   "reused / save", "background write (s)", "3 tiny steps alone (s)", "while writing (s)",
                   "slowdown"])
    for name, r in results.items():
        save, stall, write = median(r["save"]), median(r["stall"]), median(r["write"])
        alone, writing = median(r["steps_alone"]), median(r["steps_writing"])
        reused = median(r["stall_reused"])
        table.add(name, f"{r['bytes'] / MIB:.0f}", f"{save:.2f}", f"{stall:.3f}", f"**{stall / save:.3f}**",
                  f"{reused:.3f}", f"**{reused / save:.3f}**", f"{write:.2f}", f"{alone:.2f}", f"{writing:.2f}",
                  f"{writing / alone:.2f}x")
    return "\n".join(lines + [table.markdown(), ""]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="checkpoint.md")
    args = parser.parse_args(argv)
    results = {name: bench(name, args.rounds) for name in args.presets.split(",") if name}
    text = report(results, args.rounds)
    print(text)
    print(f"wrote {write_result(args.output, text)}")


if __name__ == "__main__":
    main()
