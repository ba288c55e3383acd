"""Score a checkpoint on packed shards -> metrics.json, predictions.csv, thresholds.json, plots.

Runs on 1..N processes (`accelerate launch -m lesionkit.evaluate ...`): each rank scores its part of
the exactly-once evaluation reader, the per-sample logits are gathered once, and the main process
computes the metrics and writes the output folder atomically (`atomic.staged_dir`).

Test-time augmentation averages probabilities over views (`inference.tta_views`). Temperature scaling
(`--fit-temperature` on a validation set) is stored as `temperature.json` in the checkpoint folder and
applied from then on by `evaluate` and `predict`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from lesionkit import metafeatures, tasks
from lesionkit.atomic import staged_dir, write_json, write_text
from lesionkit.data import eval_loader
from lesionkit.errors import UsageError
from lesionkit.inference import check_classes, gather_predictions, predict_logits
from lesionkit.manifest import dataset_info

THRESHOLDS_FILE = "thresholds.json"
PLOTS = ("roc", "confusion", "reliability")


def task_of(info: dict) -> tasks.Task:
    """The checkpoint's task (older checkpoints recorded only their classes)."""
    return tasks.get_task(info["task"]) if info.get("task") else tasks.detect(info["classes"])


def score(
    accelerator,
    model,
    info: dict,
    dirs,
    ckpt,
    tta: str,
    batch_size: int,
    workers: int,
    preprocess,
    folds=None,
    fetch=None,
):
    """(keys, labels, logits [N, V, C]) of every sample of `dirs` (of `folds` of their split, when given),
    gathered from all ranks on every rank; `fetch` (`sources.Fetch`) says how remote shards are fetched."""
    classes, _, num_samples = dataset_info(dirs, folds, fetch)
    check_classes(info, classes, ckpt, " ".join(map(str, dirs)))
    meta = metafeatures.MetaSpec.from_info(info)
    if meta is not None:  # a model trained with metadata reads it from these shards too
        metafeatures.check_folders(meta, dirs, fetch, flag=f"{ckpt} takes")
    loader = eval_loader(
        dirs,
        image_size=info["image_size"],
        batch_size=batch_size,
        workers=workers,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        folds=folds,
        fetch=fetch,
        features=meta,
    )
    keys, labels, logits = predict_logits(
        model, loader, accelerator.device, preprocess, tta, autocast=accelerator.autocast
    )
    keys, labels, logits = gather_predictions(accelerator, keys, labels, logits)
    if len(keys) != num_samples:
        raise UsageError(f"scored {len(keys)} samples but the manifests of {dirs} list {num_samples}")
    if not keys:
        raise UsageError(f"no samples in {' '.join(map(str, dirs))}")
    return keys, labels, logits


def evaluation_name(data, fold, tta: str) -> str:
    """How the model card names an evaluation: the data, its fold and the TTA (one row per name)."""
    from lesionkit.sources import display_name

    return (
        ", ".join(display_name(d) for d in data)
        + ("" if fold is None else f" fold {fold}")
        + ("" if tta == "none" else f", TTA {tta}")
    )


def load_thresholds(path: Path, classes: list[str]) -> tuple[dict, str]:
    """(thresholds per class, their source) from a thresholds.json or an evaluate output folder."""
    file = path / THRESHOLDS_FILE if path.is_dir() else path
    if not file.is_file():
        raise UsageError(
            f"--thresholds-from {path}: not a shard folder, a {THRESHOLDS_FILE} or a folder holding one"
        )
    saved = json.loads(file.read_text())
    thresholds = saved.get("thresholds", saved)
    missing = [c for c in classes if c not in thresholds]
    if missing:
        raise UsageError(f"--thresholds-from {file}: no threshold for class(es) {missing}")
    return {c: thresholds[c] for c in classes}, f"{file} ({saved.get('source', 'saved')})"


def predictions_frame(keys, labels, probs, classes) -> pd.DataFrame:
    df = pd.DataFrame({"image_id": keys, "label": labels, "label_name": [classes[i] for i in labels]})
    for c, name in enumerate(classes):
        df[name] = probs[:, c]
    return df


