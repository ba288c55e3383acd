"""The in-process Python API: `lesionkit.load(CHECKPOINT)` -> a `Model` whose `predict` gives per-class
probabilities for image files, folders, PIL images or uint8 arrays.

It is a thin layer over `inference` (checkpoint loading, the checkpoint's own preprocessing, TTA views,
temperature) and `predict.load_image` (the raw-image path of packing), so a probability from the API
is the one `evaluate` and `predict` report for the same image.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from lesionkit import metafeatures
from lesionkit.errors import UsageError
from lesionkit.evaluate import task_of
from lesionkit.inference import build_preprocess, load_checkpoint, predict_probs
from lesionkit.ingest import name_some

log = logging.getLogger(__name__)


class Model:
    """A loaded checkpoint: `classes`, `image_size`, `temperature`, `task` and `predict`."""

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu", temperature=None):
        if temperature is not None and temperature <= 0:
            raise UsageError(f"temperature must be > 0, got {temperature}")
        self.checkpoint, self.device = Path(checkpoint), torch.device(device)
        self.module, self.info, saved = load_checkpoint(self.checkpoint, self.device)
        self.temperature = float(temperature or saved)
        self.classes: list[str] = list(self.info["classes"])
        self.image_size: int = int(self.info["image_size"])
        self.task = task_of(self.info)
        self.preprocess = build_preprocess(self.info, self.device)
        self.meta = metafeatures.MetaSpec.from_info(self.info)  # None: an image-only model

    def __repr__(self) -> str:
        return f"lesionkit.Model({self.info['model']}, classes={self.classes}, checkpoint={self.checkpoint})"

    def predict_batches(self, batches: Iterable, tta: str = "none"):
        """(keys, labels, probs [N, C]) for an iterable of `data.Batch` (shards or raw images)."""
        return predict_probs(self.module, batches, self.device, self.preprocess, tta, self.temperature)

    def features(self, keys: list[str], metadata) -> dict[str, list[float]] | None:
        """id -> this model's metadata features, from `metadata` (id -> {age, sex, site}, e.g. from
        `metafeatures.read_csv`); None for an image-only model. A model that takes metadata needs a row for
        every image, and an image-only model takes none."""
        if self.meta is None:
            if metadata is not None:
                raise UsageError(
                    f"checkpoint {self.checkpoint} was trained on images only; it takes no metadata"
                )
            return None
        if metadata is None:
            raise UsageError(
                f"checkpoint {self.checkpoint} was trained with metadata ({','.join(self.meta.fields)}): "
                "give it per image (--metadata CSV)"
            )
        lacking = [k for k in keys if k not in metadata]
        if lacking:
            raise UsageError(f"no metadata for {len(lacking)} image(s): {name_some(lacking)}")
        odd = sorted({v for k in keys for v in self.meta.unknown(metadata[k])})
        if odd:
            log.warning("metadata values outside the model's vocabulary, read as missing: %s", name_some(odd))
        return {k: self.meta.encode(metadata[k]) for k in keys}

    def read(self, items: list[tuple[str, object]], batch_size=32, workers=0, metadata=None):
        """Decoded `Batch`es of (id, path or file object) items, streamed; after the last one, every
        unreadable file is named in one UsageError, so no result is used when any file is bad.
        `metadata`: id -> {age, sex, site}, or a CSV of them, for a model trained with metadata (see
        `features`)."""
        from lesionkit.predict import image_batches

        if not items:
            raise UsageError("no images to predict")
        if batch_size < 1 or workers < 0:
            raise UsageError("batch size must be >= 1 and workers >= 0")
        if isinstance(metadata, (str, Path)) and self.meta is not None:  # the release's metadata CSV
            metadata = metafeatures.read_csv(metadata, self.meta)
        features = self.features([k for k, _ in items], metadata)
        errors: list[str] = []
        yield from image_batches(items, self.image_size, batch_size, workers, errors, features)
        if errors:
            shown = "\n  ".join(errors[:10]) + (
                f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
            )
            raise UsageError(f"{len(errors)} file(s) are not readable images; nothing predicted:\n  {shown}")

    def predict_items(
        self, items: list[tuple[str, object]], tta="none", batch_size=32, workers=0, metadata=None
    ):
        """(keys, probs [N, C]) of (id, path or file object) items (see `read`)."""
        keys, _, probs = self.predict_batches(self.read(items, batch_size, workers, metadata), tta)
        return keys, probs

    def predict(self, images, metadata=None, tta: str = "none", batch_size: int = 32):
        """Probabilities per class: a dict {class: p} for one image, a DataFrame (one row per image, indexed
        by id: the file stem, or the position for in-memory images) for several or a folder.

        `images`: a path (file or folder), a PIL image, a uint8 HxWx3 array or [3, H, W] tensor, a list of
        them, or a [N, H, W, 3] array / [N, 3, H, W] tensor.
        `metadata`, for a checkpoint trained with metadata: a CSV path (the release's metadata file works),
        a mapping id -> {age, sex, site}, or for one image just its {age, sex, site}; a missing value is
        None (the model was trained with missing values as their own category).
        """
        single, items = image_items(images)
        if single and isinstance(metadata, dict) and set(metadata) <= set(metafeatures.FIELDS):
            metadata = {items[0][0]: metadata}
        keys, probs = self.predict_items(items, tta, batch_size, metadata=metadata)
        if single:
            return {c: float(p) for c, p in zip(self.classes, probs[0])}
        return pd.DataFrame(probs, index=pd.Index(keys, name="image_id"), columns=self.classes)


def load(
    checkpoint: str | Path, device: str | torch.device = "cpu", temperature: float | None = None
) -> Model:
    """Load a checkpoint folder (e.g. `runs/NAME/best`) for prediction; `temperature` overrides the
    checkpoint's `temperature.json`."""
    return Model(checkpoint, device, temperature)


def _in_memory(image, i: int) -> tuple[str, io.BytesIO]:
    """A PIL image or uint8 array -> a lossless PNG file object, so it takes the raw-file path of packing."""
    if isinstance(image, torch.Tensor):  # torch's layout: uint8 [3, H, W]
        image = image.cpu().permute(1, 2, 0).numpy() if image.ndim == 3 else image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise UsageError(f"image {i}: arrays must be uint8 H x W x 3, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    buf.seek(0)
    return str(i), buf


def image_items(images) -> tuple[bool, list[tuple[str, object]]]:
    """(one image given?, [(id, path or file object)])."""
    from lesionkit.predict import list_images

    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.is_dir():
            return False, list_images(path)
        return True, [_path_item(path)]
    if isinstance(images, Image.Image) or (
        isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim < 4
    ):
        return True, [_in_memory(images, 0)]
    items = []
    for i, image in enumerate(images):
        if isinstance(image, (str, Path)) and Path(image).is_dir():
            items += list_images(Path(image))
        else:
            items.append(_path_item(Path(image)) if isinstance(image, (str, Path)) else _in_memory(image, i))
    ids = [k for k, _ in items]
    if len(set(ids)) != len(ids):  # two files of one stem in different folders: keep them apart
        items = [(str(s) if isinstance(s, Path) else k, s) for k, s in items]
    return False, items


def _path_item(path: Path) -> tuple[str, Path]:
    if not path.is_file():
        raise UsageError(f"image not found: {path}")
    return path.stem, path
