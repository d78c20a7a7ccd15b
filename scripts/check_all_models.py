"""Run `gradaccum check` over every causal-LM, seq2seq-LM and sequence-classification class that
transformers ships, each built from a shrunken default config (random init, no download); write
docs/model_table.md.

    PYTHONPATH=src python scripts/check_all_models.py [--classes LlamaForCausalLM,GPT2LMHeadModel]
        [--timeout 120] [--output docs/model_table.md] [--json results.json]

Each class runs in a worker process (one CPU thread) with a time limit; a worker that hangs or dies
is replaced and the class is listed as not checked, with the reason. A class whose tiny config or
model cannot be built is listed as "not built (reason)".
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

TASK_MAPPINGS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
}
# Default configs describe real checkpoints (billions of parameters); these names are shrunk to
# the value given, never grown. Aliases (n_embd, d_model, ...) cover the many spellings.
LAYER_COUNTS = frozenset({"num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers",
                          "decoder_layers", "encoder_layers", "num_encoder_layers"})
SHRINK = {
    2: (*sorted(LAYER_COUNTS), "num_experts_per_tok", "num_experts_per_token", "moe_topk",
        "top_k", "moe_k", "num_key_value_heads", "n_head_kv", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
        "num_layers_per_block", "n_group", "topk_group"),
    4: ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
        "decoder_attention_heads", "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    1: ("n_shared_experts", "num_shared_experts"),
    16: ("head_dim", "d_kv", "kv_channels", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
         "attention_head_dim", "q_lora_rank", "kv_lora_rank"),
    8: ("rotary_dim",),
    64: ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "model_dim", "hidden_dim", "emb_dim",
         "word_embed_proj_dim", "embedding_size", "projection_dim", "entity_vocab_size", "d_latents"),
    128: ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
          "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_hidden_size", "inner_size",
          "expert_intermediate_size", "ffn_intermediate_size"),
    512: ("vocab_size", "n_words"),
}
TARGET_OF = {name: value for value, names in SHRINK.items() for name in names}
MAX_PARAMETERS = 30_000_000  # what still runs a probe in seconds on one CPU thread


def model_classes(only: set[str] | None = None) -> list[tuple[str, str, str]]:
    """(task, model_type, class name) for every class in the three auto mappings."""
    from transformers.models.auto import modeling_auto

    found, seen = [], set()
    for task, mapping_name in TASK_MAPPINGS.items():
        for model_type, class_name in getattr(modeling_auto, mapping_name).items():
            # Several model types share a class (llama, code_llama, ...): it is checked once.
            if (only is None or class_name in only) and (task, class_name) not in seen:
                seen.add((task, class_name))
                found.append((task, model_type, class_name))
    return found


def _shrunk_kwargs(config, keep: frozenset = frozenset()) -> dict:
    """Constructor arguments that shrink `config`: sizes above but those in `keep`, sub-configs recursively."""
    kwargs = {}
    for name, value in config.to_dict().items():
        current = getattr(config, name, value)
        if hasattr(current, "to_dict") and hasattr(current, "model_type"):
            kwargs[name] = type(current)(**_shrunk_kwargs(current, keep)).to_dict()
        elif name in TARGET_OF and type(value) is int and value > TARGET_OF[name] and name not in keep:
            kwargs[name] = TARGET_OF[name]
    for heads, kv_heads in (("num_attention_heads", "num_key_value_heads"), ("n_head", "n_head_kv")):
        # Where the defaults have as many key/value heads as heads (no GQA, e.g. DeepSeek's MLA), keep it so.
        if kv_heads in kwargs and getattr(config, kv_heads) == getattr(config, heads, None):
            kwargs[kv_heads] = kwargs.get(heads, getattr(config, heads))
    vocab = kwargs.get("vocab_size", getattr(config, "vocab_size", None))
    if isinstance(vocab, int):
        kwargs.update(_token_ids_below(config, vocab))
    return kwargs


def _token_ids_below(config, vocab: int) -> dict:
    """Special token ids moved into a shrunken vocabulary, distinct from one another."""
    moved, next_id = {}, vocab - 1
    for name, value in config.to_dict().items():
        if not name.endswith(("_token_id", "_token_index")):
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, int) and v >= vocab for v in values):
            new = []
            for v in values:
                new.append(next_id if isinstance(v, int) and v >= vocab else v)
                next_id -= 1
            moved[name] = new if isinstance(value, list) else new[0]
    return moved


# First everything shrunk; then the layer counts kept, for configs whose per-layer lists (layer_types,
# attention_types) must match them.
ATTEMPTS = (frozenset(), LAYER_COUNTS)


def tiny_config(config_class, task: str, keep: frozenset = frozenset()):
    config = config_class(**_shrunk_kwargs(config_class(), keep))
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        if task == "sequence-classification" and getattr(part, "pad_token_id", None) is None:
            part.pad_token_id = 0  # as gradaccum.models does: a batch of rows needs one to find each end
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        # Checkpoints set it in config.json; a bare config may not, and labels cannot be shifted right.
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        # Some defaults leave these to be derived, and some models never derive them.
        heads, hidden = getattr(part, "num_attention_heads", None), getattr(part, "hidden_size", None)
        if isinstance(heads, int) and isinstance(hidden, int):
            if hasattr(part, "head_dim") and part.head_dim is None:
                part.head_dim = hidden // heads
            if hasattr(part, "num_key_value_heads") and part.num_key_value_heads is None:
                part.num_key_value_heads = heads
    if task == "causal-lm" and hasattr(config, "is_decoder"):
        config.is_decoder = True  # BERT-style classes are causal LMs only as decoders
    return config


def tiny_model(class_name: str, task: str, keep: frozenset = frozenset()):
    import torch
    import transformers

    model_class = getattr(transformers, class_name)
    config = tiny_config(model_class.config_class, task, keep)
    with torch.device("meta"):
        size = sum(p.numel() for p in model_class(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{size / 1e6:.0f}M parameters after shrinking the config")
    torch.manual_seed(0)
    try:  # as gradaccum.models loads: sdpa where the architecture has it
        model = model_class._from_config(config, attn_implementation="sdpa")
    except (ValueError, ImportError):
        model = model_class._from_config(config, attn_implementation="eager")
    if hasattr(model, "set_default_language") and getattr(config, "languages", None):
        model.set_default_language(config.languages[0])  # X-MOD: one adapter per language
    return model.float()


def check_one(task: str, model_type: str, class_name: str) -> dict:
    """One table row: built and checked, or why not (the most shrunken attempt's reason)."""
    from gradaccum.check import check_model

    row = {"class": class_name, "task": task, "model_type": model_type}
    failures = []
    for keep in ATTEMPTS:
        try:
            model = tiny_model(class_name, task, keep)
        except Exception as error:  # noqa: BLE001 - any failure to build is a row, not a crash
            failures.append(("not built", _reason(error)))
            continue
        try:
            return {**row, "status": "checked", "result": check_model(model, task=task).to_json(),
                    "layers_kept": keep == LAYER_COUNTS}
        except Exception as error:  # noqa: BLE001
            failures.append(("probe failed", _reason(error)))
    status, reason = failures[0]
    return {**row, "status": status, "reason": reason}


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Workers: one process checks classes one by one; the parent replaces it when it hangs or dies


def worker() -> None:
    import torch

    torch.set_num_threads(1)
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever models print goes to stderr, not into the protocol
    for line in sys.stdin:
        task, model_type, class_name = line.split()
        protocol.write(json.dumps(check_one(task, model_type, class_name)) + "\n")
        protocol.flush()


class Worker:
    def __init__(self, log):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.process = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    def ask(self, task: str, model_type: str, class_name: str, timeout: float) -> dict | None:
        self.process.stdin.write(f"{task} {model_type} {class_name}\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def run_all(classes: list[tuple[str, str, str]], timeout: float, log_path: Path, say=print) -> list[dict]:
    rows, current = [], None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        for index, (task, model_type, class_name) in enumerate(classes, 1):
            fresh = current is None
            current = current or Worker(log)
            started = time.perf_counter()
            # The first class of a fresh worker also pays for importing torch and transformers.
            row = current.ask(task, model_type, class_name, timeout + (90 if fresh else 0))
            if row is None:
                current.stop()
                current = None
                row = {"class": class_name, "task": task, "model_type": model_type, "status": "not checked",
                       "reason": f"no answer within {timeout:.0f} s (timed out or crashed)"}
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            say(f"[{index}/{len(classes)}] {class_name}: {_short(row)} ({row['seconds']} s)")
    if current:
        current.stop()
    return rows


def _short(row: dict) -> str:
    if row["status"] != "checked":
        return f"{row['status']} ({row['reason']})"
    result = row["result"]
    return f"Trainer {result['trainer']['verdict']}; gradaccum {result['ours']}"


# ---------------------------------------------------------------------------------------------
# The table

TRAINER_WORDS = {
    "exact": "passes the count, loss honours it: exact",
    "count-dropped": "passes the count, loss drops it, no division by K: ~K x gradient",
    "count-mismatch": "passes the count, loss honours it, but counts other targets: step scaled",
    "mean-of-means": "cannot pass the count: divides micro-batch means by K (mean of means)",
    "count-rejected": "passes the count, forward raises",
    "no-loss": "no loss from labels",
    "unknown-loss": "loss is not a mean over targets of the logits: cannot tell",
    "inexact": "not exact",
    "fails": "compute_loss fails",
    "unavailable": "not checked",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_row(row: dict) -> str:
    if row["status"] != "checked":
        return f"| {row['class']} | {row['task']} | {row['status']} | {_cell(row['reason'])} | | |"
    result = row["result"]
    trainer = result["trainer"]
    verdict = "exact" if result["exact_under_trainer"] else "**not exact**"
    does = TRAINER_WORDS.get(trainer["verdict"], trainer["verdict"])
    if trainer["verdict"] == "count-mismatch":
        does += f" ({trainer['counts']} vs {result['loss_targets']}: x{trainer['count_ratio']:.3f} here)"
    extra = [d.split(":")[0] for d in result["departures"]]
    if result["task"] == "causal-lm" and result["packing"].startswith("leaks"):
        extra.append(f"packing leaks ({result['attention']})")
    return (f"| {row['class']} | {row['task']} | {verdict} | {_cell(does)} | {result['ours']} "
            f"| {_cell('; '.join(extra))} |")


def summary(rows: list[dict]) -> Counter:
    """Counts of the table's outcomes, keyed by (what, task)."""
    counts = Counter()
    for row in rows:
        task = row["task"]
        if row["status"] != "checked":
            counts[(row["status"], task)] += 1
            continue
        result = row["result"]
        counts[("checked", task)] += 1
        counts[(f"Trainer: {result['trainer']['verdict']}", task)] += 1
        counts[("exact under Trainer as-is" if result["exact_under_trainer"] else "not exact under Trainer as-is",
                task)] += 1
        counts[(f"gradaccum: {result['ours']}", task)] += 1
        if result["packing"].startswith("leaks"):
            counts[("packing leaks", task)] += 1
    return counts


def summary_table(counts: Counter) -> list[str]:
    tasks = list(TASK_MAPPINGS)
    outcomes = sorted({what for what, _ in counts}, key=lambda w: (not w.startswith(("checked", "not b", "probe")), w))
    lines = ["| outcome | " + " | ".join(tasks) + " | all |", "|---|" + "---|" * (len(tasks) + 1)]
    for what in outcomes:
        cells = [counts.get((what, task), 0) for task in tasks]
        lines.append(f"| {what} | " + " | ".join(str(c) for c in cells) + f" | {sum(cells)} |")
    return lines


def one_line_summary(rows: list[dict]) -> str:
    totals = Counter()
    for (what, _), value in summary(rows).items():
        totals[what] += value
    return ", ".join(f"{what}: {value}" for what, value in sorted(totals.items()))


HEADER = """\
# Gradient accumulation under HF Trainer, model by model

Made by `scripts/check_all_models.py` with transformers {transformers} and torch {torch} (Python {python},
CPU, {minutes:.0f} min). Every class in transformers' causal-LM, seq2seq-LM and sequence-classification auto
mappings was built from its config class's defaults, shrunk (2 layers, hidden size 64, 4 heads, vocabulary
512, small MLP and experts; the default layer count where per-layer lists must match it), with random weights
and sdpa attention where the class has it, and probed by `gradaccum check` (float32, dropout off) on two
micro-batches of 3 and 1 rows with unequal target counts: what the model's loss divides by, whether it
honours `num_items_in_batch` (n, then 2n, must halve the loss), what a real `transformers.Trainer` counts,
passes and divides by, and each micro-batch's weight in Trainer's step against the big batch. "exact" means
Trainer with gradient accumulation, as-is, computes the big-batch gradient and nothing else departs
(BatchNorm, an active router aux loss, rows that depend on each other). The gradaccum column is
`gradaccum train` for causal LMs and the `Accumulator` with `window.scale` for the others. For causal LMs the
probe also packs two documents in one row (position_ids restarting, no attention_mask, use_cache off, as
Trainer's padding-free collators and `gradaccum train --packing` send them) and reports a leak when the second
document's logits change. Fix for Trainer users: `trainer = gradaccum.hf.make_exact(trainer)`. A class that
could not be built from a tiny config is listed with the reason, not guessed.
"""


def write_table(rows: list[dict], path: Path, seconds: float) -> None:
    import platform

    import torch
    import transformers

    lines = [
        HEADER.format(transformers=transformers.__version__, torch=torch.__version__,
                      python=platform.python_version(), minutes=seconds / 60),
        *summary_table(summary(rows)),
        "",
        "| class | task | under HF Trainer as-is | what Trainer does with it | gradaccum | other departures |",
        "|---|---|---|---|---|---|",
    ]
    order = {"checked": 0, "probe failed": 1, "not checked": 2, "not built": 3}
    for row in sorted(rows, key=lambda r: (order.get(r["status"], 9), r["task"], r["class"].lower())):
        lines.append(table_row(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", help="comma-separated class names (default: all)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per class (default: 120)")
    parser.add_argument("--output", type=Path, default=Path("docs/model_table.md"))
    parser.add_argument("--json", type=Path, help="also write every row, with the full check result, here")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "check_all_models.log",
                        help="the workers' stderr (default: %(default)s)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    only = set(args.classes.split(",")) if args.classes else None
    classes = model_classes(only)
    if only and len({c for _, _, c in classes}) != len(only):
        parser.error(f"--classes: not in the auto mappings: {sorted(only - {c for _, _, c in classes})}")
    started = time.perf_counter()
    rows = run_all(classes, args.timeout, args.log)
    write_table(rows, args.output, time.perf_counter() - started)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.output}: {one_line_summary(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
