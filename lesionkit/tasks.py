"""Tasks: what a dataset's classes are and how a model trained on it is judged.

A task decides the class list (or takes any), the scores it adds to the generic metrics, the default
monitor and its direction, the console table's metric columns and the submission CSV of `predict`.
Dataset names and label columns (the ISIC ones) live here and nowhere else. A shard folder's task is
its manifest's `task` field (`pack` detects it from the labels CSV; `pack --task` overrides), or is
recognised from its classes.

- `isic2017`: nevus / melanoma / seborrheic keratosis; the ISIC 2017 Part 3 score (mean of two AUCs).
- `isic2018`, `isic2019`: the 7 / 8 diagnostic classes; the official metric is balanced multi-class
  accuracy (mean per-class recall); per-class AUCs and the melanoma AUC beside it. The 2019 submission
  has a 9th column, UNK (the test set's "none of these"), written as 0: a closed-set classifier never
  predicts it.
- `isic2020`: melanoma vs the rest, scored by the melanoma AUC. Any class list that contains
  `melanoma` is accepted, so a model can train on the finer `diagnosis` classes (as the SIIM-ISIC 2020
  winners did) and still be scored, and submit, by its melanoma probability.
- `custom`: any class list (a plain `image_id,label` CSV); macro AUC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lesionkit.errors import ConfigError, UsageError

ISIC2017_CLASSES = ("nevus", "melanoma", "seborrheic_keratosis")  # the study's order: nevus = 0
ISIC2017_SCORED = ("melanoma", "seborrheic_keratosis")  # the ISIC 2017 Part 3 score averages their AUCs
ISIC2018_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")  # Task 3 ground truth, header order
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")  # + UNK, never in training labels
ISIC2019_UNKNOWN = "UNK"
ISIC2020_CLASSES = ("benign", "melanoma")  # `target` 0 / 1
MELANOMA = "melanoma"
# HAM10000 `dx` -> ISIC 2018 class. HAM10000 is the ISIC 2018 Task 3 training set; the ISIC 2019 labels
# split its `akiec` into AK and SCC, so dx maps onto the 2019 classes for every dx but akiec (None).
HAM10000_DX = {
    "mel": "MEL",
    "nv": "NV",
    "bcc": "BCC",
    "akiec": "AKIEC",
    "bkl": "BKL",
    "df": "DF",
    "vasc": "VASC",
}
HAM10000_DX_2019 = {**HAM10000_DX, "akiec": None}
# One image's labels in two releases (`lesionkit dedup`): the names of one diagnosis, or of one that holds the
# other (ISIC 2017's seborrheic keratoses are part of 2018/2019's BKL, with 2020's solar lentigines and
# lichenoid keratoses; 2018's AKIEC is 2019's AK + SCC), map to one family. ISIC 2020's `benign` (target 0)
# agrees with every diagnosis but melanoma, `unknown` with every one.
DIAGNOSIS_FAMILY = {
    "MEL": MELANOMA,
    MELANOMA: MELANOMA,
    "NV": "nevus",
    "nevus": "nevus",
    "BKL": "BKL",
    "seborrheic_keratosis": "BKL",
    "solar_lentigo": "BKL",
    "lichenoid_keratosis": "BKL",
    "AKIEC": "AKIEC",
    "AK": "AKIEC",
    "SCC": "AKIEC",
}

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
    classes: tuple[str, ...] | None  # None: any class list (that holds `required`)
    monitor: str  # default monitor: the task's official score
    columns: tuple[str, ...]  # metric columns of the trainer's per-epoch table
    composites: dict[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # score -> classes whose AUCs it averages (one class: an alias such as auc_melanoma for MEL)
    id_column: str = "image"  # first column of the submission CSV
    # (column, class) pairs of the submission CSV; class None: a constant 0 column; None: every class
    submission: tuple[tuple[str, str | None], ...] | None = None
    required: tuple[str, ...] = ()  # classes a free class list must contain
    stratify_on: str | None = None  # folds stratify on "is this class" (else on the class): same folds
    # for every class list of the task (ISIC 2020 packed with `target` or with `diagnosis`)
    description: str = ""

    def check_classes(self, classes) -> None:
        """UsageError unless this task can judge a model over `classes`."""
        classes = tuple(classes)
        if self.classes is not None and classes != self.classes:
            raise UsageError(f"task {self.name} needs the classes {list(self.classes)}, not {list(classes)}")
        missing = [c for c in self.required if c not in classes]
        if missing:
            raise UsageError(f"task {self.name} needs the class(es) {missing} among {list(classes)}")

    @property
    def score(self) -> str:
        """The official score (the default monitor; `lesionkit cv` reports it with its CI)."""
        return self.monitor

    def strata(self, label_names) -> list[str]:
        """What grouped folds stratify on, per sample."""
        if self.stratify_on is None:
            return list(label_names)
        return [str(name == self.stratify_on) for name in label_names]

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
        extra = [c for c in self.composites if c not in per_class]
        return ["loss", *SCALARS, *per_class, *extra]

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

        classes = list(classes)
        layout = self.submission or tuple((c, c) for c in classes)
        missing = [c for _, c in layout if c is not None and c not in classes]
        if missing:
            wanted = [c for _, c in layout if c is not None]
            raise UsageError(
                f"the {self.name} submission needs the classes {wanted}; the checkpoint has {classes}"
            )
        probs = np.clip(np.asarray(probs, dtype=np.float64).reshape(len(keys), len(classes)), 0.0, 1.0)
        columns = {
            column: probs[:, classes.index(c)] if c is not None else np.zeros(len(keys))
            for column, c in layout
        }
        df = pd.DataFrame({self.id_column: list(keys), **columns})
        return df.sort_values(self.id_column, kind="stable").reset_index(drop=True)

    def truth_frame(self, keys, labels, classes):
        """Ground truth in the layout of `submission_frame` (one-hot columns)."""
        onehot = np.eye(len(classes))[np.asarray(labels, dtype=np.int64)]
        return self.submission_frame(keys, onehot, classes)


def _multiclass(name: str, classes: tuple[str, ...], extra: tuple[tuple[str, None], ...] = ()) -> Task:
    """ISIC 2018/2019: balanced multi-class accuracy; `auc_melanoma` is the MEL AUC under the name the
    other tasks use, so runs of different tasks compare on it."""
    return Task(
        name,
        classes,
        monitor="balanced_accuracy",
        columns=("balanced_accuracy", "auc_macro", "auc_melanoma", "accuracy"),
        composites={"auc_melanoma": ("MEL",)},
        id_column="image",
        submission=(*((c, c) for c in classes), *extra),
        description=f"{len(classes)} diagnostic classes; balanced multi-class accuracy",
    )


TASKS: dict[str, Task] = {
    "isic2017": Task(
        "isic2017",
        ISIC2017_CLASSES,
        monitor="isic2017_score",
        columns=("auc_melanoma", "auc_seborrheic_keratosis", "isic2017_score", "balanced_accuracy"),
        composites={"isic2017_score": ISIC2017_SCORED},
        id_column="image_id",
        submission=tuple((c, c) for c in ISIC2017_SCORED),
        description="nevus / melanoma / seborrheic keratosis; mean of the melanoma and SK AUCs",
    ),
    "isic2018": _multiclass("isic2018", ISIC2018_CLASSES),
    "isic2019": _multiclass("isic2019", ISIC2019_CLASSES, ((ISIC2019_UNKNOWN, None),)),
    "isic2020": Task(
        "isic2020",
        None,
        monitor="auc_melanoma",
        columns=("auc_melanoma", "auc_sens_80_melanoma", "ap_melanoma", "balanced_accuracy"),
        id_column="image_name",
        submission=(("target", MELANOMA),),
        required=(MELANOMA,),
        stratify_on=MELANOMA,
        description="melanoma vs the rest (or diagnosis classes scored by melanoma); melanoma AUC",
    ),
    "custom": Task(
        "custom",
        None,
        monitor="auc_macro",
        columns=("auc_macro", "balanced_accuracy", "accuracy"),
        description="any class list; macro AUC",
    ),
}


def same_diagnosis(a: str, b: str) -> bool:
    """Whether two class names can label one image (the same image in two datasets): equal, or of one
    `DIAGNOSIS_FAMILY`, or one of them says less (`unknown`; `benign` against anything but melanoma)."""
    family_a, family_b = DIAGNOSIS_FAMILY.get(a, a), DIAGNOSIS_FAMILY.get(b, b)
    if family_a == family_b or "unknown" in (a, b):
        return True
    if "benign" in (a, b):
        return MELANOMA not in (family_a, family_b)
    return False


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def detect(classes) -> Task:
    """The task whose fixed class list this is (the ISIC 2020 binary pair included), else `custom`."""
    classes = tuple(classes)
    if classes == ISIC2020_CLASSES:
        return TASKS["isic2020"]
    return next((t for t in TASKS.values() if t.classes == classes), TASKS["custom"])


def for_manifest(manifest: dict) -> Task:
    return get_task(manifest["task"]) if manifest.get("task") else detect(manifest["classes"])
