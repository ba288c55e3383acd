"""Ensembles of checkpoints: the mean of their probabilities, each member with its own preprocessing.

A member is a loaded checkpoint (`api.Model`: its image size, normalisation, colour constancy and
temperature from its own files), scored exactly as `evaluate` scores it (`evaluate.score`, the same TTA
for all), so an ensemble's probabilities are the mean of the members' `evaluate` probabilities. A
checkpoint listed twice counts twice (a weight), and is loaded and scored once.

Greedy selection is Caruana et al.'s forward selection (2004) *with replacement*: start from the best
single member, add at each step the member (one already in, too) whose addition scores best, stop when
no addition improves the task's score or the ensemble has `max_models` members. Replacement lets a
strong model weigh more without a weight search, and stops the ensemble from having to take weak ones.
Selecting on the data it is then scored on is optimistic (as choosing thresholds there is): select on
validation, then score the chosen list (`members` in metrics.json, repeats included) on the test set.

An ensemble of *recipes* can be scored by cross-validation (`out_of_fold`): CVs of one split, averaged
image by image, predict each image only by models that never trained on it, so the mean of their
out-of-fold predictions is the ensemble's own out-of-fold prediction, paired with each member's. (A fold
ensemble cannot be scored this way: each image has one model that did not see it.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from lesionkit import metrics as M
from lesionkit.errors import UsageError

if TYPE_CHECKING:
    from lesionkit.api import Model

SELECT = ("all", "greedy")


def load_members(checkpoints, device, temperature: float | None = None) -> dict[Path, Model]:
    """{checkpoint: api.Model} of the distinct checkpoints, all trained on one class list (else a
    UsageError naming two that differ)."""
    from lesionkit import api

    models: dict[Path, Model] = {}
    for ckpt in map(Path, checkpoints):
        if ckpt.resolve() not in {p.resolve() for p in models}:
            models[ckpt] = api.load(ckpt, device, temperature)
    first, *rest = models.items()
    for ckpt, model in rest:
        if model.classes != first[1].classes:
            raise UsageError(
                f"checkpoint {ckpt} was trained on classes {model.classes} but {first[0]} on "
                f"{first[1].classes}: ensemble checkpoints of one class list"
            )
    return models


def members_of(checkpoints, models: dict[Path, Model]) -> list[int]:
    """The index into `models` of each listed checkpoint (repeats kept: they are weights)."""
    resolved = [p.resolve() for p in models]
    return [resolved.index(Path(c).resolve()) for c in checkpoints]


def score_members(accelerator, models: dict[Path, Model], data, tta, batch_size, workers, folds, fetch):
    """(keys, labels, probs [M, N, C]): each member's `evaluate` probabilities (softmax(logits / its
    temperature), mean over the TTA views) on the same samples."""
    from lesionkit.evaluate import score

    probs = []
    for ckpt, model in models.items():
        keys, labels, logits = score(
            accelerator, model.module, model.info, data, ckpt, tta, batch_size, workers, model.preprocess,
            folds, fetch,
        )  # fmt: skip
        probs.append(M.softmax_views(logits, model.temperature))
    return keys, labels, np.stack(probs)


def greedy(labels, probs, classes, task, max_models: int) -> tuple[list[int], list[float]]:
    """(chosen member indices with repeats, the ensemble's score after each step): Caruana's forward
    selection with replacement over `probs` [M, N, C] by the task's score (higher is better)."""
    score_fn = M.bootstrap_score(task.score, classes, task.composites)
    whole = np.arange(len(labels))[None]

    def score(p) -> float:
        value = float(score_fn(labels, p, whole)[0])
        return value if np.isfinite(value) else -np.inf

    chosen, total, steps = [], np.zeros_like(probs[0]), []
    while len(chosen) < max_models:
        gains = [score((total + p) / (len(chosen) + 1)) for p in probs]
        best = int(np.argmax(gains))
        if steps and gains[best] <= steps[-1]:
            break
        chosen.append(best)
        total += probs[best]
        steps.append(gains[best])
    return chosen, steps


def average(probs, members: list[int]) -> np.ndarray:
    """The ensemble's probabilities: the mean over `members` (indices into `probs` [M, N, C], repeats
    weigh)."""
    return np.asarray(probs)[members].mean(axis=0)


OOF = "oof_predictions.csv"  # a finished `lesionkit cv` folder's pooled out-of-fold predictions
NOT_CLASSES = ("image_id", "label", "label_name", "fold")


class OutOfFold(NamedTuple):
    task: str
    classes: list[str]
    keys: list[str]
    labels: np.ndarray
    probs: np.ndarray  # [M, N, C]
    folds: np.ndarray


def out_of_fold(cvs) -> OutOfFold:
    """The CVs' out-of-fold predictions on the images all of them scored, in one order. A UsageError
    naming the CV unless every CV is a finished one of the same task and classes that held out each shared
    image in the same fold with the same label (one split: only then is the mean still out of fold)."""
    frames, task = [], None
    for cv in map(Path, cvs):
        if not (cv / "cv.json").is_file() or not (cv / OOF).is_file():
            raise UsageError(f"{cv}: not a finished cross-validation folder (no cv.json and {OOF})")
        name = json.loads((cv / "cv.json").read_text())["task"]
        df = pd.read_csv(cv / OOF, dtype={"image_id": str}).set_index("image_id")
        classes = [c for c in df.columns if c not in NOT_CLASSES]
        if frames and (name, classes) != (task, frames[0][2]):
            raise UsageError(
                f"{cv} is a {name} CV on classes {classes} but {frames[0][0]} a {task} CV on "
                f"{frames[0][2]}: ensemble CVs of one task"
            )
        task = name
        frames.append((cv, df, classes))
    first, df0, classes = frames[0]
    common = sorted(set.intersection(*(set(df.index) for _, df, _ in frames)))
    if not common:
        raise UsageError(f"{frames[1][0]} scored none of the images {first} scored: ensemble CVs of one data")
    for cv, df, _ in frames[1:]:
        moved = int(
            (df.loc[common, ["fold", "label"]] != df0.loc[common, ["fold", "label"]]).any(axis=1).sum()
        )
        if moved:
            raise UsageError(
                f"{cv}: {moved} of the {len(common)} images it shares with {first} were held out by another "
                "fold or carry another label: ensemble CVs of one split (the same `lesionkit split`)"
            )
    return OutOfFold(
        task,
        classes,
        common,
        df0.loc[common, "label"].to_numpy(),
        np.stack([df.loc[common, classes].to_numpy() for _, df, _ in frames]),
        df0.loc[common, "fold"].to_numpy(),
    )
