"""Packing: images + labels CSV -> WebDataset shards + manifest.json, atomically, in parallel.

Why shards: training then reads a few large sequential tar files instead of thousands of small
JPEGs, and every rank/worker of a distributed job can take whole shards. Images are stored at the
training size (shorter side = --size) so the loader never decodes a 12 MP JPEG.

Why draft decoding: libjpeg can decode at 1/2, 1/4 or 1/8 scale straight from the DCT
coefficients, which skips most of the work for 1-20 MP ISIC photos (see `lesionkit bench pack`).

Each sample also gets its perceptual hashes (`dedup.image_hashes`, taken in the worker of the decoded image
as stored), in its JSON record and in the manifest, for `lesionkit dedup` and the trainer's duplicate check.

The output appears all at once or not at all: everything is written to a temp folder beside OUT
(`atomic.staged_dir`) and renamed into place at the end; on any error or Ctrl-C it is removed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing as mp
import os
import signal
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from lesionkit import __version__, dedup, tasks
from lesionkit.atomic import staged_dir
from lesionkit.errors import UsageError
from lesionkit.ingest import collect, name_some, summarize
from lesionkit.manifest import FORMAT_VERSION, MANIFEST, SHARD_NAME, sha256_file

# Like PIL's thumbnail(reducing_gap=2): decode at >= 2x the target size so Lanczos still has
# pixels to filter; decoding right at the target size would alias.
DRAFT_GAP = 2
CHUNK = 8  # images per task sent to a worker: amortizes IPC without delaying the ordered stream
EXIF_ORIENTATION = 0x0112
TAR_MTIME = 0.0  # fixed member mtime: the same inputs and seed give byte-identical shards

log = logging.getLogger(__name__)


class PackError(UsageError):
    """Packing failed on bad input; the message names the culprit and is meant for the user."""


def encode_image(path: str | Path, size: int, quality: int, draft: bool = True, image: bool = False) -> tuple:
    """One image -> (RGB JPEG bytes with shorter side == size, original width, original height), and with
    `image` the RGB PIL image as stored (before the JPEG encode: what its perceptual hash is taken of).

    Width/height are as displayed (after EXIF orientation). A JPEG that already is RGB, upright
    and at the target size is stored as is: no second lossy encode. Raises on undecodable files.
    """
    with Image.open(path) as im:
        fmt, mode = im.format, im.mode
        width, height = im.size
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if draft and fmt == "JPEG":
            im.draft("RGB", (size * DRAFT_GAP, size * DRAFT_GAP))
        im.load()  # full decode: truncated or corrupt data raises here
        out = ImageOps.exif_transpose(im)
    if out.mode != "RGB":
        out = out.convert("RGB")
    w, h = out.size
    target = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
    if fmt == "JPEG" and mode == "RGB" and orientation == 1 and (w, h) == target == (width, height):
        return (Path(path).read_bytes(), width, height) + ((out,) if image else ())
    if (w, h) != target:
        out = out.resize(target, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    return (buf.getvalue(), width, height) + ((out,) if image else ())


def _encode_chunk(tasks: list[tuple[str, str]], size: int, quality: int, draft: bool) -> list[tuple]:
    """Worker: [(id, path)] -> [(id, jpeg, width, height, perceptual hashes, error)]; errors are returned,
    not raised, so the parent decides (abort, or skip with --skip-bad) and names the file."""
    results = []
    for sample_id, path in tasks:
        try:
            jpeg, width, height, stored = encode_image(path, size, quality, draft, image=True)
            results.append((sample_id, jpeg, width, height, dedup.image_hashes(stored), None))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            results.append((sample_id, None, 0, 0, None, f"cannot decode {path}: {type(e).__name__}: {e}"))
    return results


def _worker_signals() -> None:
    """Workers leave Ctrl-C to the parent, which stops the pool and removes the temp folder; SIGTERM
    kills them whatever handler the forking parent had (the pool's exit terminates its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _encoded(tasks: list[tuple[str, str]], size: int, quality: int, draft: bool, workers: int):
    """Yield (id, jpeg, w, h, hashes, error) in task order. At most 2 chunks per worker are in flight, so
    memory stays flat however many images there are (Pool.imap would buffer results unboundedly)."""
    chunks = [tasks[i : i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    if workers <= 1:
        for chunk in chunks:
            yield from _encode_chunk(chunk, size, quality, draft)
        return
    # spawn, not fork: the parent may run threads (fsspec's IO loop, tqdm's monitor) whose locks a forked
    # child would inherit held; exiting the block terminates the workers
    with mp.get_context("spawn").Pool(workers, initializer=_worker_signals) as pool:
        todo = iter(chunks)
        pending: deque = deque()
        for chunk in todo:
            pending.append(pool.apply_async(_encode_chunk, (chunk, size, quality, draft)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            done = pending.popleft().get()
            chunk = next(todo, None)
            if chunk is not None:
                pending.append(pool.apply_async(_encode_chunk, (chunk, size, quality, draft)))
            yield from done


def _header_problems(table) -> list[dict]:
    """Cheap pass before any decoding: files PIL cannot even identify (not an image, empty, unreadable)."""
    bad = []
    for sample_id, path in zip(table["id"], table["path"]):
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            bad.append({"id": sample_id, "reason": f"unreadable image {path}: {type(e).__name__}: {e}"})
    return bad


def _write_shards(
    folder: Path,
    samples,
    classes: list[str],
    shard_size: int,
    skip_bad: bool,
    skipped: list[dict],
    progress,
    hashes: dict[str, list[str]],
) -> list[dict]:
    """Stream encoded samples into shard tars of `shard_size` samples; return the shard records. Each
    written sample's perceptual hashes go into `hashes` (id -> hex per view) for the manifest."""
    import webdataset as wds  # imports torch: only here, after the worker pool has forked

    shards: list[dict] = []
    writer, record = None, None

    def close():
        writer.close()
        path = folder / record["name"]
        record.update(bytes=path.stat().st_size, sha256=sha256_file(path))
        shards.append(record)

    try:
        for sample_id, jpeg, width, height, phash, error, label, meta, groups in samples:
            progress.update(1)
            if error is not None:
                if not skip_bad:
                    raise PackError(f"sample {sample_id}: {error} (pass --skip-bad to leave it out)")
                skipped.append({"id": sample_id, "reason": error})
                continue
            if writer is None:
                record = {
                    "name": SHARD_NAME.format(len(shards)),
                    "num_samples": 0,
                    "counts": dict.fromkeys(classes, 0),
                }
                writer = wds.TarWriter(str(folder / record["name"]), mtime=TAR_MTIME)
            info = {
                "id": sample_id,
                "label": label,
                "label_name": classes[label],
                "width": width,
                "height": height,
                "meta": meta,
                "groups": groups,
                "phash": phash,
            }
            hashes[sample_id] = phash
            writer.write(
                {
                    "__key__": sample_id,
                    "jpg": jpeg,
                    "cls": str(label).encode("ascii"),
                    "json": json.dumps(info, ensure_ascii=False).encode("utf-8"),
                }
            )
            record["num_samples"] += 1
            record["counts"][classes[label]] += 1
            if record["num_samples"] == shard_size:
                close()
                writer = None
    except BaseException:
        if writer is not None:
            writer.close()  # release the file; the caller deletes the temp folder
        raise
    if writer is not None:
        close()
    return shards


def _task(name: str | None, found) -> str:
    """The task to record: `name` (pack --task), checked against the classes, else the one the CSV implies."""
    if name is None:
        return found.task
    tasks.get_task(name).check_classes(found.classes)
    return name


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pack(
    images: str | Path,
    labels: str | Path,
    out: str | Path,
    size: int = 256,
    quality: int = 95,
    shard_size: int = 1000,
    workers: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    force: bool = False,
    metadata=None,
    draft: bool = True,
    progress: bool = False,
    task: str | None = None,
    label_column: str | None = None,
) -> dict:
    """Pack `images` + `labels` into shards in `out`; return the manifest (also written to out/manifest.json).

    `metadata`: a CSV or a list of CSVs (later files' values win). `task`: overrides the task the labels
    CSV implies (checked against the classes); `label_column`: the label of a CSV with several (ISIC 2020:
    `target` or `diagnosis`). Raises IngestError/PackError naming the bad samples; then `out` is
    untouched and no temp is left. `draft=False` decodes at full resolution (the naive baseline
    `lesionkit bench pack` compares to).
    """
    out = Path(out).absolute()
    for name, value, low, high in (
        ("size", size, 1, 1 << 16),
        ("quality", quality, 1, 100),
        ("shard_size", shard_size, 1, 1 << 31),
    ):
        if not low <= value <= high:
            raise PackError(f"--{name.replace('_', '-')} must be in [{low}, {high}], got {value}")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise PackError(f"--workers must be >= 0, got {workers}")
    if (out.exists() or out.is_symlink()) and not force:
        raise PackError(f"output {out} already exists; pass --force to replace it")

    metadata = [] if metadata is None else [metadata] if isinstance(metadata, (str, Path)) else list(metadata)
    found = collect(
        images, labels, metadata=metadata, skip_bad=skip_bad, label_column=label_column, task=task
    )
    task = _task(task, found)
    for note in found.notes:
        log.warning("note: %s", note)
    if found.unlisted:
        log.warning(
            "warning: %d image file(s) in %s are not in %s and are not packed: %s",
            len(found.unlisted),
            images,
            labels,
            name_some(found.unlisted),
        )
    table, classes, skipped = found.table, found.classes, found.skipped
    unreadable = _header_problems(table)
    if unreadable and not skip_bad:
        raise PackError(
            f"{len(unreadable)} unreadable image(s):\n  "
            + "\n  ".join(f"{b['id']}: {b['reason']}" for b in unreadable[:10])
            + (f"\n  ... and {len(unreadable) - 10} more" if len(unreadable) > 10 else "")
        )
    skipped += unreadable
    table = table[~table["id"].isin({b["id"] for b in unreadable})]
    table = table.iloc[np.random.default_rng(seed).permutation(len(table))]  # every shard mixes classes
    labels_by_id = dict(zip(table["id"], zip(table["label"], table["meta"], table["groups"])))

    encoded = _encoded(list(zip(table["id"], table["path"])), size, quality, draft, workers)
    with staged_dir(out) as tmp, contextlib.closing(encoded):  # closing stops the worker pool at once
        with tqdm(total=len(table), desc="pack", unit="img", disable=not progress) as bar:
            stream = ((*r, *labels_by_id[r[0]]) for r in encoded)
            hashes: dict[str, list[str]] = {}
            shards = _write_shards(tmp, stream, classes, shard_size, skip_bad, skipped, bar, hashes)
        if not shards:
            raise PackError(f"no samples left to pack ({len(skipped)} skipped)")
        counts = dict.fromkeys(classes, 0)
        for shard in shards:
            for name, n in shard["counts"].items():
                counts[name] += n
        left_out = {s["id"] for s in skipped}
        packed = table[~table["id"].isin(left_out)]
        summary = summarize(list(packed["meta"]), list(packed["groups"]))
        manifest = {
            "format_version": FORMAT_VERSION,
            "lesionkit_version": __version__,
            "classes": classes,
            "task": task,
            "label_format": found.label_format,
            "num_samples": sum(s["num_samples"] for s in shards),
            "counts": counts,
            "groups": summary["groups"],
            "metadata": summary["metadata"],
            "phash": dedup.manifest_entry(hashes),
            "shards": shards,
            "params": {
                "size": size,
                "quality": quality,
                "shard_size": shard_size,
                "seed": seed,
                "draft": draft,
                "skip_bad": skip_bad,
                "resample": "lanczos",
                "label_column": label_column,
            },
            "sources": {
                "images": str(Path(images).absolute()),
                "labels": str(Path(labels).absolute()),
                "metadata": [str(Path(m).absolute()) for m in metadata] or None,
            },
            "skipped": skipped,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # staged_dir fsyncs the folder
    return manifest
