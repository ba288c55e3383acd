"""`lesionkit preview-aug`: a PNG grid to eyeball an augmentation preset before training with it.

Each row is one image from the shards: the eval-mode view (what validation sees), then N augmented
draws of it. Reproducible with --seed.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import yaml

PROG = "lesionkit preview-aug"
GAP, TITLE_H = 4, 26  # pixels between cells; title band (two lines of PIL's default font) above each


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lesionkit.augment import PRESETS

    parser.add_argument("--data", nargs="+", required=True, metavar="SHARDS", help="shard folder(s) from `pack`")
    parser.add_argument("--preset", default="derm", choices=PRESETS)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--n", type=int, default=4, help="augmented versions per image (columns)")
    parser.add_argument("--rows", type=int, default=4, help="images (rows), the first ones of the shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--color-constancy", action="store_true", help="Shades-of-Gray (p=6) first")
    parser.add_argument("--set", action="append", default=[], metavar="OP.PARAM=VALUE",
                        help="override one op parameter, e.g. --set elastic.p=1 (repeatable)")


def parse_sets(items: list[str]) -> dict[str, dict]:
    """`["elastic.p=1", "color.hue=0.1"]` -> `{"elastic": {"p": 1}, "color": {"hue": 0.1}}` (YAML values)."""
    overrides: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        op, dot, param = key.partition(".")
        if not (sep and dot and op and param):
            raise ValueError(f"--set {item!r}: expected OP.PARAM=VALUE, e.g. elastic.p=0.5")
        overrides.setdefault(op, {})[param] = yaml.safe_load(value)
    return overrides


def render_grid(originals, augmented: list, titles: list[str], out: Path) -> tuple[int, int]:
    """originals [R,3,S,S] and each of `augmented` [R,3,S,S], floats in [0, 1] -> one PNG grid with a title
    above every cell, written atomically; returns its (width, height)."""
    from PIL import Image, ImageDraw

    rows, cols, size = originals.shape[0], 1 + len(augmented), originals.shape[-1]
    cell_w, cell_h = size + GAP, size + TITLE_H + GAP
    grid = Image.new("RGB", (cols * cell_w + GAP, rows * cell_h + GAP), "white")
    draw = ImageDraw.Draw(grid)
    for c, batch in enumerate([originals, *augmented]):
        pixels = (batch.clamp(0, 1) * 255).round().to(dtype=torch.uint8).permute(0, 2, 3, 1).numpy()
        for r in range(rows):
            left, top = GAP + c * cell_w, GAP + r * cell_h
            draw.multiline_text((left, top), titles[r] if c == 0 else f"aug {c}", fill="black", spacing=1)
            grid.paste(Image.fromarray(pixels[r]), (left, top + TITLE_H))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            grid.save(fh, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return grid.size


def run(args: argparse.Namespace) -> int:
    from lesionkit.augment import build_augment
    from lesionkit.data import dataset_info, eval_loader

    if args.n < 1 or args.rows < 1 or args.image_size < 8:
        raise SystemExit(f"{PROG}: error: --n and --rows must be >= 1 and --image-size >= 8")
    try:
        overrides = parse_sets(args.set)
        classes, _, _ = dataset_info(args.data)
        loader = eval_loader(args.data, image_size=args.image_size, batch_size=args.rows, workers=0,
                             rank=0, world_size=1)
        images, labels, keys = next(iter(loader))
        aug = build_augment(args.preset, args.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                            color_constancy=args.color_constancy, seed=args.seed, **overrides)
    except StopIteration:
        raise SystemExit(f"{PROG}: error: no samples in {' '.join(args.data)}") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise SystemExit(f"{PROG}: error: {exc}") from None
    with torch.no_grad():
        originals = aug.eval()(images)
        aug.train()
        augmented = [aug(images) for _ in range(args.n)]
    titles = [f"{key}\n{classes[int(label)]}" for key, label in zip(keys, labels)]
    out = Path(args.out)
    width, height = render_grid(originals, augmented, titles, out)
    print(f"wrote {out} ({width}x{height}: {len(keys)} images, each with {args.n} {args.preset} augmentations)")
    return 0
