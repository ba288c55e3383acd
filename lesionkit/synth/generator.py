"""Procedural dermoscopy look-alikes in the official ISIC 2017 layout: the default data for demos and tests.

Lesions follow the ABCD criteria (Asymmetry, Border, Colour, Dermoscopic structures):
nevus = small, round, symmetric, one brown, regular network; melanoma = larger, asymmetric, irregular
border, several colours (dark brown, black, blue-grey, red), atypical network and dots; seborrheic
keratosis = waxy light-to-mid brown, sharp "stuck-on" border, cerebriform furrows and milia-like cysts.
`difficulty` (0..1) lets each feature group (shape, colour, structures) come from a random class, so
the classes overlap and a small CNN lands clearly above chance but below a perfect AUC.

Every image has its own generator seeded by SeedSequence([seed, split, index]), so the bytes depend
only on (seed, split, index, parameters) - not on worker count or order.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from threadpoolctl import threadpool_limits

from lesionkit.atomic import staged_dir, write_bytes
from lesionkit.errors import UsageError
from lesionkit.tasks import ISIC2017_CLASSES

CLASSES = ISIC2017_CLASSES
ISIC2017_PRIORS = (0.69, 0.19, 0.12)
SPLITS = (("Training", 0), ("Validation", 1))
POOL_MIN_IMAGES = 64  # below this a process pool costs more than it saves

# Dermoscopic colours (RGB, 0..1).
_DARK_BROWN = (0.36, 0.21, 0.13)
_BLACK = (0.12, 0.09, 0.09)
_BLUE_GREY = (0.42, 0.46, 0.55)
_RED = (0.66, 0.30, 0.30)
_LIGHT_BROWN = (0.62, 0.42, 0.28)
_WHITE_SCAR = (0.86, 0.80, 0.78)


# ---------------------------------------------------------------------------------------------- counts
def class_counts(n: int, priors=ISIC2017_PRIORS) -> list[int]:
    """Largest-remainder rounding of priors*n: counts sum to n exactly, ties go to the earlier class."""
    p = np.asarray(priors, dtype=float)
    quotas = p / p.sum() * n
    counts = np.floor(quotas).astype(int)
    remainders = quotas - counts
    order = sorted(range(len(p)), key=lambda i: (-remainders[i], i))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def split_labels(n: int, priors, seed: int, split: int) -> np.ndarray:
    """Exact class counts, in an order shuffled by (seed, split)."""
    labels = np.repeat(np.arange(len(priors)), class_counts(n, priors))
    np.random.default_rng(np.random.SeedSequence([seed, 100 + split])).shuffle(labels)
    return labels


# ---------------------------------------------------------------------------------------------- fields
@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (y, x), cached per size."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(t, t, indexing="ij")


@functools.lru_cache(maxsize=64)
def _upsampler(size: int, cells: int) -> np.ndarray:
    """[size, cells+2] Gaussian interpolation weights; unit-norm rows give the output unit variance."""
    pixels = (np.arange(size) + 0.5) / size
    centres = (np.arange(cells + 2) - 0.5) / cells  # one cell of margin on each side: no edge fade
    w = np.exp(-0.5 * ((pixels[:, None] - centres[None, :]) * cells / 0.6) ** 2)
    return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth unit-variance noise, blobs ~size/cells wide: a random grid upsampled by two small matmuls."""
    a = _upsampler(size, cells)
    return a @ rng.standard_normal((cells + 2, cells + 2), dtype=np.float32) @ a.T


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _rgb(c) -> np.ndarray:
    return np.asarray(c, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- skin
def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    """Fair-to-medium skin with uneven illumination, redness, fine grain and faint skin lines."""
    yy, xx = _grid(size)
    tone = rng.uniform(0, 1) ** 1.5  # mostly fair, as in ISIC
    base = _rgb((0.92, 0.76, 0.68)) * (1 - tone) + _rgb((0.74, 0.54, 0.42)) * tone
    base = base * rng.uniform(0.9, 1.05)
    light = 1 + 0.05 * _noise(rng, size, 3)
    redness = np.clip(_noise(rng, size, 4), 0, None) * rng.uniform(0.0, 0.06)
    angle = rng.uniform(0, np.pi)
    across = xx * math.cos(angle) + yy * math.sin(angle)
    lines = np.sin(across * rng.uniform(25, 45) + 2 * _noise(rng, size, 5))
    light += rng.standard_normal((size, size), dtype=np.float32) * 0.02 - 0.04 * np.clip(lines - 0.7, 0, None)
    img = base[None, None, :] * light[..., None]
    img[..., 0] += redness
    img[..., 1] -= 0.5 * redness
    return img


# ---------------------------------------------------------------------------------------------- lesion
# Per class, ranges of: radius, elongation, asymmetry (low harmonics), border irregularity (high harmonics
# + noise), edge width (small = sharply demarcated). Units: half the image side.
_SHAPE_KEYS = ("radius", "elong", "asym", "irregular", "edge")
_SHAPE = {
    0: dict(zip(_SHAPE_KEYS, ((0.22, 0.42), (0.0, 0.15), (0.00, 0.05), (0.00, 0.025), (0.05, 0.12)))),
    1: dict(zip(_SHAPE_KEYS, ((0.36, 0.66), (0.05, 0.40), (0.10, 0.24), (0.05, 0.12), (0.015, 0.08)))),
    2: dict(zip(_SHAPE_KEYS, ((0.30, 0.56), (0.05, 0.35), (0.02, 0.09), (0.01, 0.04), (0.01, 0.025)))),
}


def _shape(rng: np.random.Generator, size: int, cls: int):
    """Lesion mask (soft edge) and depth (1 at the centre, 0 at the border) from a polar radius function."""
    p = _SHAPE[cls]
    yy, xx = _grid(size)
    cy, cx = rng.normal(0, 0.08, 2).tolist()  # Python floats keep the float32 arrays float32
    cos, sin = math.cos(rot := rng.uniform(0, 2 * math.pi)), math.sin(rot)
    u = (xx - cx) * cos + (yy - cy) * sin
    v = (-(xx - cx) * sin + (yy - cy) * cos) * (1 + rng.uniform(*p["elong"]))
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)

    t = np.linspace(-np.pi, np.pi, 512, endpoint=False)
    k_low, k_high = np.arange(1, 4), np.arange(4, 17)
    r = 1 + (rng.uniform(*p["asym"]) * rng.uniform(0.3, 1, 3)) @ np.cos(
        np.outer(k_low, t) + rng.uniform(0, 2 * np.pi, (3, 1))
    )
    irr = rng.uniform(*p["irregular"])
    r += (irr * rng.uniform(0, 1, 13) / k_high**0.5) @ np.cos(
        np.outer(k_high, t) + rng.uniform(0, 2 * np.pi, (13, 1))
    )
    radius = rng.uniform(*p["radius"]) * np.interp(theta, t, r, period=2 * np.pi).astype(np.float32)
    radius = radius * (1 + 0.6 * irr * _noise(rng, size, 9))
    edge = rng.uniform(*p["edge"])
    mask = _smoothstep((radius - rho) / edge + 0.5)
    depth = np.clip(1 - rho / np.maximum(radius, 1e-3), 0, 1)
    return mask, depth, (u, v)


