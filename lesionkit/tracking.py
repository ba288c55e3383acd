"""W&B through Accelerate's trackers. Every function here is a no-op unless W&B is on; the trainer
calls them on the main process only (Accelerate's `log` is already main-process-only).

Without `WANDB_API_KEY` (and no explicit `WANDB_MODE`), runs are written offline under the run
folder and can be uploaded later with `wandb sync`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np


def setup_wandb_env() -> str:
    """Pick online/offline before anything imports wandb; returns the mode."""
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    return os.environ.get("WANDB_MODE", "online")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def init_kwargs(run_dir: Path, run_id: str, run_name: str) -> dict:
    """Same id on resume, so a requeued or resumed job continues the same W&B run."""
    return {"wandb": {"dir": str(run_dir), "id": run_id, "resume": "allow", "name": run_name or None}}


def wandb_run(accelerator):
    """The live wandb run on the main process, else None."""
    if not accelerator.is_main_process or "wandb" not in [t.name for t in accelerator.trackers]:
        return None
    return accelerator.get_tracker("wandb", unwrap=True)


def log_class_distribution(accelerator, counts: dict[str, int]) -> None:
    run = wandb_run(accelerator)
    if run is None:
        return
    import wandb

    table = wandb.Table(data=[[k, v] for k, v in counts.items()], columns=["class", "count"])
    run.log({"data/class_distribution": wandb.plot.bar(table, "class", "count", title="Training classes")})


def log_eval_plots(accelerator, labels: np.ndarray, probs: np.ndarray, classes: list[str], step: int) -> None:
    """ROC curves and the confusion matrix of one validation pass."""
    run = wandb_run(accelerator)
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


def describe(accelerator) -> str | None:
    """Where the run went and, offline, how to upload it."""
    run = wandb_run(accelerator)
    if run is None:
        return None
    run_dir = Path(run.dir).parent
    if run.settings.mode == "offline":
        return f"W&B run (offline) in {run_dir}; upload with: wandb sync {run_dir}"
    return f"W&B run: {run.url}"
