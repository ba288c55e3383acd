"""`lesionkit preview-aug`: a PNG grid to eyeball an augmentation preset before training with it
(`lesionkit.preview`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lesionkit.augment import PRESETS, build_augment
from lesionkit.data import eval_loader
from lesionkit.errors import UsageError
from lesionkit.manifest import dataset_info
from lesionkit.preview import parse_sets, render_grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", nargs="+", required=True, metavar="SHARDS", help="shard folder(s) from `pack`"
    )
    parser.add_argument("--preset", default="derm", choices=PRESETS)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--n", type=int, default=4, help="augmented versions per image (columns)")
    parser.add_argument("--rows", type=int, default=4, help="images (rows), the first ones of the shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--color-constancy", action="store_true", help="Shades-of-Gray (p=6) first")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OP.PARAM=VALUE",
        help="override one op parameter, e.g. --set elastic.p=1 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    if args.n < 1 or args.rows < 1 or args.image_size < 8:
        raise UsageError("--n and --rows must be >= 1 and --image-size >= 8")
    overrides = parse_sets(args.set)
    classes, _, _ = dataset_info(args.data)
    loader = eval_loader(
        args.data, image_size=args.image_size, batch_size=args.rows, workers=0, rank=0, world_size=1
    )
    images, labels, keys, _ = next(iter(loader), (None,) * 4)
    if images is None:
        raise UsageError(f"no samples in {' '.join(args.data)}")
    try:
        aug = build_augment(
            args.preset,
            args.image_size,
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
            color_constancy=args.color_constancy,
            seed=args.seed,
            **overrides,
        )
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    with torch.no_grad():
        originals = aug.eval()(images)
        aug.train()
        augmented = [aug(images) for _ in range(args.n)]
    titles = [f"{key}\n{classes[int(label)]}" for key, label in zip(keys, labels)]
    out = Path(args.out)
    width, height = render_grid(originals, augmented, titles, out)
    print(
        f"wrote {out} ({width}x{height}: {len(keys)} images, each with {args.n} {args.preset} augmentations)"
    )
    return 0
