"""`lesionkit bench pack`: packing images/s and peak memory, draft decoding vs full decode + resize; each
pack runs in a fresh interpreter (`pack_probe`), so its peak memory is its own."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

# lesionkit.pack imports webdataset (and with it torch) lazily, inside pack(): imported here, up front, so
# those seconds are not timed as packing in `pack_probe`.
import webdataset  # noqa: F401

from benchmarks.harness import cpu_machine, in_fresh_process, peak_rss_mb, report
from lesionkit.errors import RunError, UsageError
from lesionkit.pack import default_workers, pack


def pack_probe(
    images: str, labels: str, out: str, size: int, workers: int, shard_size: int, draft: bool
) -> dict:
    """One `pack` into `out` (removed after) in this process: seconds, images and peak memory."""
    start = time.perf_counter()
    manifest = pack(
        images, labels, out, size=size, workers=workers, shard_size=shard_size, draft=draft, force=True
    )
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {"seconds": seconds, "images": manifest["num_samples"], **peak_rss_mb()}


def bench(args) -> int:
    workers = default_workers() if args.workers is None else args.workers
    for path in (args.images, args.labels):
        if not path.exists():
            raise UsageError(f"{path} does not exist")
    cases = {}
    with tempfile.TemporaryDirectory(prefix="lk-bench-pack-") as tmp:
        runs: dict[str, list[dict]] = {"draft": [], "full decode": []}
        for _ in range(args.repeats):  # cases in turns, each pack in a fresh process (own peak memory)
            for name, done in runs.items():
                try:
                    done.append(
                        in_fresh_process(
                            pack_probe,
                            str(args.images),
                            str(args.labels),
                            f"{tmp}/shards",
                            args.size,
                            workers,
                            1000,
                            name == "draft",
                        )
                    )
                except RuntimeError as exc:
                    raise RunError(str(exc)) from None
    for name, done in runs.items():
        rates = [d["images"] / d["seconds"] for d in done]
        cases[name] = {
            "items_per_s": statistics.median(rates),
            "runs": [round(r, 1) for r in rates],
            "items": done[0]["images"],
            "rss_mb": max(d["rss_mb"] for d in done),
            "children_rss_mb": max(d["children_rss_mb"] for d in done),
        }
    params = {
        "images": str(args.images),
        "labels": str(args.labels),
        "size": args.size,
        "workers": workers,
        "repeats": args.repeats,
        **cpu_machine(),
    }
    report("pack", cases, "full decode", params, args.out)
    print(f"{'case':<12} {'peak RSS main':>14} {'largest worker':>15}")
    for name, row in cases.items():
        print(f"{name:<12} {row['rss_mb']:11.0f} MB {row['children_rss_mb']:12.0f} MB")
    return 0
