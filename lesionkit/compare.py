"""Compare training runs side by side: `lesionkit compare RUN_DIR... | SWEEP_DIR` -> compare.md,
compare.csv and compare.png (validation score against training time).

One row per run, sorted by the monitor in its direction: the overrides, best epoch, the validation
score with its bootstrap CI, each `evaluate` folder's score (`RUN/eval-*`, e.g. the test set), training
time, images/s and parameter count; and the paired bootstrap of the best run against each other one on
the same validation images (`metrics.paired_bootstrap`: is the winner really better, or luck of the
draw?). Runs validated on other images cannot be paired, and the table says so.

A `lesionkit cv` folder is one row too: its pooled out-of-fold predictions are its validation images
(every training image once), its time the sum over its folds; so recipes are chosen by cross-validation
with the same paired test (two CVs of one split pair image by image; CVs of different folds of that
split, `cv --folds`, on the images both scored, wherever each of those images was held out by the same
fold in both: so the split of a folder packed again at another size, same ids and seed, pairs too).

- Overrides: the config keys whose values differ between the runs compared (`output_dir`, `run_name`,
  `wandb_tags`, `resume` and `force` left out: they name or label a run, they do not change it).
- Validation predictions: the trainer keeps only their metrics, so the best checkpoint is scored once
  on the run's validation data (`--val`, or fold K of `--train`) exactly as the trainer validated it
  (`evaluate.score`, its `val_tta`, temperature 1), and the predictions are cached in that checkpoint
  folder (`val_predictions.csv`, written atomically and only where absent). The cache lives and dies
  with the checkpoint: a resumed run whose best moves on has a new folder, scored anew.
- Images/s: training images per second of the run's wall time, validation included (global steps x
  batch per process x processes / the summed epoch times), the same measure for every run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from lesionkit import labelmaps, sources
from lesionkit import metrics as M
from lesionkit.atomic import replacing, write_text
from lesionkit.checkpoint import trainer_state
from lesionkit.config import TrainConfig, load_config
from lesionkit.errors import UsageError
from lesionkit.evaluate import predictions_frame, task_of
from lesionkit.metafeatures import MetaSpec
from lesionkit.tasks import Monitor

VAL_PREDICTIONS = "val_predictions.csv"  # in the best checkpoint folder
NOT_OVERRIDES = ("output_dir", "run_name", "wandb_tags", "resume", "force")
OUTPUTS = ("compare.md", "compare.csv", "compare.png")


@dataclasses.dataclass
class Run:
    path: Path
    cfg: TrainConfig
    info: dict  # best/info.json: classes, task, epoch, monitor, metrics
    loop: dict  # the trainer's loop state in last/: history, global_step
    record: dict  # the last entry of run.json: cwd, world_size
    cv: bool = False  # a `lesionkit cv` folder: scored on its out-of-fold predictions

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def best(self) -> Path:
        return (self.path / "best").resolve()


class Scored(NamedTuple):
    """A run's validation predictions by image; `folds`: a CV's fold that held out each image, else None."""

    keys: list[str]
    labels: np.ndarray
    probs: np.ndarray
    folds: np.ndarray | None = None

    def rows(self, ids: list[str]) -> Scored:
        """The predictions of `ids`, in that order."""
        at = dict(zip(self.keys, range(len(self.keys))))
        i = [at[key] for key in ids]
        return Scored(ids, self.labels[i], self.probs[i], None if self.folds is None else self.folds[i])


def is_run(path: Path) -> bool:
    return (path / "run.json").is_file() and (path / "config.yaml").is_file() or is_cv(path)


def is_cv(path: Path) -> bool:
    from lesionkit.cv import CONFIG

    return (path / "cv.json").is_file() and (path / CONFIG).is_file()


def find_runs(paths) -> list[Path]:
    """The run folders of `paths`: a run folder itself, or a folder (a sweep) whose subfolders are runs."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        inside = sorted(p for p in path.iterdir() if p.is_dir() and is_run(p)) if path.is_dir() else []
        if is_run(path):
            found[path] = None
        elif inside:
            found.update(dict.fromkeys(inside))
        else:
            raise UsageError(f"{path}: not a run folder (run.json + config.yaml) and holds no run folders")
    if not found:
        raise UsageError("no runs to compare")
    return list(found)


