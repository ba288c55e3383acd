"""`lesionkit predict`: probabilities for raw images (folders or files) or packed shards -> a submission
CSV, through the Python API (`lesionkit.api`), so the command and `lesionkit.load(...).predict` agree.

Formats (default: the format of the checkpoint's task):
- `isic2017`: ISIC 2017 Part 3, `image_id,melanoma,seborrheic_keratosis`, one row per image, sorted by id.
- `isic2018`: `image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`; `isic2019`: `image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK`
  (UNK 0: a closed-set model never predicts "none of these").
- `isic2020`: `image_name,target`, target = the melanoma probability (also of a model trained on the
  diagnosis classes).
- `isic-scoring`: the official scorer's input (`isic-challenge-scoring classification TRUTH PRED`):
  an `image` column and one probability column per class. The scorer takes the category names from
  the ground-truth header and demands exactly the same columns in the prediction, so lesionkit writes
  the checkpoint's class names; `--truth-out` writes the matching one-hot ground truth for labelled
  shards.
Nothing is written unless every image was scored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lesionkit import api, metafeatures, tasks
from lesionkit.atomic import write_text
from lesionkit.config import TTA_MODES
from lesionkit.data import eval_loader
from lesionkit.ensemble import average, load_members, members_of
from lesionkit.errors import UsageError
from lesionkit.inference import check_classes
from lesionkit.manifest import dataset_info

# format -> the task whose submission layout it is (`isic-scoring`: an image column, one column per class)
FORMATS = {name: name for name in tasks.TASKS if name != "custom"} | {"isic-scoring": "custom"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        metavar="CKPT",
        help="checkpoint folder, e.g. runs/NAME/best; several: the mean of their probabilities (an "
        "ensemble, each with its own preprocessing; one listed twice weighs twice)",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="raw .jpg/.jpeg/.png images (any size): folder(s) and/or image files",
    )
    src.add_argument("--data", nargs="+", metavar="DIR", help="shard folder(s) written by `lesionkit pack`")
    parser.add_argument(
        "--metadata",
        metavar="CSV",
        help="with --images, for a checkpoint trained with metadata: age/sex/site per image id (the "
        "release's metadata CSV works as is; a missing value is its own category); shards carry their own",
    )
    parser.add_argument("--out", required=True, help="submission CSV to write")
    parser.add_argument(
        "--format",
        default=None,
        choices=FORMATS,
        help="submission layout (default: the checkpoint's task's; isic-scoring for a custom task)",
    )
    parser.add_argument(
        "--truth-out",
        metavar="CSV",
        help="with --data: also write the labels as ground truth in the same format",
    )
    parser.add_argument("--tta", default="none", choices=TTA_MODES, help="test-time augmentation")
    parser.add_argument(
        "--temperature",
        type=float,
        help="softmax temperature (default: the checkpoint's temperature.json, else 1)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    if args.metadata and not args.images:
        raise UsageError("--metadata is for raw --images; shards carry their own metadata")
    if args.truth_out and not args.data:
        raise UsageError("--truth-out needs labelled shards (--data)")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")
    if args.temperature is not None and args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    models = load_members(args.checkpoint, args.device, args.temperature)
    takes = [m.meta for m in models.values() if m.meta is not None]
    if args.metadata and not takes:
        raise UsageError(f"--metadata {args.metadata}: the checkpoint(s) were trained on images only")
    fields = ",".join(f for spec in takes for f in spec.fields)  # every member's, for the CSV check
    metadata = metafeatures.read_csv(args.metadata, metafeatures.parse(fields)) if args.metadata else None
    model = next(iter(models.values()))  # all share its classes, so its task and format
    info, classes = model.info, model.classes
    fmt = args.format or next((f for f, name in FORMATS.items() if name == model.task.name), "isic-scoring")
    layout = tasks.get_task(FORMATS[fmt])
    if args.data:
        data_classes, _, num_samples = dataset_info(args.data)
        check_classes(info, data_classes, args.checkpoint[0], " ".join(args.data))
    layout.submission_frame([], np.zeros((0, len(classes))), classes)  # format check before any work
    scored = [_predict(member, args, metadata) for member in models.values()]
    keys, labels = scored[0][:2]
    probs = average([p for _, _, p in scored], members_of(args.checkpoint, models))
    if args.data and len(keys) != num_samples:
        raise UsageError(f"scored {len(keys)} samples but the manifests list {num_samples}")
    if not keys:
        raise UsageError("no images to predict")
    sub = layout.submission_frame(keys, probs, classes)
    truth = layout.truth_frame(keys, labels, classes) if args.truth_out else None
    write_text(Path(args.out), sub.to_csv(index=False))
    if truth is not None:
        write_text(Path(args.truth_out), truth.to_csv(index=False))
    print(
        f"lesionkit predict: {len(sub)} images, format {fmt}, tta={args.tta} -> {args.out}"
        + (f" (ground truth: {args.truth_out})" if truth is not None else "")
    )
    return 0


def _predict(model, args: argparse.Namespace, metadata: dict | None):
    """(keys, labels or None, probs) of one checkpoint, sorted by key (the shard reader's order can vary
    between runs, and ensemble members are averaged image by image)."""
    if args.images:
        _, items = api.image_items(args.images)
        metadata = metadata if model.meta is not None else None  # image-only members of an ensemble
        keys, probs = model.predict_items(items, args.tta, args.batch_size, args.workers, metadata)
        labels = None
    else:
        if model.meta is not None:
            metafeatures.check_folders(model.meta, args.data, flag=f"{model.checkpoint} takes")
        batches = eval_loader(
            args.data,
            image_size=model.image_size,
            batch_size=args.batch_size,
            workers=args.workers,
            rank=0,
            world_size=1,
            features=model.meta,
        )
        keys, labels, probs = model.predict_batches(batches, args.tta)
    order = np.argsort(keys, kind="stable")
    return [keys[i] for i in order], None if labels is None else labels[order], probs[order]
