"""W&B through Accelerate's trackers. The functions taking a `run` are no-ops when it is None (W&B off, or
not the main process); the trainer's `Reporter` calls them.

Online when the user is logged in (`WANDB_API_KEY`, or the netrc entry `wandb login` writes), offline
otherwise (runs written under the run folder, uploaded later with `wandb sync`); an explicit `WANDB_MODE`
wins. Every log carries the loop's global step, so the segments of a resumed or requeued offline run
(one folder each under RUN/wandb, one run id) continue each other's steps and `wandb sync RUN/wandb`
uploads them, oldest first, into one W&B run.
"""

from __future__ import annotations

import math
import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

TABLE_ROWS = 200  # rows of the validation predictions table (misclassified first)


def logged_in() -> bool:
    """Credentials for the W&B server: WANDB_API_KEY (or an identity token file), or the entry `wandb login`
    writes into ~/.netrc (or $NETRC) for the host of WANDB_BASE_URL. Read with the stdlib `netrc`, not
    `wandb.login(verify=False, prompt=False)`: that fixes the mode of wandb's settings singleton before we
    can choose offline (the next `wandb.init` fails with "No API key configured"), and asks the server who
    the user is unless WANDB_SILENT is set (measured: 2 GraphQL requests, 5.7 s against a loopback host)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or Path.home() / ".netrc").authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def setup_wandb_env() -> str:
    """Pick online/offline before anything imports wandb; returns the mode."""
    if not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "online" if logged_in() else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    return os.environ["WANDB_MODE"]


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_name(run_dir: Path, explicit: str = "") -> str:
    """`--run-name`, else the run folder's name, with the Slurm job name and id when they are not in it."""
    if explicit:
        return explicit
    name, job = Path(run_dir).name, os.environ.get("SLURM_JOB_ID")
    if job and job not in name:
        name += f" ({os.environ.get('SLURM_JOB_NAME', 'slurm')} {job})"
    return name


def init_kwargs(run_dir: Path, run_id: str, cfg) -> dict:
    """Same id on resume, so a requeued or resumed job continues the same W&B run."""
    tags = [t.strip() for t in cfg.wandb_tags.split(",") if t.strip()]
    return {
        "wandb": {
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
            "name": run_name(run_dir, cfg.run_name),
            "group": cfg.wandb_group or None,
            "tags": tags or None,
            "job_type": "train",
        }
    }


def start(accelerator, project: str, config: dict, kwargs: dict) -> str | None:
    """Open the W&B run through Accelerate. Online but the server does not answer (a compute node without
    internet, where the user is logged in through a shared home): offline instead, so the run starts anyway;
    returns the line that says so."""
    import wandb

    try:
        accelerator.init_trackers(project, config=config, init_kwargs=kwargs)
        return None
    except wandb.errors.CommError as e:
        os.environ["WANDB_MODE"] = "offline"
        wandb.teardown()  # the failed run's id stays taken in wandb's service otherwise
        accelerator.init_trackers(project, config=config, init_kwargs=kwargs)
        why = str(e).strip().splitlines()[0]
        return f"W&B server did not answer ({why}); logging offline (WANDB_MODE=offline skips the wait)"


def run_config(cfg, run_facts: dict) -> dict:
    """The W&B config: every TrainConfig field plus world size, batches, version, commit, Slurm job, data."""
    return {**cfg.to_dict(), **run_facts}


def wandb_run(accelerator):
    """The live wandb run on the main process, else None."""
    if not accelerator.is_main_process or "wandb" not in [t.name for t in accelerator.trackers]:
        return None
    return accelerator.get_tracker("wandb", unwrap=True)


def define_metrics(run, monitor) -> None:
    """`best/<monitor>` (the best score so far, against the epoch) summarised in the monitor's direction
    (max, or min for losses). The validation metrics get no automatic summary
    (`define_validation_metrics`): `set_best_summary` writes the best epoch's values there."""
    if run is None:
        return
    run.define_metric("epoch")
    run.define_metric(f"best/{monitor.name}", step_metric="epoch", summary=monitor.mode)


def define_validation_metrics(run, names, defined: set) -> None:
    """Declare each validation metric (x axis: epoch; no automatic summary) before its first log; `defined`
    remembers the names declared in this process."""
    if run is None:
        return
    for name in names:
        if name not in defined:
            run.define_metric(name, step_metric="epoch", summary="none")
            defined.add(name)


