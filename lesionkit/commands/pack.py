"""`lesionkit pack`: images + labels CSV -> WebDataset shards + manifest.json (see `lesionkit.pack`)."""

from __future__ import annotations

import sys
import time

from lesionkit.errors import UsageError
from lesionkit.ingest import name_some
from lesionkit.pack import pack
from lesionkit.tasks import TASKS


def add_arguments(parser) -> None:
    parser.add_argument("--images", required=True, help="folder of image files named <id>.jpg")
    parser.add_argument(
        "--labels",
        required=True,
        help="labels CSV: ISIC 2017 Part 3, ISIC 2018/2019 one-hot, ISIC 2020 (image_name,...,target), "
        "HAM10000 metadata (dx), or image_id,label",
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    parser.add_argument(
        "--metadata",
        nargs="+",
        default=None,
        help="optional metadata CSV(s): ISIC 2017/2019 metadata, HAM10000_metadata.csv (lesion ids), ...",
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=None,
        help="the task to record (default: detected from the labels CSV): "
        + "; ".join(f"{name}: {t.description}" for name, t in TASKS.items()),
    )
    parser.add_argument(
        "--label-column",
        default=None,
        help="the label of a CSV with several: ISIC 2020 `target` (default) or `diagnosis` (train on "
        "diagnosis classes, still scored by melanoma AUC)",
    )
    parser.add_argument("--size", type=int, default=256, help="shorter side of stored images (default 256)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: all CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad samples out (listed in manifest 'skipped') instead of failing",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")


def run(args) -> int:
    start = time.perf_counter()
    try:
        manifest = pack(
            args.images,
            args.labels,
            args.out,
            size=args.size,
            quality=args.quality,
            shard_size=args.shard_size,
            workers=args.workers,
            seed=args.seed,
            skip_bad=args.skip_bad,
            force=args.force,
            metadata=args.metadata,
            progress=sys.stderr.isatty(),
            task=args.task,
            label_column=args.label_column,
        )
    except UsageError as e:
        raise type(e)(f"{e}\nnothing was written to {args.out}") from None
    except KeyboardInterrupt:
        print(f"lesionkit pack: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    n = manifest["num_samples"]
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    print(
        f"packed {n} samples ({counts}) into {len(manifest['shards'])} shard(s) in {args.out} "
        f"in {seconds:.1f} s ({n / seconds:.0f} img/s); task {manifest['task']}"
    )
    for kind, g in manifest["groups"].items():
        print(f"{kind} ids: {g['unique']} {kind}s over {g['present']} samples ({g['missing']} without one)")
    if manifest["skipped"]:
        print(
            f"skipped {len(manifest['skipped'])} bad sample(s): "
            f"{name_some([s['id'] for s in manifest['skipped']])} (reasons in manifest.json)"
        )
    return 0
