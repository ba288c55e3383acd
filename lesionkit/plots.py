"""Report figures as PNG: per-class ROC curves (AUC in the legend), confusion matrix, reliability diagram;
score against training time for `lesionkit compare`.

Uses matplotlib's object API (`Figure` + its Agg canvas), so no display, no global pyplot state and
no backend switching is needed on headless nodes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from lesionkit.metrics import reliability_bins


def _save(fig: Figure, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return Path(path)


def roc_figure(labels, probs, classes, path: str | Path, title: str = "ROC (one vs rest)") -> Path:
    """One ROC curve per class whose AUC is defined; the AUC is in each legend entry."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for c, name in enumerate(classes):
        y = labels == c
        if 0 < y.sum() < y.size:
            fpr, tpr, _ = skm.roc_curve(y, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(y, probs[:, c]):.3f})")
        else:
            ax.plot([], [], label=f"{name} (AUC undefined)")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(
        xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", xlim=(0, 1), ylim=(0, 1.01), title=title
    )
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def confusion_figure(confusion, classes, path: str | Path) -> Path:
    """Counts with row-normalised colour (recall per true class), so rare classes stay readable."""
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{norm[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted (argmax)", ylabel="true", title="Confusion matrix")
    ax.set_xticklabels(classes, rotation=30, ha="right", fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def reliability_figure(labels, probs, path: str | Path, n_bins: int = 10) -> Path:
    """Top-label reliability diagram: accuracy vs confidence per bin, with sample counts below."""
    b = reliability_bins(labels, probs, n_bins)
    centers = (b["edges"][:-1] + b["edges"][1:]) / 2
    used = b["count"] > 0
    fig = Figure(figsize=(5, 5.5))
    ax, axc = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(
        centers[used], b["accuracy"][used], width=1 / n_bins, edgecolor="black", alpha=0.7, label="accuracy"
    )
    ax.plot([0, 1], [0, 1], color="grey", ls="--", label="perfect calibration")
    ax.plot(b["confidence"][used], b["accuracy"][used], "o-", color="C3", label="accuracy vs mean confidence")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability (top label)")
    ax.legend(loc="upper left", fontsize="small")
    axc.bar(centers, b["count"], width=1 / n_bins, edgecolor="black", color="grey")
    axc.set(xlabel="confidence", ylabel="count")
    return _save(fig, path)


def score_time_figure(names, seconds, scores, cis, path: str | Path, ylabel: str) -> Path:
    """One point per run: validation score (95% CI as an error bar where known) against training time,
    each labelled with its run name: what a longer or bigger run buys."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for name, t, y, ci in zip(names, seconds, scores, cis):
        if y is None or not np.isfinite(y):
            continue
        err = [[y - ci[0]], [ci[1] - y]] if isinstance(ci, list) else None
        ax.errorbar(t / 60, y, yerr=err, fmt="o", capsize=3)
        ax.annotate(str(name), (t / 60, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="training time (minutes, validation included)", ylabel=ylabel, title=f"{ylabel} vs time")
    ax.grid(alpha=0.3)
    return _save(fig, path)