def set_best_summary(run, metrics: dict, epoch: int) -> None:
    """The run summary shows the best epoch's validation metrics (runs tables compare these)."""
    if run is None:
        return
    run.summary.update(
        {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        | {"best/epoch": epoch}
    )


def log_class_distribution(run, counts: dict[str, int], step: int) -> None:
    if run is None:
        return
    import wandb

    table = wandb.Table(data=[[k, v] for k, v in counts.items()], columns=["class", "count"])
    run.log(
        {"data/class_distribution": wandb.plot.bar(table, "class", "count", title="Training classes")},
        step=step,
    )


def log_eval_plots(run, labels: np.ndarray, probs: np.ndarray, classes: list[str], step: int) -> None:
    """ROC curves and the confusion matrix of one validation pass."""
    if run is None:
        return
    import wandb

    run.log(
        {
            "val/roc": wandb.plot.roc_curve(labels, probs, labels=classes),
            "val/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=labels.tolist(), preds=probs.argmax(1).tolist(), class_names=classes
            ),
        },
        step=step,
    )


def prediction_order(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Row order of the predictions table: misclassified first, the most confident mistakes on top."""
    pred = probs.argmax(1)
    confidence = probs[np.arange(len(pred)), pred]
    return np.lexsort((-confidence, pred == labels))[:TABLE_ROWS]


def log_predictions(run, keys, labels, probs, classes, thumbnails: dict, step: int) -> None:
    """The validation predictions table: thumbnail (what the model saw), true and predicted class, the
    class probabilities."""
    if run is None:
        return
    import wandb

    columns = ["id", "image", "true", "predicted", "correct", *[f"p_{c}" for c in classes]]
    rows = []
    for i in prediction_order(labels, probs):
        pred = int(probs[i].argmax())
        image = wandb.Image(thumbnails[keys[i]]) if keys[i] in thumbnails else None
        p = [round(float(v), 4) for v in probs[i]]
        rows.append([keys[i], image, classes[labels[i]], classes[pred], bool(pred == labels[i]), *p])
    run.log({"val/predictions": wandb.Table(columns=columns, data=rows)}, step=step)


def log_checkpoint(run, ckpt: Path, aliases: list[str], metadata: dict) -> None:
    """A checkpoint's inference files (model.pt, config.yaml, info.json: what `evaluate` and `predict`
    load) and its model card (MODEL_CARD.md, card.json) as a version of the run's `model-<id>` artifact.
    Copied now (wandb stages them): `publish` may remove the checkpoint folder before an offline run is
    synced."""
    if run is None:
        return
    import wandb

    artifact = wandb.Artifact(
        f"model-{run.id}", type="model", metadata={k: v for k, v in metadata.items() if _finite(v)}
    )
    for name in ("model.pt", "config.yaml", "info.json", "MODEL_CARD.md", "card.json"):  # all in every save
        artifact.add_file(str(Path(ckpt) / name), name=name)
    run.log_artifact(artifact, aliases=aliases)


def _finite(v) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def record(run) -> dict | None:
    """What run.json keeps of the W&B run (None when W&B is off or WANDB_MODE=disabled)."""
    if run is None or run.settings.mode not in ("online", "offline"):
        return None
    return {"id": run.id, "mode": run.settings.mode, "dir": str(Path(run.dir).parent)}


def describe(run, run_dir: Path, end: bool = False) -> str | None:
    """Where the run goes (at the start) or went (at the end) and, offline, the one command that uploads
    every segment of it (each resume or requeue adds a folder under RUN/wandb)."""
    if run is None or run.settings.mode not in ("online", "offline"):
        return None
    wandb_dir = Path(run_dir) / "wandb"
    offline = [d for d in wandb_dir.glob(f"offline-run-*-{run.id}") if not list(d.glob("*.wandb.synced"))]
    if run.settings.mode == "online":
        note = f"W&B run: {run.url}"
        return note + (f"; its offline segments: wandb sync {wandb_dir}" if end and offline else "")
    if not end:
        return f"W&B run (offline) in {Path(run.dir).parent}; upload it later with: wandb sync {wandb_dir}"
    return (
        f"W&B run (offline, {len(offline)} segment(s) under {wandb_dir}); upload every segment with: "
        f"wandb sync {wandb_dir}"
    )
