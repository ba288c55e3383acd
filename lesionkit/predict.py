"""`lesionkit predict`: probabilities for a folder of raw images or packed shards -> a submission CSV.

Formats:
- `isic2017` (default): ISIC 2017 Part 3, `image_id,melanoma,seborrheic_keratosis`, one row per
  image, sorted by id.
- `isic-scoring`: the official scorer's input (`isic-challenge-scoring classification TRUTH PRED`):
  an `image` column and one probability column per class. The scorer takes the category names from
  the ground-truth header and demands exactly the same columns in the prediction, so lesionkit writes
  the checkpoint's class names; `--truth-out` writes the matching one-hot ground truth for labelled
  shards.

Raw images of any size get the preprocessing of packing + evaluation: EXIF-upright, shorter side to
the checkpoint's image size (`pack.encode_image`, JPEG as in the shards), centre crop, normalise.
Nothing is written unless every image was scored.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lesionkit.evaluate import (
    TTA_MODES,
    EvaluateError,
    build_preprocess,
    check_classes,
    exit_on_error,
    load_checkpoint,
    predict_probs,
)

FORMATS = ("isic2017", "isic-scoring")
ISIC2017_COLUMNS = ["melanoma", "seborrheic_keratosis"]


class _ImageFolder(Dataset):
    """Raw images -> (uint8 [3,S,S], -1, id); an unreadable file yields an error string, not an exception,
    so one pass reports every bad file."""

    def __init__(self, items: list[tuple[str, Path]], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from lesionkit.pack import encode_image

        key, path = self.items[i]
        try:
            jpeg, _, _ = encode_image(path, self.size, quality=95)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # name it, go on
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), key, f"{path.name}: {exc}"
        with Image.open(io.BytesIO(jpeg)) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        h, w = image.shape[-2:]
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return image[:, top:top + self.size, left:left + self.size], key, ""


def _image_batches(loader, errors: list[str]):
    for images, keys, errs in loader:
        errors += [e for e in errs if e]
        yield images, torch.full((len(keys),), -1), list(keys)


def _list_images(folder: Path) -> list[tuple[str, Path]]:
    from lesionkit.ingest import IMAGE_SUFFIXES, IngestError, find_images

    try:
        found = find_images(folder)
    except IngestError as exc:
        raise EvaluateError(str(exc)) from None
    if not found:
        raise EvaluateError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return sorted(found.items())


def submission_frame(keys, probs, classes, fmt: str) -> pd.DataFrame:
    """Rows sorted by id; probabilities clipped to [0, 1] (softmax output, guarded against rounding)."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    if fmt == "isic2017":
        missing = [c for c in ISIC2017_COLUMNS if c not in classes]
        if missing:
            raise EvaluateError(f"--format isic2017 needs the classes {ISIC2017_COLUMNS}; the checkpoint has "
                                f"{classes} (use --format isic-scoring)")
        df = pd.DataFrame({"image_id": keys, **{c: probs[:, classes.index(c)] for c in ISIC2017_COLUMNS}})
    else:
        df = pd.DataFrame({"image": keys, **{c: probs[:, i] for i, c in enumerate(classes)}})
    return df.sort_values(df.columns[0], kind="stable").reset_index(drop=True)


def truth_frame(keys, labels, classes, fmt: str) -> pd.DataFrame:
    """Ground truth matching `submission_frame` (isic2017: the official GT CSV layout; isic-scoring:
    one-hot columns per class, which the scorer reads as its category list)."""
    onehot = np.eye(len(classes))[np.asarray(labels)]
    cols = ISIC2017_COLUMNS if fmt == "isic2017" else classes
    df = pd.DataFrame({"image_id" if fmt == "isic2017" else "image": keys,
                       **{c: onehot[:, classes.index(c)] for c in cols}})
    return df.sort_values(df.columns[0], kind="stable").reset_index(drop=True)


def write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/NAME/best")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of raw .jpg/.jpeg/.png images (any size)")
    src.add_argument("--data", nargs="+", metavar="DIR", help="shard folder(s) written by `lesionkit pack`")
    parser.add_argument("--out", required=True, help="submission CSV to write")
    parser.add_argument("--format", default="isic2017", choices=FORMATS)
    parser.add_argument("--truth-out", metavar="CSV",
                        help="with --data: also write the labels as ground truth in the same format")
    parser.add_argument("--tta", default="none", choices=TTA_MODES)
    parser.add_argument("--temperature", type=float,
                        help="softmax temperature (default: the checkpoint's temperature.json, else 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    return exit_on_error("predict", lambda: _run(args))


def _run(args) -> int:
    if args.truth_out and not args.data:
        raise EvaluateError("--truth-out needs labelled shards (--data)")
    if args.batch_size < 1 or args.workers < 0:
        raise EvaluateError("--batch-size must be >= 1 and --workers >= 0")
    device = torch.device(args.device)
    model, info, temperature = load_checkpoint(args.checkpoint, device)
    if args.temperature is not None:
        if args.temperature <= 0:
            raise EvaluateError(f"--temperature must be > 0, got {args.temperature}")
        temperature = args.temperature
    classes = list(info["classes"])
    if args.data:
        from lesionkit.data import dataset_info, eval_loader

        try:
            data_classes, _, num_samples = dataset_info(args.data)
        except (FileNotFoundError, ValueError) as exc:
            raise EvaluateError(str(exc)) from None
        check_classes(info, data_classes, args.checkpoint, " ".join(args.data))
    submission_frame([], np.zeros((0, len(classes))), classes, args.format)  # format check before work
    preprocess = build_preprocess(info, device)
    errors: list[str] = []
    if args.images:
        items = _list_images(Path(args.images))
        loader = DataLoader(_ImageFolder(items, info["image_size"]), batch_size=args.batch_size,
                            num_workers=min(args.workers, len(items)))
        batches = _image_batches(loader, errors)
    else:
        batches = eval_loader(args.data, image_size=info["image_size"], batch_size=args.batch_size,
                              workers=args.workers, rank=0, world_size=1)
    keys, labels, probs = predict_probs(model, batches, device, preprocess, args.tta, temperature)
    if errors:
        shown = "\n  ".join(errors[:10]) + (f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else "")
        raise EvaluateError(f"{len(errors)} file(s) in {args.images} are not readable images; nothing written:"
                            f"\n  {shown}")
    if args.data and len(keys) != num_samples:
        raise EvaluateError(f"scored {len(keys)} samples but the manifests list {num_samples}")
    if not keys:
        raise EvaluateError("no images to predict")
    sub = submission_frame(keys, probs, classes, args.format)
    truth = truth_frame(keys, labels, classes, args.format) if args.truth_out else None
    write_csv_atomic(sub, Path(args.out))
    if truth is not None:
        write_csv_atomic(truth, Path(args.truth_out))
    print(f"lesionkit predict: {len(sub)} images, format {args.format}, tta={args.tta} -> {args.out}"
          + (f" (ground truth: {args.truth_out})" if truth is not None else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lesionkit predict", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
