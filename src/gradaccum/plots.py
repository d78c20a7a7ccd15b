"""Figures (matplotlib, headless)."""

from __future__ import annotations

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
