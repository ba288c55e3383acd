"""Probabilities for a folder of raw images (any size, any format PIL reads) as a reader of `Batch`es.

Raw images get the preprocessing of packing + evaluation: EXIF-upright, shorter side to the checkpoint's
image size (`pack.encode_image`, JPEG as in the shards), centre crop; then the checkpoint's normalisation
(`inference.build_preprocess`). An unreadable file is reported, not raised, so one pass names them all.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lesionkit.data import Batch
from lesionkit.errors import UsageError
from lesionkit.ingest import IMAGE_SUFFIXES, find_images
from lesionkit.pack import encode_image


class ImageFolder(Dataset):
    """Raw images (paths or binary file objects) -> (uint8 [3,S,S], id, error text ("" when fine))."""

    def __init__(self, items: list[tuple[str, Path]], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, path = self.items[i]
        try:
            return load_image(path, self.size), key, ""
        except UNREADABLE as exc:  # name it, go on
            name = getattr(path, "name", key)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), key, f"{name}: {exc}"


UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(source, size: int) -> torch.Tensor:
    """One raw image (a path or a binary file object) -> uint8 [3, size, size]: what packing stores
    (`pack.encode_image`) centre-cropped as the evaluation reader crops it. Raises `UNREADABLE`."""
    jpeg, _, _ = encode_image(source, size, quality=95)
    with Image.open(io.BytesIO(jpeg)) as im:
        image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top : top + size, left : left + size]


def list_images(folder: Path) -> list[tuple[str, Path]]:
    """(id, path) of every image in `folder`, sorted by id."""
    found = find_images(folder)
    if not found:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return sorted(found.items())


def image_batches(
    items: list[tuple[str, Path]],
    size: int,
    batch_size: int,
    workers: int,
    errors: list[str],
    features: dict[str, list[float]] | None = None,
):
    """`Batch`es (label -1) of raw images, with their metadata features when `features` (id -> vector) is
    given; unreadable files are appended to `errors`."""
    loader = DataLoader(ImageFolder(items, size), batch_size=batch_size, num_workers=min(workers, len(items)))
    for images, keys, errs in loader:
        errors += [e for e in errs if e]
        meta = None if features is None else torch.tensor([features[k] for k in keys], dtype=torch.float32)
        yield Batch(images, torch.full((len(keys),), -1), list(keys), meta)