def load_run(path: Path) -> Run:
    if is_cv(path):
        return load_cv(path)
    if not (path / "best" / "info.json").is_file() or not (path / "last").exists():
        raise UsageError(f"{path}: no best checkpoint yet (best/info.json): it has not finished an epoch")
    return Run(
        path,
        load_config(path / "config.yaml"),
        json.loads((path / "best" / "info.json").read_text()),
        trainer_state(path / "last")["loop"],
        json.loads((path / "run.json").read_text())["segments"][-1],
    )


def load_cv(path: Path) -> Run:
    """A finished `lesionkit cv` folder as one row: its config, its folds' histories and steps summed."""
    from lesionkit.cv import CONFIG, fold_dir

    summary = json.loads((path / "cv.json").read_text())
    models = Path(summary.get("models", path))  # a rescored CV's fold runs are the CV it rescored
    folds = [load_run(fold_dir(models, f["fold"])) for f in summary["folds"]]
    info = {**folds[0].info, "epoch": "-", "metrics": summary["oof"]}
    loop = {
        "history": [row for run in folds for row in run.loop["history"]],
        "global_step": sum(run.loop["global_step"] for run in folds),
    }
    return Run(path, load_config(path / CONFIG), info, loop, folds[0].record, cv=True)


def same_task(runs: list[Run]):
    """(task, classes) shared by all runs; a run of another task or class list is a UsageError."""
    first = runs[0]
    for run in runs[1:]:
        if (task_of(run.info).name, run.info["classes"]) != (task_of(first.info).name, first.info["classes"]):
            raise UsageError(
                f"{run.path} is a {task_of(run.info).name} run on classes {run.info['classes']} but "
                f"{first.path} is a {task_of(first.info).name} run on {first.info['classes']}: compare runs "
                "of one task"
            )
    return task_of(first.info), list(first.info["classes"])


def overrides(runs: list[Run]) -> list[str]:
    """The config keys whose values differ between the runs."""
    configs = [dataclasses.asdict(run.cfg) for run in runs]
    return [k for k in configs[0] if k not in NOT_OVERRIDES and any(c[k] != configs[0][k] for c in configs)]


def validation_data(run: Run) -> tuple[list[str], list[int] | None]:
    """(shard folders, folds) the run validated on; relative paths are relative to where it trained."""
    from lesionkit.train import fold_selection

    def located(p: str) -> str:
        return p if sources.is_remote(p) or Path(p).is_absolute() else str(Path(run.record["cwd"]) / p)

    cfg = dataclasses.replace(run.cfg, train=[located(p) for p in run.cfg.train])
    cfg = dataclasses.replace(cfg, val=[located(p) for p in cfg.val])
    return labelmaps.validation_folders(cfg), fold_selection(cfg)[1]


def validation_predictions(run: Run, accelerator, batch_size: int, workers: int) -> Scored:
    """The run's best checkpoint on its validation images (a CV: its out-of-fold predictions): from the
    cache in the checkpoint folder, else scored now (and cached when the folder is writable);
    `accelerator()` gives the Accelerator to score with."""
    from lesionkit.evaluate import score

    classes, cache = list(run.info["classes"]), run.best / VAL_PREDICTIONS
    if run.cv:
        cache = run.path / "oof_predictions.csv"
    if cache.is_file():
        df = pd.read_csv(cache, dtype={"image_id": str})
        folds = df["fold"].to_numpy() if run.cv else None
        return Scored(df["image_id"].tolist(), df["label"].to_numpy(), df[classes].to_numpy(), folds)
    from lesionkit import api

    acc = accelerator()
    model = api.load(run.best, acc.device, temperature=1.0)  # the trainer validates at temperature 1
    dirs, folds = validation_data(run)
    where = " ".join(dirs) + ("" if folds is None else f" fold {folds[0]}")
    print(f"lesionkit compare: scoring {run.best} on its validation data ({where}) once", flush=True)
    fetch = sources.Fetch(cache_dir=run.cfg.cache_dir or None, retries=run.cfg.fetch_retries)
    keys, labels, logits = score(
        acc, model.module, model.info, dirs, run.best, run.cfg.val_tta,
        batch_size, workers, model.preprocess, folds, fetch,
    )  # fmt: skip
    probs = M.softmax_views(logits)
    try:
        write_text(cache, predictions_frame(keys, labels, probs, classes).to_csv(index=False))
    except OSError as exc:
        print(f"lesionkit compare: {run.path}: validation predictions not cached ({exc.strerror or exc})")
    return Scored(keys, labels, probs)


