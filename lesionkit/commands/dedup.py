"""`lesionkit dedup TRAIN... --against VAL...`: duplicate images between shard folders as CSV groups, and the
exclusion list the trainer honours (`--exclude`); see `lesionkit.dedup`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lesionkit import dedup, sources
from lesionkit.atomic import write_text
from lesionkit.errors import UsageError
from lesionkit.manifest import read_manifest, split_of


def add_arguments(parser) -> None:
    parser.add_argument("train", nargs="+", metavar="TRAIN", help="training shard folder(s)")
    parser.add_argument(
        "--against",
        nargs="+",
        default=[],
        metavar="DIR",
        help="validation or test shard folder(s) to look for the training images in",
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=None,
        help="instead of --against: fold K of TRAIN's split against its other folds (as `train --fold K`)",
    )
    parser.add_argument("--out", default=None, help="write the groups CSV here (default: standard output)")
    parser.add_argument(
        "--exclude-out",
        default=None,
        metavar="FILE",
        help="write the ids of the TRAIN samples that have a duplicate, one a line: `train --exclude FILE`",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out / --exclude-out file")
    parser.add_argument(
        "--max-distance",
        type=int,
        default=dedup.MAX_DISTANCE,
        help=f"candidates: at most this many of the 64 hash bits differ (default {dedup.MAX_DISTANCE})",
    )
    parser.add_argument(
        "--max-mad",
        type=float,
        default=dedup.MAX_MAD,
        help="confirmed: mean absolute grey-level difference of the aligned 64x64 thumbnails at most this "
        f"(default {dedup.MAX_MAD})",
    )
    parser.add_argument("--cache-dir", default="", help="keep remote shards here (as `train --cache-dir`)")


def _same(a: str, b: str) -> bool:
    if sources.is_remote(a) or sources.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def run(args) -> int:
    if args.fold is not None and args.against:
        raise UsageError("--fold K compares the folds of TRAIN with each other: drop --against")
    if args.fold is None and not args.against:
        raise UsageError("say what to look for the training images in: --against DIR... (or --fold K)")
    both = [a for a in args.against if any(_same(a, t) for t in args.train)]
    if both:
        raise UsageError(
            f"{both[0]} is both a TRAIN folder and an --against folder; to compare the folds of one folder "
            "use --fold K"
        )
    for flag, path in (("--out", args.out), ("--exclude-out", args.exclude_out)):
        if path is not None and (Path(path).exists() or Path(path).is_symlink()) and not args.force:
            raise UsageError(f"{flag} {path} already exists; pass --force to replace it")
    if args.out is not None and args.exclude_out is not None and _same(args.out, args.exclude_out):
        raise UsageError("--out and --exclude-out name the same file")

    fetch = sources.Fetch(cache_dir=args.cache_dir or None)
    against = args.train if args.fold is not None else args.against
    train_keep = against_keep = None
    if args.fold is not None:
        k = [args.fold]
        folds = split_of(read_manifest(args.train[0], fetch), args.train[0], k)["folds"]
        train_keep = dedup.selection(args.train, [f for f in range(folds) if f != args.fold], fetch=fetch)
        against_keep = dedup.selection(args.train, k, fetch=fetch)

    def note(text: str) -> None:
        print(f"lesionkit dedup: note: {text}", file=sys.stderr, flush=True)

    result = dedup.find(
        args.train,
        against,
        train_keep=train_keep,
        against_keep=against_keep,
        max_distance=args.max_distance,
        max_mad=args.max_mad,
        fetch=fetch,
        note=note,
    )
    table = dedup.groups_csv(result)
    written = []
    if args.out is not None:
        write_text(args.out, table)
        written.append(args.out)
    if args.exclude_out is not None:
        write_text(args.exclude_out, dedup.exclusion_text(result, args.train, against))
        written.append(args.exclude_out)
    duplicated = result.duplicated
    disagree = sum(g.labels_disagree for g in result.groups)
    side = f"fold {args.fold}" if args.fold is not None else "--against"
    summary = (
        f"lesionkit dedup: {len(result.groups)} duplicate group(s): {len(duplicated['train'])} training and "
        f"{len(duplicated['against'])} {side} sample(s), {disagree} group(s) with labels that disagree; "
        f"{result.candidates} candidate pair(s) within {args.max_distance} hash bits, {len(result.pairs)} "
        f"confirmed (thumbnail difference <= {args.max_mad:g})"
        + (f"; wrote {', '.join(written)}" if written else "")
    )
    if args.out is None:
        sys.stdout.write(table)
        sys.stdout.flush()
        print(summary, file=sys.stderr, flush=True)
    else:
        print(summary, flush=True)
    return 0
