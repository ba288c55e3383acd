"""`lesionkit ensemble CKPT... --data DIR`: score the mean of several checkpoints' probabilities on shards
(`lesionkit.ensemble`), optionally choosing the members greedily, into the folder `evaluate` writes
(metrics.json with the members, predictions.csv, thresholds.json, plots)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionkit import ensemble as E
from lesionkit import sources
from lesionkit.config import TTA_MODES
from lesionkit.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="checkpoint folders (e.g. runs/NAME/best); one listed twice weighs twice",
    )
    parser.add_argument("--data", required=True, nargs="+", metavar="DIR", help="shard folder(s) to score")
    parser.add_argument("--fold", type=int, default=None, help="score only this fold of --data's split")
    parser.add_argument("--out", help="output folder (default: ./ensemble-<data folder name>)")
    parser.add_argument(
        "--tta", default="none", choices=TTA_MODES, help="test-time augmentation of every member"
    )
    parser.add_argument(
        "--select",
        default="all",
        choices=E.SELECT,
        help="all: every checkpoint listed; greedy: forward selection with replacement on --data by the "
        "task's score (optimistic on that data: select on validation, score the chosen list on test)",
    )
    parser.add_argument(
        "--max-models",
        type=int,
        help="greedy: at most this many members, repeats counted (default: as listed)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0 = off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--cache-dir", help="keep remote shards here once checked against the manifest's sha256"
    )
    parser.add_argument("--fetch-retries", type=int, default=5, help="retries of a dropped connection")


def run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    max_models = len(args.checkpoints) if args.max_models is None else args.max_models
    if args.batch_size < 1 or args.workers < 0 or args.bootstrap < 0 or max_models < 1:
        raise UsageError("--batch-size and --max-models must be >= 1, --workers and --bootstrap >= 0")
    accelerator = Accelerator()
    try:
        return _ensemble(args, accelerator, max_models)
    finally:  # every rank leaves the process group (as evaluate does)
        accelerator.end_training()


def _ensemble(args: argparse.Namespace, accelerator, max_models: int) -> int:
    from lesionkit import metrics as M
    from lesionkit.evaluate import summary_table, task_of, write_report

    models = E.load_members(args.checkpoints, accelerator.device)
    loaded = list(models.values())
    classes, task = loaded[0].classes, task_of(loaded[0].info)
    fetch = sources.Fetch(cache_dir=args.cache_dir, retries=args.fetch_retries)
    keys, labels, probs = E.score_members(
        accelerator,
        models,
        args.data,
        args.tta,
        args.batch_size,
        args.workers,
        None if args.fold is None else [args.fold],
        fetch,
    )
    if not accelerator.is_main_process:
        return 0
    selection = None
    if args.select == "greedy":
        chosen, steps = E.greedy(labels, probs, classes, task, max_models)
        selection = {
            "method": "greedy forward selection with replacement (Caruana 2004)",
            "score": task.score,
            "on": "the evaluated data (optimistic)",
            "max_models": max_models,
            "scores": steps,
        }
    else:
        chosen = E.members_of(args.checkpoints, models)
    p = E.average(probs, chosen)
    thresholds = M.choose_thresholds(labels, p, classes)
    m = task.metrics(labels, p, classes, thresholds=thresholds)
    if args.bootstrap:
        m["ci"] = task.bootstrap_ci(labels, p, classes, n=args.bootstrap, seed=args.seed)
    ckpts = [str(c) for c in models]
    m.update(
        {
            "checkpoint": ckpts,
            "members": [ckpts[i] for i in chosen],
            "selection": selection,
            "data": [str(d) for d in args.data],
            "fold": args.fold,
            "model": [model.info["model"] for model in loaded],
            "task": task.name,
            "classes": classes,
            "image_size": [model.image_size for model in loaded],
            "tta": args.tta,
            "temperature": [model.temperature for model in loaded],
            "thresholds_source": "chosen on the evaluated data (optimistic)",
            "world_size": accelerator.num_processes,
        }
    )
    name = sources.display_name(args.data[0])
    out = Path(args.out) if args.out else Path(f"ensemble-{name}")
    write_report(out, m, keys, labels, p, classes, thresholds, args.data, title=f"ROC: ensemble on {name}")
    print(summary_table(m, classes, task))
    print(
        f"lesionkit ensemble: {len(chosen)} members ({', '.join(m['members'])}) on {len(keys)} images, "
        f"tta={args.tta} -> {out}/ (metrics.json, predictions.csv, roc.png, confusion.png, reliability.png)"
    )
    return 0
