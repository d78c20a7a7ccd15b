"""Figures (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(metrics: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Train loss per step, eval loss and exact-match accuracy where measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    train = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None and not m.get("skipped")]
    if train:
        ax.plot(*zip(*train), color="tab:blue", lw=1.2, label="train loss (exact window mean)")
    evals = [(m["step"], m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", lw=1.5, ms=4, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    accuracy = [(m["step"], m["eval_accuracy"]) for m in metrics if m.get("eval_accuracy") is not None]
    if accuracy:
        ax2 = ax.twinx()
        ax2.plot(*zip(*accuracy), "s--", color="tab:green", lw=1.2, ms=4, label="eval exact match")
        ax2.set_ylabel("exact-match accuracy")
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(title or "gradaccum train")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# `gradaccum audit`: loss curves, the gated first-step gradient, and the final weights (no gate)

_HF_STYLE = {  # transformers.Trainer cases: GA=k against GA=1
    "as-is": ("tab:green", "^"),
    "no-loss-kwargs": ("tab:purple", "v"),
    "drops-num-items": ("tab:orange", "D"),
}


def _log_points(ax, xs, values, floor, color, marker, label, line=True, size=7):
    """Points on a log axis; an exact 0 has no place there, so it is drawn hollow at `floor`."""
    points = [(x, v) for x, v in zip(xs, values) if v is not None and math.isfinite(v)]
    if not points:
        return False
    xs, values = zip(*points)
    ys = [v if v > 0 else floor for v in values]
    if line and len(xs) > 1:
        ax.plot(xs, ys, color=color, lw=1.6)
    for x, y, v in zip(xs, ys, values):
        ax.plot([x], [y], marker=marker, ms=size, color=color, mfc=color if v > 0 else "white", ls="none")
    ax.plot([], [], color=color, marker=marker, lw=1.6 if line else 0, label=label)
    return any(v <= 0 for v in values)


def _micro_axis(ax, sizes, steps, batch_size, trainer=None):
    """Micro-batch sizes on a log2 axis; `trainer` = (x, label) adds transformers.Trainer's column."""
    ax.set_xscale("log", base=2)
    ticks, labels = list(sizes), [f"{m}\n(×{k})" for m, k in zip(sizes, steps)]
    if trainer is not None:
        ticks.append(trainer[0])
        labels.append(trainer[1])
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.minorticks_off()
    ax.set_xlim(min(sizes) / 1.6, max(ticks) * (2 if trainer else 1.6))
    ax.set_yscale("log")
    ax.set_xlabel(f"micro-batch size (accumulation steps), B = {batch_size}")
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.08, which="minor")


def _loss_panels(fig, grid, result, plt):
    from matplotlib.ticker import MaxNLocator

    s, mbs = result.setup, result.micro_batches
    smallest = mbs[0]
    ax_loss = fig.add_subplot(grid[0, 0])
    ax_diff = fig.add_subplot(grid[1, 0], sharex=ax_loss)
    steps = list(range(1, len(result.full_losses) + 1))
    nan = lambda values: [math.nan if v is None else v for v in values]  # noqa: E731
    full = nan(result.full_losses)
    naive_colors = plt.cm.Reds([0.9, 0.7, 0.55, 0.4, 0.3, 0.25, 0.2, 0.15][:len(mbs)])
    few = len(steps) <= 5  # a line needs two points: mark each step as well
    ax_loss.plot(steps, full, color="black", lw=4, alpha=0.25, marker="o" if few else None, ms=9,
                 label=f"full batch ({s['batch_size']}×1)")
    ax_loss.plot(steps, nan(smallest.exact.losses), color="tab:blue", lw=1.5, ls="--", marker="x" if few else None,
                 label=f"exact, {smallest.micro_batch_size}×{smallest.accumulation_steps}")
    for mb, color in zip(mbs, naive_colors):
        main = mb is smallest
        style = dict(color=color, lw=1.6 if main else 1.0, alpha=1 if main else 0.6, marker="s" if few else None,
                     ms=4)
        ax_loss.plot(steps, nan(mb.naive.losses), label=f"naive, {mb.micro_batch_size}×{mb.accumulation_steps}",
                     **style)
        ax_diff.plot(steps, [a - b for a, b in zip(nan(mb.naive.losses), full)], **style)
    ax_diff.plot(steps, [a - b for a, b in zip(nan(smallest.exact.losses), full)], color="tab:blue", lw=1.5, ls="--",
                 marker="x" if few else None)
    ax_diff.axhline(0, color="black", lw=0.8, alpha=0.5)
    ax_loss.set_ylabel("window loss (nats / target token)")
    ax_loss.set_title("Training loss: same weights, same windows")
    ax_loss.legend(fontsize=8, loc="upper right", ncol=2)
    ax_loss.grid(alpha=0.3)
    plt.setp(ax_loss.get_xticklabels(), visible=False)
    ax_diff.set_ylabel("loss − full batch")
    ax_diff.set_xlabel("optimizer step")
    if few:
        ax_diff.set_xticks(steps)
        ax_diff.set_xlim(0.5, len(steps) + 0.5)
    else:
        ax_diff.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_diff):
        ax.ticklabel_format(axis="y", useOffset=False)
    ax_diff.grid(alpha=0.3)


def _trainer_x(result) -> float:
    """transformers.Trainer's cases get their own column right of the audit's micro-batch sizes."""
    return max(mb.micro_batch_size for mb in result.micro_batches) * 4


def _trainer_points(ax, result, metric: str, floor) -> bool:
    hf, x, hollow = result.hf_trainer, _trainer_x(result), False
    for case, offset in zip(hf.cases, (0.8, 1.0, 1.25, 1.55)):
        color, marker = _HF_STYLE.get(case.name, ("tab:gray", "x"))
        hollow |= _log_points(ax, [x * offset], [getattr(case, metric)], floor, color, marker,
                              f"Trainer GA={hf.accumulation_steps}, {case.name}", line=False, size=8)
    ax.axvline(x / 2, color="gray", lw=0.8)
    return hollow