def evaluations(run: Run, monitor: str) -> dict[str, float | None]:
    """{eval folder name: its `monitor`} of the run's `evaluate` outputs (`RUN/eval-*`: the test set)."""
    return {
        m.parent.name: json.loads(m.read_text()).get(monitor)
        for m in sorted(run.path.glob("eval-*/metrics.json"))
    }


def params(run: Run) -> int:
    from lesionkit.models import create_model

    meta = MetaSpec.from_info(run.info)
    model = create_model(run.cfg.model, len(run.info["classes"]), meta_features=meta.size if meta else 0)
    return sum(p.numel() for p in model.parameters())


def compare(
    paths,
    out: Path | None = None,
    monitor: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 2,
) -> tuple[pd.DataFrame, Path, list[str], Monitor]:
    """(the comparison table sorted best first, OUT, the override keys, the monitor); written to
    OUT/compare.{md,csv,png}, OUT by default the folder the runs share (the sweep folder). `monitor`
    defaults to the one the runs trained with (the task's score when they differ)."""
    runs = [load_run(p) for p in find_runs(paths)]
    task, classes = same_task(runs)
    trained = {run.info.get("monitor") for run in runs}
    mon = task.monitor_for(monitor or (trained.pop() if len(trained) == 1 else ""), classes)
    over = overrides(runs)

    @functools.cache
    def accelerator():
        from accelerate import Accelerator

        return Accelerator()

    rows, preds = [], []
    for run in runs:
        scored = validation_predictions(run, accelerator, batch_size, workers)
        preds.append(scored)
        k, y, p = scored.keys, scored.labels, scored.probs
        m = task.metrics(y, p, classes)
        m["loss"] = m["nll"]  # as the trainer's validation names it
        times = sum(row["time_s"] for row in run.loop["history"])
        images = run.loop["global_step"] * run.cfg.batch_size * run.record.get("world_size", 1)
        rows.append(
            {
                "run": run.name,
                **{key: _plain(getattr(run.cfg, key)) for key in over},
                "best_epoch": run.info["epoch"],
                "val_n": len(k),
                "val": m.get(mon.name),
                "val_ci": task.bootstrap_ci(y, p, classes, n=bootstrap, seed=seed).get(mon.name)
                if bootstrap
                else None,
                **{f"{name} {mon.name}": v for name, v in evaluations(run, mon.name).items()},
                "train_time_s": float(times),
                "images_per_s": images / times if times > 0 else None,
                "params": params(run),
                "path": str(run.path),
            }
        )
    order = sorted(range(len(runs)), key=lambda i: _key(rows[i]["val"], mon.worst), reverse=mon.mode == "max")
    rows, preds, runs = [rows[i] for i in order], [preds[i] for i in order], [runs[i] for i in order]
    score_fn = (
        M.bootstrap_score(mon.name, classes, task.composites)
        if mon.name in M.bootstrap_metrics(classes, task.composites)
        else None
    )
    for i, row in enumerate(rows):
        row.update(_paired(preds[0], preds[i], i == 0, score_fn, mon.name, bootstrap, seed))
    table = pd.DataFrame(rows)
    out = Path(out) if out else Path(os.path.commonpath([r.path.resolve().parent for r in runs]))
    write(table, out, over, mon, bootstrap)
    return table, out, over, mon


def _key(value, worst: float) -> float:
    return worst if value is None or not math.isfinite(value) else value


