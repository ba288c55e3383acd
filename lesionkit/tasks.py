"""Tasks: what a dataset's classes are and how a model trained on it is judged.

A task decides the class list (or takes any), the scores it adds to the generic metrics, the default
monitor and its direction, the console table's metric columns and the submission CSV of `predict`.
Dataset names and label columns (the ISIC ones) live here and nowhere else. A shard folder's task is
its manifest's `task` field, or is recognised from its classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lesionkit.errors import ConfigError, UsageError

ISIC2017_CLASSES = ("nevus", "melanoma", "seborrheic_keratosis")  # the study's order: nevus = 0
ISIC2017_SCORED = ("melanoma", "seborrheic_keratosis")  # the ISIC 2017 Part 3 score averages their AUCs

MINIMIZED = ("loss", "nll", "brier", "ece")  # lower is better; every other metric is maximised
SCALARS = ("accuracy", "balanced_accuracy", "auc_macro", "nll", "brier", "ece")  # of metrics.compute_metrics


@dataclass(frozen=True)
class Monitor:
    """The metric that picks the best checkpoint, drives early stopping and the plateau scheduler."""

    name: str
    mode: str  # "max" | "min"

    @property
    def worst(self) -> float:
        return -math.inf if self.mode == "max" else math.inf

    def better(self, new: float | None, old: float) -> bool:
        if new is None or not math.isfinite(new):
            return False
        return new > old if self.mode == "max" else new < old


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...] | None  # None: any class list
    monitor: str  # default monitor
    columns: tuple[str, ...]  # metric columns of the trainer's per-epoch table
    composites: dict[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # score -> classes whose AUCs it averages
    id_column: str = "image"  # first column of the submission CSV
    submission_classes: tuple[str, ...] | None = None  # probability columns of the submission (None: all)

    def metrics(self, labels, probs, classes, thresholds: dict | None = None) -> dict:
        """`metrics.compute_metrics` plus this task's scores (None, with a note, when undefined)."""
        from lesionkit import metrics as M  # scipy + sklearn: not for the pack/synth workers that need names

        m = M.compute_metrics(labels, probs, classes, thresholds=thresholds)
        for name, members in self.composites.items():
            aucs = [m.get(f"auc_{c}") for c in members]
            m[name] = float(np.mean(aucs)) if aucs and all(a is not None for a in aucs) else None
            if m[name] is None:
                m["notes"].append(f"{name} undefined: an AUC of {', '.join(members)} is undefined")
        return m

    def bootstrap_ci(self, labels, probs, classes, **kw) -> dict:
        from lesionkit import metrics as M

        return M.bootstrap_ci(labels, probs, classes, composites=self.composites, **kw)

    def metric_names(self, classes) -> list[str]:
        """Every scalar the trainer's validation reports for these classes: the valid monitors."""
        per_class = [f"{kind}_{c}" for kind in ("auc", "auc_sens_80", "ap", "sens", "spec") for c in classes]
        return ["loss", *SCALARS, *per_class, *self.composites]

    def monitor_for(self, name: str, classes) -> Monitor:
        """The monitor `name` (empty: the task's default), checked against what validation reports."""
        name = name or self.monitor
        valid = self.metric_names(classes)
        if name not in valid:
            raise ConfigError(
                f"monitor {name!r} is not a metric of task {self.name} with classes {list(classes)}; "
                f"valid monitors: {', '.join(valid)}"
            )
        return Monitor(name, "min" if name in MINIMIZED else "max")

    def table_columns(self, classes) -> list[str]:
        return [c for c in self.columns if c in self.metric_names(classes)]

    def submission_frame(self, keys, probs, classes):
        """The task's submission CSV as a DataFrame, rows sorted by id, probabilities clipped to [0, 1]."""
        import pandas as pd

        wanted = list(self.submission_classes or classes)
        missing = [c for c in wanted if c not in classes]
        if missing:
            raise UsageError(
                f"the {self.name} submission needs the classes {wanted}; the checkpoint has {classes}"
            )
        probs = np.clip(np.asarray(probs, dtype=np.float64).reshape(len(keys), len(classes)), 0.0, 1.0)
        df = pd.DataFrame({self.id_column: list(keys), **{c: probs[:, classes.index(c)] for c in wanted}})
        return df.sort_values(self.id_column, kind="stable").reset_index(drop=True)

    def truth_frame(self, keys, labels, classes):
        """Ground truth in the layout of `submission_frame` (one-hot columns)."""
        onehot = np.eye(len(classes))[np.asarray(labels, dtype=np.int64)]
        return self.submission_frame(keys, onehot, classes)


TASKS: dict[str, Task] = {
    "isic2017": Task(
        "isic2017",
        ISIC2017_CLASSES,
        monitor="isic2017_score",
        columns=("auc_melanoma", "auc_seborrheic_keratosis", "isic2017_score", "balanced_accuracy"),
        composites={"isic2017_score": ISIC2017_SCORED},
        id_column="image_id",
        submission_classes=ISIC2017_SCORED,
    ),
    "custom": Task(
        "custom", None, monitor="auc_macro", columns=("auc_macro", "balanced_accuracy", "accuracy")
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def detect(classes) -> Task:
    """The task whose fixed class list this is, else `custom`."""
    return next((t for t in TASKS.values() if t.classes == tuple(classes)), TASKS["custom"])


def for_manifest(manifest: dict) -> Task:
    return get_task(manifest["task"]) if manifest.get("task") else detect(manifest["classes"])
