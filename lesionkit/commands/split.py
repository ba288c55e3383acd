"""`lesionkit split DIR --by lesion --folds 5`: grouped, stratified folds recorded in the folder's manifest
(`lesionkit.splits`); `train --fold K` then validates on fold K, `lesionkit cv` runs every fold."""

from __future__ import annotations

from lesionkit.splits import GROUP_BY, assign_folds, fold_table


def add_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="shard folder written by `lesionkit pack`")
    parser.add_argument(
        "--by",
        choices=GROUP_BY,
        default="lesion",
        help="keep the images of one lesion (HAM10000/ISIC 2019) or one patient (ISIC 2020) in one fold; "
        "none: every image its own group (default: lesion)",
    )
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed of the fold assignment (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing split")


def run(args) -> int:
    split = assign_folds(args.dir, k=args.folds, by=args.by, seed=args.seed, force=args.force)
    classes = list(split["counts"][0])
    print(fold_table(split, classes))
    empty = [c for c in classes if any(counts[c] == 0 for counts in split["counts"])]
    if empty:
        print(f"warning: too few {args.by} groups of {', '.join(empty)} to put some in every fold")
    n = len(split["fold_of"])
    grouping = (
        "ungrouped: stratified by class only"
        if split["by"] == "none"
        else f"{split['groups']} groups; {split['ungrouped']} sample(s) without a {split['by']} id are "
        "groups of their own"
    )
    print(
        f"lesionkit split: {n} samples in {split['folds']} folds by {split['by']} ({grouping}), seed "
        f"{split['seed']}; recorded in {args.dir}/manifest.json"
    )
    return 0