def images_of(dirs, keys, image_size: int, folds=None, fetch=None, features=None):
    """(uint8 [len(keys), 3, S, S], their metadata features [len(keys), F] or None): the samples `keys` of
    shard folders `dirs` as the model saw them (`features`: the model's `MetaSpec`, for its metadata)."""
    import torch

    wanted, found = set(keys), {}
    reader = eval_loader(
        dirs,
        image_size=image_size,
        batch_size=64,
        workers=0,
        rank=0,
        world_size=1,
        folds=folds,
        fetch=fetch,
        features=features,
    )
    for batch in reader:
        for j, key in enumerate(batch.keys):
            if key in wanted:
                found[key] = (batch.images[j], None if batch.meta is None else batch.meta[j])
    images = torch.stack([found[k][0] for k in keys])
    return images, None if features is None else torch.stack([found[k][1] for k in keys])


def write_report(
    out: Path, m: dict, keys, labels, probs, classes, own_thresholds: dict, data, title: str, extra=None
) -> Path:
    """The evaluation folder, all at once: metrics.json, thresholds.json, predictions.csv and the plots;
    `extra(folder)` adds more (the explained errors) before the folder is swapped in."""
    from lesionkit import plots

    with staged_dir(out) as tmp:
        if extra is not None:
            extra(tmp)
        write_json(tmp / "metrics.json", m)
        write_json(
            tmp / THRESHOLDS_FILE, {"thresholds": own_thresholds, "source": f"Youden's J on {' '.join(data)}"}
        )
        write_text(
            tmp / "predictions.csv", predictions_frame(keys, labels, probs, classes).to_csv(index=False)
        )
        plots.roc_figure(labels, probs, classes, tmp / "roc.png", title=title)
        plots.confusion_figure(m["confusion_matrix"], classes, tmp / "confusion.png")
        plots.reliability_figure(labels, probs, tmp / "reliability.png")
    return out


def log_to_wandb(ckpt: Path, info: dict, prefix: str, m: dict, out: Path) -> None:
    """Metrics into the run summary and the PNGs as images, resuming the checkpoint's training run
    (its id is in info.json) so evaluation lands beside the training curves."""
    from lesionkit import tracking
    from lesionkit.config import load_config

    tracking.setup_wandb_env()
    import wandb

    cfg = load_config(ckpt / "config.yaml")
    run_id = info.get("wandb_id") or None
    run = wandb.init(
        project=cfg.wandb_project,
        dir=str(ckpt.parent),
        id=run_id,
        resume="allow" if run_id else None,
        job_type="evaluate",
        name=cfg.run_name or None,
    )
    run.summary.update({f"{prefix}/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
    run.log({f"{prefix}/{name}": wandb.Image(str(out / f"{name}.png")) for name in PLOTS})
    mode = run.settings.mode
    run.finish()
    wandb.teardown()  # stop the service now: the offline run file is complete when this returns
    print(f"lesionkit evaluate: logged to W&B ({mode}) under {prefix}/ in {ckpt.parent / 'wandb'}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def summary_table(m: dict, classes: list[str], task: tasks.Task) -> str:
    ci = m.get("ci", {})
    lines = [f"{'class':<22}{'n':>6}{'AUC':>8}{'95% CI':>17}{'AUC>80%':>9}{'AP':>8}{'sens':>8}{'spec':>8}"]
    for c in classes:
        lo_hi = ci.get(f"auc_{c}")
        ci_txt = f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "-"
        lines.append(
            f"{c:<22}{m[f'n_{c}']:>6}{_fmt(m[f'auc_{c}']):>8}{ci_txt:>17}"
            f"{_fmt(m[f'auc_sens_80_{c}']):>9}{_fmt(m[f'ap_{c}']):>8}{_fmt(m[f'sens_{c}']):>8}"
            f"{_fmt(m[f'spec_{c}']):>8}"
        )
    scores = []
    for name in dict.fromkeys([*task.composites, "balanced_accuracy", "auc_macro"]):
        lo_hi = ci.get(name)
        scores.append(f"{name} {_fmt(m[name])}" + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""))
    lines.append("   ".join([*scores, f"accuracy {_fmt(m['accuracy'])}"]))
    lines.append(f"task {task.name}: score {task.score} = {_fmt(m.get(task.score))}")
    return "\n".join(lines)


if __name__ == "__main__":  # `accelerate launch -m lesionkit.evaluate ...`
    from lesionkit.cli import run_command

    sys.exit(run_command("evaluate", prog="lesionkit evaluate"))