def _palette(rng: np.random.Generator, size: int, cls: int, depth: np.ndarray) -> np.ndarray:
    """Lesion colour field: one brown (nevus), several colour blotches (melanoma), waxy tan (SK)."""
    if cls == 0:
        brown = _rgb(_LIGHT_BROWN) * (1 - (t := rng.uniform(0, 1))) + _rgb(_DARK_BROWN) * t
        shade = 1 - rng.uniform(0.05, 0.25) * depth + 0.04 * _noise(rng, size, 6)
        return brown[None, None, :] * shade[..., None]
    if cls == 1:
        extra = [_BLACK, _BLUE_GREY, _RED, _LIGHT_BROWN, _WHITE_SCAR]
        picks = rng.choice(len(extra), size=rng.integers(2, 5), replace=False, p=[0.3, 0.3, 0.2, 0.15, 0.05])
        colours = np.stack([_rgb(_DARK_BROWN)] + [_rgb(extra[i]) for i in picks])
        weights = np.stack([_noise(rng, size, int(rng.integers(3, 7))) for _ in colours])
        weights = np.exp(rng.uniform(2.5, 5) * (weights - weights.max(axis=0, keepdims=True)))
        weights /= weights.sum(axis=0, keepdims=True)
        return np.einsum("chw,ck->hwk", weights, colours)
    tan = _rgb((0.74, 0.57, 0.38)) * (1 - (t := rng.uniform(0, 1))) + _rgb((0.50, 0.34, 0.22)) * t
    sheen = 1 + 0.08 * _noise(rng, size, 5)
    return tan[None, None, :] * sheen[..., None]


