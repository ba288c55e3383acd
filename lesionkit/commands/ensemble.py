"""`lesionkit ensemble CKPT... --data DIR`: score the mean of several checkpoints' probabilities on shards
(`lesionkit.ensemble`), optionally choosing the members greedily, into the folder `evaluate` writes
(metrics.json with the members, predictions.csv, thresholds.json, plots).

`lesionkit ensemble --oof CV...` scores an ensemble of recipes by cross-validation instead: the mean of the
CVs' out-of-fold predictions (`ensemble.out_of_fold`), each fold's score, and the paired bootstrap of the
ensemble against each member, into the same kind of folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lesionkit import ensemble as E
from lesionkit import sources
from lesionkit.config import TTA_MODES
from lesionkit.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="checkpoint folders (e.g. runs/NAME/best), or with --oof `lesionkit cv` folders; one listed "
        "twice weighs twice",
    )
    parser.add_argument("--data", nargs="+", metavar="DIR", help="shard folder(s) to score (not with --oof)")
    parser.add_argument(
        "--oof",
        action="store_true",
        help="the folders are cross-validations of one split: score the mean of their out-of-fold "
        "predictions (as each CV scored them: no --data, --fold or --tta), paired with each CV",
    )
    parser.add_argument("--fold", type=int, default=None, help="score only this fold of --data's split")
    parser.add_argument(
        "--out", help="output folder (default: ./ensemble-<data folder name>, or ./ensemble-oof)"
    )
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
    if args.oof:
        if args.data or args.fold is not None or args.tta != "none":
            raise UsageError(
                "--oof averages the predictions each CV saved (scored with its own --val-tta): drop --data, "
                "--fold and --tta"
            )
        return _ensemble_oof(args, max_models)
    if not args.data:
        raise UsageError(
            "--data: give the shard folder(s) to score the checkpoints on (or --oof and CV folders)"
        )
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
    chosen, selection = _select(args, labels, probs, classes, task, max_models)
    if selection is None:
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


def _select(args, labels, probs, classes, task, max_models: int) -> tuple[list[int], dict | None]:
    """(member indices into `probs`, repeats weighing; the greedy selection's record, None for --select
    all)."""
    if args.select != "greedy":
        return list(range(len(probs))), None
    chosen, steps = E.greedy(labels, probs, classes, task, max_models)
    return chosen, {
        "method": "greedy forward selection with replacement (Caruana 2004)",
        "score": task.score,
        "on": "the evaluated data (optimistic)",
        "max_models": max_models,
        "scores": steps,
    }


def _ensemble_oof(args: argparse.Namespace, max_models: int) -> int:
    """The mean of the CVs' out-of-fold predictions, scored as `cv` scores one CV, per fold, and against
    each member by the paired bootstrap on the same images."""
    from lesionkit import metrics as M
    from lesionkit import tasks
    from lesionkit.evaluate import summary_table, write_report

    oof = E.out_of_fold(args.checkpoints)
    task, classes, labels = tasks.get_task(oof.task), oof.classes, oof.labels
    chosen, selection = _select(args, labels, oof.probs, classes, task, max_models)
    p = E.average(oof.probs, chosen)
    thresholds = M.choose_thresholds(labels, p, classes)
    m = task.metrics(labels, p, classes, thresholds=thresholds)
    if args.bootstrap:
        m["ci"] = task.bootstrap_ci(labels, p, classes, n=args.bootstrap, seed=args.seed)
    score_fn = M.bootstrap_score(task.score, classes, task.composites)
    cvs = [str(cv) for cv in args.checkpoints]
    m.update(
        {
            "checkpoint": cvs,
            "members": [cvs[i] for i in chosen],
            "selection": selection,
            "data": f"out-of-fold predictions of {len(cvs)} cross-validations",
            "task": task.name,
            "classes": classes,
            "folds": [_fold(task, labels, p, oof.folds, int(f), classes) for f in np.unique(oof.folds)],
            "vs_members": [
                {"member": cvs[i], **_paired(M, labels, p, oof.probs[i], score_fn, args)}
                for i in range(len(cvs))
            ],
            "thresholds_source": "chosen on the out-of-fold predictions (optimistic)",
        }
    )
    out = Path(args.out or "ensemble-oof")
    write_report(out, m, oof.keys, labels, p, classes, thresholds, cvs, title="ROC: out-of-fold ensemble")
    print(summary_table(m, classes, task))
    name, ci = task.score, m.get("ci", {}).get(task.score)
    for f in m["folds"]:
        print(f"fold {f['fold']}: {f['n']} images, {name} " + ("-" if f[name] is None else f"{f[name]:.4f}"))
    print(
        f"lesionkit ensemble: out-of-fold {name} {m[name]:.4f}"
        + (f" [95% CI {ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
        + f" over {len(oof.keys)} images, mean of {len(chosen)} CVs -> {out}/ (metrics.json, "
        "predictions.csv, roc.png, confusion.png, reliability.png)"
    )
    for row in m["vs_members"]:
        if row["ci"] is not None:
            (lo, hi), diff = row["ci"], row["difference"]
            print(f"  ensemble - {row['member']}: {diff:+.4f} [{lo:+.4f}, {hi:+.4f}], p = {row['p']:.3f}")
    return 0


def _fold(task, labels, probs, folds, fold: int, classes) -> dict:
    rows = folds == fold
    return {
        "fold": fold,
        "n": int(rows.sum()),
        task.score: task.metrics(labels[rows], probs[rows], classes).get(task.score),
    }


def _paired(M, labels, ensemble, member, score_fn, args) -> dict:
    """The ensemble minus one member on the same resampled images (`metrics.paired_bootstrap`)."""
    if not args.bootstrap:
        return {"difference": None, "ci": None, "p": None}
    test = M.paired_bootstrap(labels, ensemble, member, score_fn, n=args.bootstrap, seed=args.seed)
    return {"difference": test["difference"], "ci": test["ci"], "p": test["p"]}
