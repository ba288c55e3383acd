"""`lesionkit compare RUN_DIR... | SWEEP_DIR`: runs side by side, best first, with the paired bootstrap
of the best against each other (`lesionkit.compare`) -> compare.md, compare.csv, compare.png."""

from __future__ import annotations

import argparse

from lesionkit.compare import OUTPUTS, compare, markdown
from lesionkit.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folders, or a sweep folder whose subfolders are runs"
    )
    parser.add_argument("--out", help="output folder (default: the folder the runs are in)")
    parser.add_argument(
        "--monitor", help="metric to sort and test on (default: the runs' monitor, else the task's score)"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples of the CIs and the paired test (0 = off)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="batch size when scoring a best checkpoint"
    )
    parser.add_argument("--workers", type=int, default=2, help="loader workers when scoring")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0 or args.bootstrap < 0:
        raise UsageError("--batch-size must be >= 1, --workers and --bootstrap >= 0")
    table, out, over, monitor = compare(
        args.runs, args.out, args.monitor, args.bootstrap, args.seed, args.batch_size, args.workers
    )
    print(markdown(table, over, monitor, args.bootstrap), end="")
    print(f"lesionkit compare: {len(table)} runs -> {out}/ ({', '.join(OUTPUTS)})")
    return 0
