"""Everything that turns a checkpoint and images into probabilities, shared by the trainer's per-epoch
validation, `evaluate`, `predict` and the benchmarks, so all of them score images the same way.

- `load_checkpoint`: the model, its `info` (classes, task, image size, normalisation) and temperature;
- `build_preprocess`: the deterministic eval transform of training (resize, colour constancy, normalise);
- `predict_logits` / `predict_probs`: run a reader's batches, with test-time augmentation views taken
  after preprocessing and pushed through the model as one forward pass;
- `gather_predictions`: every rank's predictions by sample id, checked for duplicates.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lesionkit import metrics as M
from lesionkit.config import TTA_MODES, load_config
from lesionkit.data import pixels
from lesionkit.errors import UsageError
from lesionkit.metafeatures import MetaSpec
from lesionkit.models import create_model, forward

TEMPERATURE_FILE = "temperature.json"
INFERENCE_FILES = ("model.pt", "info.json", "config.yaml")


def load_checkpoint(path: str | Path, device="cpu"):
    """(model in eval mode on `device`, info, temperature) from a checkpoint folder; a folder that is not
    a loadable lesionkit checkpoint is a UsageError naming it."""
    from lesionkit.checkpoint import CheckpointError, safe_load

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"checkpoint folder not found: {path}")
    missing = [f for f in INFERENCE_FILES if not (path / f).is_file()]
    if missing:
        raise UsageError(f"{path} is not a lesionkit checkpoint (missing {', '.join(missing)})")
    try:
        info = json.loads((path / "info.json").read_text())
        cfg = load_config(path / "config.yaml")
        spec = MetaSpec.from_info(info)
        model = create_model(
            cfg.model, num_classes=len(info["classes"]), meta_features=spec.size if spec else 0
        )
        model.load_state_dict(safe_load(path / "model.pt"))
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"{path}: cannot load the model from this checkpoint ({first})") from None
    return model.to(device).eval(), info, read_temperature(path)


def read_temperature(ckpt: str | Path) -> float:
    path = Path(ckpt) / TEMPERATURE_FILE
    return float(json.loads(path.read_text())["temperature"]) if path.is_file() else 1.0


def check_classes(info: dict, data_classes: list[str], ckpt, data) -> None:
    if list(info["classes"]) != list(data_classes):
        raise UsageError(
            f"checkpoint {ckpt} was trained on classes {info['classes']} but {data} has "
            f"{data_classes}; evaluate it on data packed with the same class list"
        )


def build_preprocess(info: dict, device):
    """The deterministic eval transform of training (the same module, so train and eval match)."""
    from lesionkit.augment import build_augment

    return (
        build_augment(
            "none",
            info["image_size"],
            info["mean"],
            info["std"],
            color_constancy=bool(info.get("color_constancy", False)),
        )
        .eval()
        .to(device)
    )


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
    raise UsageError(f"unknown --tta {mode!r}; choose one of: {', '.join(TTA_MODES)}")


@torch.no_grad()
def predict_logits(
    model,
    loader,
    device,
    preprocess,
    tta: str = "none",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
):
    """(keys, labels int64 [N], logits float32 [N, V, C]) for every batch of `loader` on this process."""
    model.eval()
    keys, labels, logits = [], [], []
    for batch in loader:
        x = preprocess(pixels(batch, device))
        views = tta_views(x, tta)
        meta = None if batch.meta is None else batch.meta.to(device).repeat(len(views), 1)
        with autocast():
            out = forward(model, torch.cat(views), meta).float()
        logits.append(out.view(len(views), x.shape[0], -1).transpose(0, 1).cpu().numpy())
        labels.append(np.asarray(batch.labels, dtype=np.int64))
        keys += list(batch.keys)
    if not keys:
        return [], np.zeros(0, np.int64), np.zeros((0, 0, 0), np.float32)
    return keys, np.concatenate(labels), np.concatenate(logits)


def predict_probs(model, loader, device, preprocess, tta: str = "none", temperature: float = 1.0):
    """(keys, labels, probs [N, C]): softmax(logits / T) averaged over the TTA views."""
    keys, labels, logits = predict_logits(model, loader, device, preprocess, tta)
    return keys, labels, M.softmax_views(logits, temperature)


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
