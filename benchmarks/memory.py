"""`lesionkit bench memory`: peak RSS of packing + streaming --small vs --large synthetic images, each size
in a fresh interpreter (`memory_probe`); the goal is memory that does not grow with the number of samples."""

from __future__ import annotations

import csv
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.harness import cpu_machine, emit, in_fresh_process, peak_rss_mb
from lesionkit.data import train_loader
from lesionkit.errors import RunError, UsageError
from lesionkit.pack import pack


def memory_probe(
    images: str, labels: str, shards: str, size: int, workers: int, shard_size: int, batch_size: int
) -> dict:
    """Pack a folder, then stream the shards once through `train_loader`; peak memory after each phase."""
    start = time.perf_counter()
    manifest = pack(images, labels, shards, size=size, workers=workers, shard_size=shard_size, force=True)
    result = {
        "samples": manifest["num_samples"],
        "pack_s": time.perf_counter() - start,
        "pack": peak_rss_mb(),
    }
    start = time.perf_counter()
    loader = train_loader(
        shards, image_size=size, batch_size=batch_size, workers=workers, seed=0, epoch=0, rank=0, world_size=1
    )
    seen = sum(len(batch.labels) for batch in loader)
    del loader
    gc.collect()  # shuts the persistent workers down, so RUSAGE_CHILDREN counts them
    result.update(streamed=seen, stream_s=time.perf_counter() - start, stream=peak_rss_mb())
    return result


def _tile(images: Path, labels: Path, out: Path, n: int) -> tuple[Path, Path]:
    """`n` images under new ids, hard links to the synthesized ones taken round robin: synthesis costs
    ~10 ms an image, and what is measured is how memory scales with the number of samples."""
    with open(labels, newline="") as f:
        reader = csv.reader(f)
        header, rows = next(reader), list(reader)
    folder = out / "images"
    folder.mkdir(parents=True)
    tiled = []
    for i in range(n):
        row = rows[i % len(rows)]
        new_id = f"ISIC_{i:07d}"
        os.link(images / f"{row[0]}.jpg", folder / f"{new_id}.jpg")
        tiled.append([new_id, *row[1:]])
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(tiled)
    return folder, out / "labels.csv"


def bench(args) -> int:
    # Imported here, not at the top: `memory_probe`'s fresh interpreter imports this module, and what the
    # module imports counts in the peak RSS it measures (lesionkit.synth: ~2.5 MB that is not pack + stream).
    from lesionkit.synth.generator import synthesize

    if not 1 <= args.small < args.large:
        raise UsageError(f"need 1 <= --small < --large, got {args.small} and {args.large}")
    work = Path(tempfile.mkdtemp(prefix="lk-bench-memory-", dir=args.workdir))
    try:
        synthesize(work / "synth", args.small, 0, size=args.size, workers=max(1, args.workers))
        synth = work / "synth"
        source = (synth / "ISIC-2017_Training_Data", synth / "ISIC-2017_Training_Part3_GroundTruth.csv")
        results = {}
        for n in (args.small, args.large):
            images, labels = _tile(*source, work / f"n{n}", n)
            try:
                results[n] = in_fresh_process(
                    memory_probe,
                    str(images),
                    str(labels),
                    str(work / f"n{n}" / "shards"),
                    args.size,
                    args.workers,
                    args.shard_size,
                    args.batch_size,
                )
            except RuntimeError as exc:
                raise RunError(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = results[args.small], results[args.large]
    ratios = {
        f"{phase} {kind}": round(large[phase][kind] / small[phase][kind], 3)
        for phase in ("pack", "stream")
        for kind in ("rss_mb", "children_rss_mb")
        if small[phase][kind]
    }
    print(f"{'samples':>8} {'pack s':>7} {'stream s':>8} {'peak main':>10} {'peak worker':>12}")
    for n, r in results.items():
        print(
            f"{n:>8} {r['pack_s']:7.1f} {r['stream_s']:8.1f} {r['stream']['rss_mb']:7.0f} MB "
            f"{max(r['pack']['children_rss_mb'], r['stream']['children_rss_mb']):9.0f} MB"
        )
    worst = max(ratios.values())
    print(
        f"peak RSS {args.large} / {args.small} samples: {worst:.2f}x at most "
        f"({', '.join(f'{k} {v:.2f}x' for k, v in ratios.items())}); goal <= 1.5x"
    )
    emit(
        {
            "bench": "memory",
            "unit": "MB peak RSS",
            "results": {str(n): r for n, r in results.items()},
            "ratios": ratios,
            "max_ratio": worst,
            "params": {
                "small": args.small,
                "large": args.large,
                "size": args.size,
                "workers": args.workers,
                "shard_size": args.shard_size,
                "batch_size": args.batch_size,
                **cpu_machine(),
            },
        },
        args.out,
    )
    return 0