def _dots(
    img: np.ndarray,
    rng: np.random.Generator,
    mask: np.ndarray,
    n: int,
    radius: float,
    colour,
    strength: float,
) -> None:
    """Blend n small round dots (globules, milia cysts) at random points inside the lesion, in place."""
    size = img.shape[0]
    inside = np.flatnonzero(mask.ravel() > 0.8)
    if inside.size == 0:
        return
    r_px = max(1.0, radius * size)
    half = int(np.ceil(2.5 * r_px))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    for idx in rng.choice(inside, size=n):
        cy, cx = divmod(int(idx), size)
        rr = r_px * rng.uniform(0.6, 1.3)
        blob = strength * _smoothstep(1.5 - np.sqrt(yy * yy + xx * xx) / rr)
        y0, y1 = max(cy - half, 0), min(cy + half + 1, size)
        x0, x1 = max(cx - half, 0), min(cx + half + 1, size)
        b = blob[y0 - cy + half : y1 - cy + half, x0 - cx + half : x1 - cx + half, None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - b) + _rgb(colour) * b


def _structures(
    img: np.ndarray, rng: np.random.Generator, size: int, cls: int, mask: np.ndarray, depth: np.ndarray, uv
) -> np.ndarray:
    """Dermoscopic structures: regular network (nevus), atypical network + dots (melanoma),
    cerebriform furrows + milia-like cysts (SK)."""
    u, v = uv
    if cls in (0, 1):
        if cls == 0:  # regular honeycomb-like mesh, fading to the periphery
            freq = rng.uniform(55, 80)
            warp = 1.5 * _noise(rng, size, 10)
            holes = (
                np.cos(u * freq + warp)
                + np.cos((0.5 * u + 0.87 * v) * freq)
                + np.cos((0.5 * u - 0.87 * v) * freq - warp)
            )  # three plane waves at 60 degrees
            net = np.clip(holes + 1.0, 0, 1.5) / 1.5 * rng.uniform(0.12, 0.25) * np.sqrt(depth)
        else:  # atypical network: thick, uneven, broken
            ridges = _noise(rng, size, int(rng.integers(18, 30)))
            broken = np.clip(_noise(rng, size, 5) + 0.3, 0, 1)
            net = np.exp(-((ridges / 0.5) ** 2)) * rng.uniform(0.25, 0.5) * broken
        img = img * (1 - net[..., None] * mask[..., None])
        if cls == 0 and rng.random() < 0.3:
            _dots(img, rng, mask * (depth > 0.3), int(rng.integers(3, 10)), 0.012, _DARK_BROWN, 0.6)
        if cls == 1:
            _dots(img, rng, mask * (depth < 0.5), int(rng.integers(4, 16)), 0.010, _BLACK, 0.8)
        return img
    gyri = _noise(rng, size, int(rng.integers(22, 34)))
    sulci = np.exp(-((gyri / rng.uniform(0.3, 0.45)) ** 2))  # brain-like furrows along the zero lines
    img = img * (1 - rng.uniform(0.3, 0.5) * sulci[..., None] * mask[..., None])
    img = img + (0.06 * np.clip(gyri - 0.8, 0, None) * mask)[..., None]  # waxy sheen on the ridges
    _dots(img, rng, mask, int(rng.integers(3, 14)), 0.012, (0.95, 0.93, 0.82), 0.85)  # milia-like cysts
    if rng.random() < 0.5:
        _dots(img, rng, mask, int(rng.integers(2, 6)), 0.010, _DARK_BROWN, 0.7)  # comedo-like openings
    return img


