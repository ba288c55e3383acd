"""A PNG grid to eyeball an augmentation preset before training with it.

Each row is one image from the shards: the eval-mode view (what validation sees), then N augmented
draws of it. Reproducible with --seed.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import yaml

from lesionkit.atomic import write_bytes
from lesionkit.errors import UsageError

GAP, TITLE_H = 4, 26  # pixels between cells; title band (two lines of PIL's default font) above each


def parse_sets(items: list[str]) -> dict[str, dict]:
    """`["elastic.p=1", "color.hue=0.1"]` -> `{"elastic": {"p": 1}, "color": {"hue": 0.1}}` (YAML values)."""
    overrides: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        op, dot, param = key.partition(".")
        if not (sep and dot and op and param):
            raise UsageError(f"--set {item!r}: expected OP.PARAM=VALUE, e.g. elastic.p=0.5")
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
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    write_bytes(out, buf.getvalue())
    return grid.size
