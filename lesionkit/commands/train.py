"""`lesionkit train` (and `accelerate launch lesionkit/train.py`): flags from the config dataclass."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionkit import planning, runs
from lesionkit.config import add_config_flags, config_from_args, to_yaml
from lesionkit.train import check_config, fold_selection, train, use_demo_data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved plan (processes, devices, batch, LR, loader workers, shards per rank), exit",
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    cfg = runs.prepare(use_demo_data(cfg))  # --resume PATH; an earlier run in the output dir is refused
    monitor = check_config(cfg)
    plan = planning.make(cfg, strict=not args.dry_run, folds=fold_selection(cfg))
    if plan.launch.rank == 0:
        print(plan.describe(cfg), flush=True)
    if args.dry_run:
        return 0
    runs.probe_writable(Path(cfg.output_dir or runs.ROOT))
    return train(cfg, monitor, plan)