# ---------------------------------------------------------------------------------------------- artefacts
def _hairs(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thin dark curved strands (quadratic Beziers drawn by PIL, slightly blurred for anti-aliasing)."""
    size = img.shape[0]
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(int(rng.integers(1, 10))):
        p0, p1, p2 = rng.uniform(-0.1, 1.1, (3, 2)) * size
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        width = max(1, round(size / 256 * rng.uniform(1, 2.5)))
        draw.line([tuple(p) for p in pts], fill=int(rng.uniform(170, 255)), width=width)
    alpha = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float32)[..., None] / 255
    colour = _rgb((0.16, 0.11, 0.08)) * rng.uniform(0.6, 1.3)
    return img * (1 - alpha) + colour * alpha


def _vignette(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The dermoscope's dark circular field (most images) plus radial light fall-off."""
    yy, xx = _grid(img.shape[0])
    cy, cx = rng.normal(0, 0.05, 2).tolist()
    rho = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    falloff = 1 - rng.uniform(0.05, 0.25) * rho**2
    if rng.random() < 0.7:
        radius = rng.uniform(0.9, 1.25)
        falloff = falloff * _smoothstep((radius - rho) / rng.uniform(0.03, 0.12) + 0.5)
    img *= falloff[..., None]
    img += 0.04 * (1 - falloff)[..., None]
    return img


# ---------------------------------------------------------------------------------------------- image
def render(
    label: int, size: int, rng: np.random.Generator, difficulty: float = 0.5, hair_prob: float = 0.3
) -> np.ndarray:
    """One synthetic dermoscopy image of class `label` as uint8 [size, size, 3].

    With probability `difficulty` each feature group (shape, colour, structures) is drawn from a uniformly
    random class instead of `label`: 0 = textbook cases, 1 = labels carry no signal.
    """
    shape_cls, colour_cls, struct_cls = (
        int(rng.integers(3)) if rng.random() < difficulty else label for _ in range(3)
    )
    img = _skin(rng, size)
    mask, depth, uv = _shape(rng, size, shape_cls)
    lesion = _structures(_palette(rng, size, colour_cls, depth), rng, size, struct_cls, mask, depth, uv)
    img += (lesion - img) * (mask * rng.uniform(0.85, 1.0))[..., None]
    if rng.random() < hair_prob:
        img = _hairs(img, rng)
    img = _vignette(img, rng) * (255 * (1 + rng.normal(0, 0.04, 3))).astype(np.float32)  # white-balance cast
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _metadata(label: int, rng: np.random.Generator) -> tuple[str, str]:
    """(age_approximate, sex) as ISIC writes them: age in 5-year steps, 'unknown' where missing."""
    mean_age = (42, 60, 66)[label]
    age = "unknown" if rng.random() < 0.05 else str(min(max(round(rng.normal(mean_age, 14) / 5) * 5, 5), 90))
    male = rng.random() < (0.45, 0.55, 0.5)[label]
    sex = "unknown" if rng.random() < 0.04 else ("male" if male else "female")
    return age, sex


def _make_one(job) -> tuple[str, str]:
    """Render, encode and write one image; returns its metadata. Top-level so a process pool can run it."""
    path, label, seed, split, index, size, difficulty, hair_prob, quality = job
    streams = np.random.SeedSequence([seed, split, index]).spawn(2)
    image_rng, meta_rng = (np.random.default_rng(s) for s in streams)
    pixels = render(label, size, image_rng, difficulty, hair_prob)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    Path(path).write_bytes(buf.getvalue())
    return _metadata(label, meta_rng)


# ---------------------------------------------------------------------------------------------- dataset
def _single_threaded_blas() -> None:
    """Pool initializer: the noise matmuls are tiny, and BLAS threads only fight the other workers."""
    threadpool_limits(1, user_api="blas")


def _check(n_train, n_val, size, priors, difficulty, hair_prob, quality) -> None:
    """Reject bad parameters before anything is written; messages name the CLI flag."""
    if not isinstance(n_train, (int, np.integer)) or n_train < 1:
        raise UsageError(f"--n-train must be a positive integer, got {n_train!r}")
    if not isinstance(n_val, (int, np.integer)) or n_val < 0:
        raise UsageError(f"--n-val must be a non-negative integer, got {n_val!r}")
    if not 32 <= size <= 4096:
        raise UsageError(f"--size must be between 32 and 4096 pixels, got {size}")
    if len(priors) != len(CLASSES) or min(priors) < 0 or sum(priors) <= 0:
        raise UsageError(f"--priors must be {len(CLASSES)} non-negative numbers, not all 0, got {priors}")
    if not 0 <= difficulty <= 1:
        raise UsageError(f"--difficulty must be in [0, 1], got {difficulty}")
    if not 0 <= hair_prob <= 1:
        raise UsageError(f"--hair-prob must be in [0, 1], got {hair_prob}")
    if not 1 <= quality <= 100:
        raise UsageError(f"--quality must be in [1, 100], got {quality}")


def synthesize(
    out,
    n_train: int,
    n_val: int,
    size: int = 256,
    seed: int = 0,
    priors=ISIC2017_PRIORS,
    difficulty: float = 0.5,
    hair_prob: float = 0.3,
    workers: int | None = None,
    force: bool = False,
    quality: int = 95,
) -> dict:
    """Write a synthetic ISIC 2017 dataset to `out` atomically; returns a summary (also lesionkit_synth.json).

    Image ids run on across splits (validation continues after training), so packed splits never clash.
    Built in a temp folder beside `out` and renamed at the end; an existing non-empty `out` is an error
    unless `force`.
    """
    _check(n_train, n_val, size, priors, difficulty, hair_prob, quality)
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers

    with staged_dir(out) as tmp:  # an existing OUT is empty here, or replaced under --force
        params = {
            "size": size,
            "seed": seed,
            "priors": list(priors),
            "difficulty": difficulty,
            "hair_prob": hair_prob,
            "quality": quality,
        }
        summary = {"classes": list(CLASSES), "params": params, "splits": {}}
        jobs, split_rows, offset = [], {}, 0
        for (name, split), n in zip(SPLITS, (n_train, n_val)):
            folder = tmp / f"ISIC-2017_{name}_Data"
            folder.mkdir()
            labels = split_labels(n, priors, seed, split)
            ids = [f"ISIC_{offset + i:07d}" for i in range(n)]
            offset += n
            split_rows[name] = (ids, labels, len(jobs))
            jobs += [
                (
                    str(folder / f"{image_id}.jpg"),
                    int(label),
                    seed,
                    split,
                    i,
                    size,
                    difficulty,
                    hair_prob,
                    quality,
                )
                for i, (image_id, label) in enumerate(zip(ids, labels))
            ]
            counts = dict(zip(CLASSES, class_counts(n, priors)))
            summary["splits"][name.lower()] = {"num_samples": n, "counts": counts}

        if workers > 1 and len(jobs) >= POOL_MIN_IMAGES:
            context = get_context("spawn")  # no fork of a parent that may hold torch/BLAS threads
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_single_threaded_blas) as pool:
                meta = list(pool.map(_make_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
        else:
            with threadpool_limits(1, user_api="blas"):
                meta = [_make_one(job) for job in jobs]

        for name, (ids, labels, start) in split_rows.items():
            _write_csv(
                tmp / f"ISIC-2017_{name}_Part3_GroundTruth.csv",
                ["image_id", "melanoma", "seborrheic_keratosis"],
                [(i, f"{float(y == 1):.1f}", f"{float(y == 2):.1f}") for i, y in zip(ids, labels)],
            )
            _write_csv(
                tmp / f"ISIC-2017_{name}_Data_metadata.csv",
                ["image_id", "age_approximate", "sex"],
                [(i, *meta[start + k]) for k, i in enumerate(ids)],
            )
        (tmp / "lesionkit_synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["root"] = str(out)
    return summary


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- preview
def contact_sheet(root, out_png, per_class: int = 6, split: str = "Training", width_px: int = 900) -> Path:
    """A PNG grid of the first `per_class` images of each class in an ISIC-layout folder, a row per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root, out_png = Path(root), Path(out_png)
    with open(root / f"ISIC-2017_{split}_Part3_GroundTruth.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_class: dict[int, list[str]] = {c: [] for c in range(len(CLASSES))}
    for row in rows:
        label = 1 if float(row["melanoma"]) else 2 if float(row["seborrheic_keratosis"]) else 0
        by_class[label].append(row["image_id"])
    dpi = 100
    fig, axes = plt.subplots(
        len(CLASSES),
        per_class,
        squeeze=False,
        dpi=dpi,
        figsize=(width_px / dpi, width_px / dpi * len(CLASSES) / per_class + 0.3),
    )
    for c, name in enumerate(CLASSES):
        for j in range(per_class):
            ax = axes[c][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(by_class[c]):
                ax.imshow(Image.open(root / f"ISIC-2017_{split}_Data" / f"{by_class[c][j]}.jpg"))
            if j == 0:
                ax.set_ylabel(name.replace("_", "\n"), fontsize=10)
    fig.subplots_adjust(left=0.09, right=0.995, top=0.995, bottom=0.005, wspace=0.03, hspace=0.03)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return write_bytes(out_png, buf.getvalue())