def _plain(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _paired(best: Scored, other: Scored, is_best: bool, score_fn, name: str, n: int, seed: int) -> dict:
    """The paired bootstrap of the best run against `other` on the same images (two CVs: on the images
    both scored, where the same fold held out each in both), or why there is none."""
    none = {"diff": None, "diff_ci": None, "p": None}
    if is_best:
        return {"vs_best": "best", **none}
    how = "paired"
    if best.keys != other.keys or not np.array_equal(best.labels, other.labels):
        cvs = best.folds is not None and other.folds is not None
        common = sorted(set(best.keys) & set(other.keys)) if cvs else []
        best, other = best.rows(common), other.rows(common)
        if not common or not np.array_equal(best.labels, other.labels):
            return {"vs_best": "not paired: validated on other images", **none}
        if not np.array_equal(best.folds, other.folds):
            return {"vs_best": "not paired: the CVs' folds differ", **none}
        how = f"paired on the {len(common)} images both scored"
    if score_fn is None or not n:
        return {"vs_best": f"no bootstrap for {name}" if n else "no bootstrap (--bootstrap 0)", **none}
    test = M.paired_bootstrap(best.labels, best.probs, other.probs, score_fn, n=n, seed=seed)
    return {"vs_best": how, "diff": test["difference"], "diff_ci": test["ci"], "p": test["p"]}


def _f(v, fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ci(ci, fmt: str = ".4f") -> str:
    return f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]" if isinstance(ci, list) else ""


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def markdown(table: pd.DataFrame, over: list[str], monitor: Monitor, bootstrap: int) -> str:
    """The table as markdown, with a note on how to read the CIs and the paired test."""
    evals = [c for c in table.columns if c.startswith("eval-")]
    head = ["run", *over, "best epoch", f"val {monitor.name} [95% CI]", "best - run [95% CI], p", *evals]
    head += ["train time", "images/s", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.to_dict("records"):
        paired = (
            f"{_f(row['diff'], '+.4f')}{_ci(row['diff_ci'], '+.4f')}, "
            + (f"p<{1 / bootstrap:.2g}" if row["p"] == 0 else f"p={row['p']:.3f}")
            + (f" ({subset.strip()})" if (subset := row["vs_best"].removeprefix("paired")) else "")
            if row["vs_best"].startswith("paired")
            else row["vs_best"]
        )
        cells = [row["run"], *(str(row[k]) for k in over), str(row["best_epoch"])]
        cells += [f"{_f(row['val'])}{_ci(row['val_ci'])}", paired, *(_f(row[c]) for c in evals)]
        cells += [
            _duration(row["train_time_s"]),
            _f(row["images_per_s"], ".1f"),
            f"{row['params'] / 1e6:.2f}M",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    order = "highest" if monitor.mode == "max" else "lowest"
    note = (
        f" 95% CIs: percentile bootstrap over {bootstrap} resamples of those images. best - run: the "
        "paired bootstrap, both runs scored on the same resampled images; p is the fraction of resamples "
        "in which the best run is not better (small p: the winner is really better)."
        if bootstrap
        else ""
    )
    lines += [
        "",
        f"Sorted by the validation {monitor.name} ({order} first) of each run's best checkpoint on its "
        f"validation images (val_n in compare.csv); a CV folder (best epoch -) by its pooled out-of-fold "
        f"predictions.{note} Images/s include validation time.",
    ]
    return "\n".join(lines) + "\n"


def write(table: pd.DataFrame, out: Path, over: list[str], monitor: Monitor, bootstrap: int) -> None:
    """compare.md, compare.csv (CIs as _low/_high columns) and compare.png, each written atomically."""
    from lesionkit import plots

    flat = table.copy()
    for col in ("val_ci", "diff_ci"):
        at = flat.columns.get_loc(col)
        cis = [c if isinstance(c, list) else [None, None] for c in flat.pop(col)]
        flat.insert(at, f"{col}_high", [hi for _, hi in cis])
        flat.insert(at, f"{col}_low", [lo for lo, _ in cis])
    write_text(out / "compare.csv", flat.to_csv(index=False))
    write_text(out / "compare.md", markdown(table, over, monitor, bootstrap))
    with replacing(out / "compare.png") as tmp:
        plots.score_time_figure(
            table["run"],
            table["train_time_s"],
            table["val"],
            table["val_ci"],
            tmp,
            f"validation {monitor.name}",
        )
