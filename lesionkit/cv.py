"""Cross-validation of any recipe: train each fold of a split shard folder, score the out-of-fold predictions.

For each fold K of the folder's split (`lesionkit split`), `train --fold K` runs as its own process (or
under any launcher: `accelerate launch ...`, so a fold can use DDP) into `OUT/fold-K`, then `evaluate
--fold K` scores its checkpoint on the samples it never trained on. The out-of-fold (OOF) predictions
of all folds, pooled, give the CV score: the task's official score with its bootstrap CI, beside each
fold's own score. `last/` is scored by default: `best/` was chosen on that very fold, which flatters it.

`--holdout DIR...` also scores the mean of the fold models on a split none of them trained on (ISIC 2017's
validation split), into `OUT/eval-<name>`: the second judge of model selection beside the CV score
(`compare` shows it as a column).

`--train EXTRA... --label-maps MAP...` (one map per folder) adds folders of other releases, mapped into
DIR's classes, to every fold's training data, whole (`lesionkit.labelmaps`); validation stays on DIR's folds.

A rerun of the same command continues: finished folds are kept, an interrupted one resumes from its
`last/`, and scored folds are not scored again. A different config into the same OUT is refused.

`--rescore CV` trains nothing: it scores the fold models of the finished cross-validation CV again with
another `--val-tta` into a new OUT (the TTA row of a recipe table, paired image by image by `compare`),
for the same config only, and only where the TTA of validation cannot have steered the models scored (no
plateau scheduler, no early stopping, `last/` scored).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from lesionkit import tasks
from lesionkit.atomic import write_json, write_text
from lesionkit.config import TrainConfig, load_config, to_yaml
from lesionkit.errors import RunError, UsageError
from lesionkit.manifest import dataset_info, read_manifest, split_of

CONFIG = "cv-config.yaml"
SELECT = ("last", "best")


def fold_dir(out: Path, fold: int) -> Path:
    return out / f"fold-{fold}"


def _base_config(cfg: TrainConfig, data: str, out: Path) -> TrainConfig:
    """The config every fold trains with (its fold and run folder are given on the command line)."""
    if cfg.val or cfg.fold != -1:
        raise UsageError(
            "cv trains on the other folds of --data and validates on the held-out one: drop --val and "
            "--fold (--folds picks the folds to run)"
        )
    if cfg.train and len(cfg.label_maps) != len(cfg.train):
        raise UsageError(
            f"cv --train adds {len(cfg.train)} folder(s) of other releases to every fold's training data: "
            "give one --label-maps entry for each"
        )
    extra = [str(Path(d).absolute()) for d in cfg.train]
    return dataclasses.replace(
        cfg,
        train=[str(Path(data).absolute()), *extra],
        label_maps=["none", *cfg.label_maps] if extra else [],
        output_dir=str(out.absolute()),
        resume=False,
    )


SCORING_ONLY = ("val_tta", "output_dir", "run_name", "wandb")  # may differ between a CV and its rescoring


def _check_rescore(cfg: TrainConfig, models: Path, select: str) -> None:
    """A UsageError unless `models` is a CV trained with `cfg` (apart from how it is scored) whose
    training never saw the validation views, so scoring it again with another TTA answers what TTA adds."""
    if not (models / CONFIG).is_file():
        raise UsageError(f"--rescore {models}: not a cross-validation folder (no {CONFIG})")
    if cfg.scheduler == "plateau" or cfg.early_stop_patience or select != "last":
        raise UsageError(
            f"--rescore {models}: validation steers this config (plateau scheduler, early stopping or "
            "--select best), so another --val-tta would have made other models: run a new cv"
        )
    differ = _differing(load_config(models / CONFIG), cfg, ignore=SCORING_ONLY)
    if differ:
        raise UsageError(
            f"--rescore {models}: it was trained with another config (differs in {', '.join(differ)}); "
            "pass the flags it was trained with, changing only --val-tta"
        )


def _check_no_mix(out: Path, rescore: str | None) -> None:
    """Refuse to score into OUT what would replace its earlier scores: a rescoring into a CV that trained
    its own folds, or a training CV into a rescored one (its folds hold scores of another CV's models)."""
    trained = {p.parent.name for p in out.glob("fold-*/status.json")}
    scored = {p.parent.name for p in out.glob("fold-*/oof")}
    if rescore and trained:
        raise UsageError(f"--rescore: {out} holds a CV that trained its own folds; give a new --output-dir")
    if not rescore and scored - trained:
        raise UsageError(f"{out} holds a rescored CV (--rescore): give another --output-dir to train one")


def _differing(old: TrainConfig, new: TrainConfig, ignore=()) -> list[str]:
    """The config fields whose values differ (but those in `ignore`)."""
    return [
        f.name
        for f in dataclasses.fields(new)
        if f.name not in ignore and getattr(old, f.name) != getattr(new, f.name)
    ]


def _check_or_write_config(cfg: TrainConfig, out: Path) -> Path:
    path = out / CONFIG
    if path.is_file():
        differ = _differing(load_config(path), cfg)
        if differ:
            raise UsageError(
                f"{out} holds a cross-validation run with another config (differs in {', '.join(differ)}); "
                "pass another --output-dir, or the same flags to continue it"
            )
        return path
    write_text(path, to_yaml(cfg))
    return path


def _completed(run: Path) -> bool:
    status = run / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("status") == "completed"


def _run(cmd: list[str], what: str) -> None:
    print(f"lesionkit cv: {what}: {' '.join(cmd)}", flush=True)
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        raise RunError(f"{what} failed (exit {code}); fix the cause and rerun the same command to continue")


def holdout_dir(out: Path, holdout) -> Path:
    return out / f"eval-{Path(str(holdout[0]).rstrip('/')).name}"


def _scored(run: Path, ckpt: Path, tta: str) -> bool:
    metrics = run / "oof" / "metrics.json"
    if not metrics.is_file():
        return False
    m = json.loads(metrics.read_text())
    return m.get("checkpoint") == str(ckpt) and m.get("tta") == tta


def cross_validate(
    cfg: TrainConfig,
    data: str,
    folds: list[int] | None = None,
    launcher: list[str] | None = None,
    select: str = "last",
    bootstrap: int = 1000,
    seed: int = 0,
    holdout: list[str] | None = None,
    rescore: str | None = None,
) -> dict:
    """Train and score `folds` (default: all) of `data`'s split with `cfg`; write OUT/cv.json and
    OUT/oof_predictions.csv (OUT = cfg.output_dir) and return the summary; with `holdout`, also the
    mean of the fold models' probabilities on those shard folders (`lesionkit ensemble`). With
    `rescore`, the fold models are that CV's, and none is trained."""
    from lesionkit import train as train_module

    if not cfg.output_dir:  # a train run without one gets a new folder; a cv run is continued through it
        raise UsageError("cv needs --output-dir OUT (rerun with the same OUT to continue it)")
    out = Path(cfg.output_dir)
    cfg = _base_config(cfg, data, out)
    manifest = read_manifest(data)
    split = split_of(manifest, data, folds)
    folds = sorted({int(f) for f in folds}) if folds else list(range(split["folds"]))
    if select not in SELECT:
        raise UsageError(f"--select {select!r}: choose one of {', '.join(SELECT)}")
    held_classes = dataset_info(holdout)[0] if holdout else None
    if holdout and held_classes != list(manifest["classes"]):
        raise UsageError(
            f"--holdout {' '.join(holdout)} has the classes {held_classes}, --data {manifest['classes']}"
        )
    for fold in folds:  # every bad flag, monitor or fold fails now, before hours of training
        train_module.check_config(dataclasses.replace(cfg, fold=fold, output_dir=str(fold_dir(out, fold))))
    models = Path(rescore) if rescore else out  # where the fold models are (trained)
    _check_no_mix(out, rescore)
    if rescore:
        _check_rescore(cfg, models, select)
        unfinished = [f for f in folds if not _completed(fold_dir(models, f))]
        if unfinished:
            raise UsageError(
                f"--rescore {models}: fold(s) {', '.join(map(str, unfinished))} have not finished training "
                "there; finish that CV first"
            )
    config = _check_or_write_config(cfg, out)
    task = tasks.for_manifest(manifest)
    launcher = launcher or [sys.executable]
    for fold in folds:
        run = fold_dir(out, fold)
        if not rescore and not _completed(run):
            name = f"{cfg.run_name or out.name}-fold{fold}"
            _run(
                [*launcher, train_module.__file__, "--config", str(config), "--fold", str(fold)]
                + ["--output-dir", str(run), "--resume", "--run-name", name],
                f"fold {fold}: train",
            )
        ckpt = (fold_dir(models, fold) / select).resolve()
        if not _scored(run, ckpt, cfg.val_tta):
            _run(
                [
                    sys.executable,
                    "-m",
                    "lesionkit.cli",
                    "evaluate",
                    "--checkpoint",
                    str(ckpt),
                    "--data",
                    cfg.train[0],
                ]
                + ["--fold", str(fold), "--out", str(run / "oof"), "--tta", cfg.val_tta, "--bootstrap", "0"]
                + ["--workers", str(cfg.workers), "--batch-size", str(cfg.batch_size)],
                f"fold {fold}: score {select}/ on the held-out fold",
            )
    target = holdout_dir(out, holdout) if holdout else None
    if holdout:
        members = [str((fold_dir(models, f) / select).resolve()) for f in folds]
        done = target / "metrics.json"
        if not (done.is_file() and json.loads(done.read_text()).get("members") == members):
            _run(
                [sys.executable, "-m", "lesionkit.cli", "ensemble", *members, "--data", *holdout]
                + ["--out", str(target), "--tta", cfg.val_tta, "--bootstrap", str(bootstrap)]
                + ["--seed", str(seed), "--workers", str(cfg.workers), "--batch-size", str(cfg.batch_size)],
                f"holdout: the mean of the {len(members)} fold models on {' '.join(holdout)}",
            )
    summary = score_out_of_fold(out, folds, task, manifest["classes"], select, bootstrap, seed, split)
    if rescore:
        summary["models"] = str(models.absolute())  # where `compare` finds the fold runs
    if holdout:
        m = json.loads((target / "metrics.json").read_text())
        summary["holdout"] = {
            "data": list(holdout),
            "n": m["n"],
            "score": m.get(task.score),
            "score_ci": (m.get("ci") or {}).get(task.score),
            "members": m["members"],
            "folder": str(target),
        }
    write_json(out / "cv.json", summary)
    return summary


def score_out_of_fold(out: Path, folds, task, classes, select, bootstrap, seed, split) -> dict:
    """Pool the folds' held-out predictions into OUT/oof_predictions.csv; the summary: the task's metrics
    with bootstrap CIs, per-fold scores."""
    frames, per_fold = [], []
    for fold in folds:
        oof = fold_dir(out, fold) / "oof"
        df = pd.read_csv(oof / "predictions.csv", dtype={"image_id": str})
        frames.append(df.assign(fold=fold))
        m = json.loads((oof / "metrics.json").read_text())
        per_fold.append(
            {"fold": fold, "n": m["n"], task.score: m.get(task.score), "checkpoint": m["checkpoint"]}
        )
    oof = pd.concat(frames).sort_values("image_id").reset_index(drop=True)
    labels, probs = oof["label"].to_numpy(), oof[list(classes)].to_numpy()
    m = task.metrics(labels, probs, classes)
    if bootstrap:
        m["ci"] = task.bootstrap_ci(labels, probs, classes, n=bootstrap, seed=seed)
    fold_scores = np.array([f[task.score] for f in per_fold if f[task.score] is not None], dtype=float)
    summary = {
        "task": task.name,
        "score_name": task.score,
        "score": m.get(task.score),
        "score_ci": m.get("ci", {}).get(task.score),
        "fold_mean": float(fold_scores.mean()) if fold_scores.size else None,
        "fold_sd": float(fold_scores.std(ddof=1)) if fold_scores.size > 1 else None,
        "folds": per_fold,
        "split": {k: v for k, v in split.items() if k not in ("fold_of", "counts")},
        "select": select,
        "oof": m,
    }
    write_text(out / "oof_predictions.csv", oof.to_csv(index=False))
    return summary


def _ci(ci, label: str = "95% CI ") -> str:
    return f" [{label}{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def report(summary: dict, out: Path) -> str:
    """The lines `lesionkit cv` prints: each fold's score, then the pooled OOF score with its CI."""
    name = summary["score_name"]
    lines = [f"{'fold':>4} {'n':>6} {name:>20}"]
    for f in summary["folds"]:
        value = "-" if f[name] is None else f"{f[name]:.4f}"
        lines.append(f"{f['fold']:>4} {f['n']:>6} {value:>20}")
    ci = summary["score_ci"]
    score = "-" if summary["score"] is None else f"{summary['score']:.4f}"
    spread = (
        ""
        if summary["fold_sd"] is None
        else f"; folds {summary['fold_mean']:.4f} ± {summary['fold_sd']:.4f} (sd)"
    )
    lines.append(
        f"lesionkit cv: out-of-fold {name} {score}"
        + _ci(ci)
        + f" over {summary['oof']['n']} samples ({summary['select']}/ of each fold){spread} -> {out}/cv.json"
    )
    task = tasks.get_task(summary["task"])
    others = [c for c in task.columns if c != name and summary["oof"].get(c) is not None]
    if others:  # the task's other headline metrics (ISIC 2017: the melanoma and SK AUCs), pooled the same way
        ci = summary["oof"].get("ci", {})
        lines.append(
            "lesionkit cv: out-of-fold "
            + ", ".join(f"{c} {summary['oof'][c]:.4f}{_ci(ci.get(c), label='')}" for c in others)
        )
    held = summary.get("holdout")
    if held:
        ci = held["score_ci"]
        lines.append(
            f"lesionkit cv: holdout {name} {held['score']:.4f}"
            + _ci(ci)
            + f" on {held['n']} samples of {' '.join(held['data'])} (mean of the {len(held['members'])} "
            f"fold models) -> {held['folder']}"
        )
    return "\n".join(lines)