def _gradient_panel(ax, result, floor):
    """The gated metric: first-step gradient error against the full batch, with the bound."""
    mbs, gate, hf = result.micro_batches, result.gate, result.hf_trainer
    sizes = [mb.micro_batch_size for mb in mbs]
    hollow = _log_points(ax, sizes, [mb.exact.gradient_error for mb in mbs], floor, "tab:blue", "o", "exact")
    hollow |= _log_points(ax, sizes, [mb.naive.gradient_error for mb in mbs], floor, "tab:red", "s", "naive")
    ax.axhline(gate.tolerance, color="black", lw=1.2, ls="--",
               label=f"gate {gate.tolerance:.1e} = {gate.factor:g}× rounding + floor")
    if gate.rounding > 0:
        ax.axhline(gate.rounding, color="gray", lw=1, ls=":",
                   label=f"{gate.dtype} rounding of the full batch, {gate.rounding:.1e}")
    if hf is not None:
        hollow |= _trainer_points(ax, result, "gradient_error", floor)
        if not math.isclose(hf.tolerance, gate.tolerance):  # float64: Trainer's loss runs in float32
            x = _trainer_x(result)
            ax.plot([x / 1.4, x * 1.4], [hf.tolerance] * 2, color="tab:green", lw=1.2, ls="--",
                    label=f"Trainer's gate {hf.tolerance:.1e} (its loss is float32)")
    ax.set_ylabel("relative L2 error of the first-step gradient")
    ax.set_title("First-step gradient against the full batch (gated)")
    return hollow


def _weights_panel(ax, result, floor):
    """Not gated: after many AdamW steps rounding grows on coordinates with tiny gradients."""
    mbs, hf = result.micro_batches, result.hf_trainer
    sizes = [mb.micro_batch_size for mb in mbs]
    hollow = _log_points(ax, sizes, [mb.exact.weight_distance_vs_update for mb in mbs], floor, "tab:blue", "o",
                         "exact")
    hollow |= _log_points(ax, sizes, [mb.naive.weight_distance_vs_update for mb in mbs], floor, "tab:red", "s",
                          "naive")
    if hf is not None:
        hollow |= _trainer_points(ax, result, "weight_distance_vs_update", floor)
    ax.set_ylabel("distance to the full batch's final weights\n"
                  "per unit of its update, ‖w − w_full‖ / ‖w_full − w_0‖")
    steps = result.setup["steps"]
    ax.set_title(f"Final weights after {steps} step{'s' if steps != 1 else ''} (not gated)")
    return hollow


def plot_audit(result: Any, path: str | Path) -> None:
    """`gradaccum audit`'s figure: loss per step; the gated first-step gradient error with this run's
    bound; the final weights' distance (a different quantity, drawn without the gate)."""
    import torch
    from matplotlib.gridspec import GridSpec

    plt = _pyplot()
    s, mbs, hf = result.setup, result.micro_batches, result.hf_trainer
    fig = plt.figure(figsize=(17, 5.6), dpi=120)
    grid = GridSpec(2, 3, figure=fig, width_ratios=[1.2, 1, 1], height_ratios=[2.4, 1], hspace=0.08, wspace=0.28)
    _loss_panels(fig, grid, result, plt)
    ax_gradient, ax_weights = fig.add_subplot(grid[:, 1]), fig.add_subplot(grid[:, 2])
    values = [mb.exact.gradient_error for mb in mbs] + [mb.naive.gradient_error for mb in mbs]
    values += [mb.exact.weight_distance_vs_update for mb in mbs] + [mb.naive.weight_distance_vs_update for mb in mbs]
    if hf is not None:
        values += [c.gradient_error for c in hf.cases] + [c.weight_distance_vs_update for c in hf.cases]
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    floor = min(positive + [torch.finfo(getattr(torch, s["dtype"])).eps]) / 10
    hollow = _gradient_panel(ax_gradient, result, floor)
    hollow |= _weights_panel(ax_weights, result, floor)
    sizes, steps = [mb.micro_batch_size for mb in mbs], [mb.accumulation_steps for mb in mbs]
    trainer = None if hf is None else (_trainer_x(result), f"Trainer\n{hf.micro_batch_size}×{hf.accumulation_steps}")
    for ax in (ax_gradient, ax_weights):
        _micro_axis(ax, sizes, steps, s["batch_size"], trainer)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    low, high = ax_gradient.get_ylim()  # shade what the gate calls rounding
    ax_gradient.axhspan(low, result.tolerance, color="tab:blue", alpha=0.07, lw=0)
    ax_gradient.set_ylim(low, high)
    if hollow:
        fig.text(0.99, 0.01, f"hollow: exactly 0, drawn at {floor:.0e}", ha="right", fontsize=7.5, color="gray")
    model = s["model"] if len(s["model"]) < 40 else "…" + s["model"][-38:]
    summary = "exact matches the full batch" if result.max_exact_gradient_error <= result.tolerance \
        else "exact DEPARTS from the full batch"
    summary += ", naive departs" if result.naive_departs else ", naive agrees (equal target counts)"
    if hf is not None:
        summary += f", Trainer GA={hf.accumulation_steps} {'aligned' if hf.aligned else 'NOT aligned'}"
    fig.suptitle(f"Gradient accumulation audit: {model}{' + LoRA' if s['lora'] else ''}, {s['dtype']}, "
                 f"B = {s['batch_size']}, {s['steps']} step{'s' if s['steps'] != 1 else ''}: {summary}", fontsize=11)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
