"""Run a model over an evaluation reader and collect per-sample logits by id: shared by the trainer's
per-epoch validation and by `lesionkit evaluate` / `predict`, so both score images the same way.

Test-time augmentation views are taken after the deterministic preprocessing; all views of a batch go
through the model as one forward pass.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from lesionkit.config import TTA_MODES


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a square batch [B,C,S,S] that TTA averages over: `flips` (identity, horizontal,
    vertical, both) or `d4` (the 8 rotations/reflections; dermoscopy has no canonical orientation)."""
    if mode == "none":
        return [x]
    if mode == "flips":
        return [x, x.flip(-1), x.flip(-2), x.flip(-2, -1)]
    if mode == "d4":
        rots = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
        return rots + [r.flip(-1) for r in rots]
    raise ValueError(f"unknown --tta {mode!r}; choose one of: {', '.join(TTA_MODES)}")


@torch.no_grad()
def predict_logits(model, loader, device, preprocess, tta: str = "none",
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """(keys, labels int64 [N], logits float32 [N, V, C]) for every batch of `loader` on this process.

    `preprocess` is the deterministic eval transform (resize + normalise, `build_augment("none")`).
    """
    model.eval()
    keys, labels, logits = [], [], []
    for images, y, k in loader:
        x = preprocess(images.to(device, non_blocking=True))
        views = tta_views(x, tta)
        with autocast():
            out = model(torch.cat(views)).float()
        logits.append(out.view(len(views), x.shape[0], -1).transpose(0, 1).cpu().numpy())
        labels.append(np.asarray(y, dtype=np.int64))
        keys += list(k)
    if not keys:
        return [], np.zeros(0, np.int64), np.zeros((0, 0, 0), np.float32)
    return keys, np.concatenate(labels), np.concatenate(logits)


def gather_predictions(accelerator, keys, labels, logits):
    """All ranks' (keys, labels, logits), sorted by key, on every rank; fails loudly if the reader scored a
    sample twice (a broken exactly-once reader would silently bias every metric)."""
    from accelerate.utils import gather_object

    records = [(k, int(y), v) for k, y, v in zip(keys, labels, logits)]
    if accelerator.num_processes > 1:
        records = gather_object(records)
    records.sort(key=lambda r: r[0])
    ids = [r[0] for r in records]
    dupes = sorted(k for k, n in Counter(ids).items() if n > 1)
    if dupes:
        raise RuntimeError(f"the evaluation reader returned samples twice (e.g. {dupes[:3]})")
    if not records:
        return [], np.zeros(0, np.int64), np.zeros((0, 1, 0), np.float32)
    return ids, np.array([r[1] for r in records], np.int64), np.stack([r[2] for r in records])
