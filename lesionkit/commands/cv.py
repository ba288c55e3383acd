"""`lesionkit cv --config RECIPE --data DIR --output-dir OUT`: every fold of DIR's split trained with the
recipe (all `train` flags apply) and the out-of-fold predictions scored (`lesionkit.cv`). `--train EXTRA...
--label-maps MAP...` adds label-mapped folders of other releases to every fold's training data."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from lesionkit.config import add_config_flags, config_from_args, to_yaml
from lesionkit.cv import SELECT, cross_validate, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, metavar="DIR", help="shard folder with folds (`lesionkit split`)"
    )
    parser.add_argument(
        "--folds", nargs="+", type=int, metavar="K", help="run only these folds (default: all)"
    )
    parser.add_argument(
        "--launcher",
        default="",
        help="command that starts each fold's training, e.g. 'accelerate launch --config_file "
        "accelerate_configs/multi_gpu.yaml' (default: this python, one process)",
    )
    parser.add_argument(
        "--select",
        choices=SELECT,
        default="last",
        help="checkpoint of each fold to score: last (default; unbiased) or best (chosen on that same fold)",
    )
    parser.add_argument(
        "--holdout",
        nargs="+",
        metavar="DIR",
        help="also score the mean of the fold models on these shard folders (a split no fold trained on, "
        "e.g. ISIC 2017's validation split): the second judge of model selection",
    )
    parser.add_argument(
        "--rescore",
        metavar="CV",
        help="train nothing: score the fold models of the finished cross-validation CV again with this "
        "command's --val-tta into --output-dir (same flags as CV otherwise; `compare` pairs the two)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CI (0 = off)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="bootstrap seed")
    add_config_flags(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    summary = cross_validate(
        cfg,
        args.data,
        folds=args.folds,
        launcher=shlex.split(args.launcher) or None,
        select=args.select,
        bootstrap=args.bootstrap,
        seed=args.bootstrap_seed,
        holdout=args.holdout,
        rescore=args.rescore,
    )
    print(report(summary, Path(cfg.output_dir)))
    return 0
