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
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

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
