"""Every rank-0 side effect of a training run in one place: the console (start line, progress, the
per-epoch table, the final line), W&B (through Accelerate's tracker: `tracking`) and the run folder's
records (`run.json` and `config.yaml` at each start, `metrics.json`, `world.json`, `status.json`). On
other ranks every method is a no-op, so the loop calls them unconditionally.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from lesionkit import labelmaps, modelcard, runs, tracking
from lesionkit.atomic import write_json

FIXED_COLUMNS = ("epoch", "train_loss", "val_loss")
RUN_COLUMNS = ("lr", "data_wait", "time_s", "corrupt", "nonfinite")
THUMBNAIL = 64  # pixels, of the images in the W&B predictions table


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class LineProgress:
    """The progress bar of a non-interactive run (a Slurm .out file, a CI log): one whole line, formatted by
    tqdm, every 10 % of the epoch or every minute, instead of tqdm's carriage-return redraws of every step
    (measured in docs/training.md: the 12-epoch demo's log shrinks from about 200 KB to a few KB)."""

    BAR = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, total: int, initial: int, desc: str, fraction: float = 0.1, seconds: float = 60.0):
        self.total, self.initial, self.n, self.shown, self.desc = total, initial, initial, initial, desc
        self.every, self.seconds, self.postfix = max(1, math.ceil(total * fraction)), seconds, ""
        self.start = self.last = time.monotonic()
        self.next = initial + self.every

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.n >= self.next or now - self.last >= self.seconds:
            self._write(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n > self.shown:  # an epoch cut short (a stop request) still says where it ended
            self._write(time.monotonic())

    def _write(self, now: float) -> None:
        line = tqdm.format_meter(
            self.n,
            self.total,
            now - self.start,
            prefix=self.desc,
            postfix=self.postfix,
            bar_format=self.BAR,
            initial=self.initial,
        )
        print(line, flush=True)
        self.last, self.shown, self.next = now, self.n, (self.n // self.every + 1) * self.every


class Reporter:
    def __init__(self, accelerator, cfg, columns: list[str], monitor):
        self.accelerator, self.cfg, self.monitor = accelerator, cfg, monitor
        self.main = accelerator.is_main_process
        self.run_dir = Path(cfg.output_dir)
        self.columns = [*FIXED_COLUMNS, *columns, *RUN_COLUMNS]
        self.wandb = None  # the live W&B run (main process, W&B on)
        self.defined: set[str] = set()  # validation metrics declared to W&B in this process
        self._training_facts: dict | None = None  # the model card's data and recipe, read at the first save

    def print(self, message: str) -> None:
        if self.main:
            print(f"lesionkit: {message}", flush=True)

    # ---- start -----------------------------------------------------------------------------------------
    def start(self, state, counts: dict[str, int], description: str) -> None:
        """Open the W&B run (a new id for a new run, the same one on resume), write this start's records,
        then the start line, where W&B writes, the table header and, on resume, the rows of the epochs
        already done."""
        new_run = not state.wandb_id
        if new_run:
            state.wandb_id = tracking.new_run_id()
        run_facts = runs.facts(self.cfg, self.accelerator) if self.main else {}
        if self.cfg.wandb:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fallback = tracking.start(
                self.accelerator,
                self.cfg.wandb_project,
                tracking.run_config(self.cfg, run_facts),
                tracking.init_kwargs(self.run_dir, state.wandb_id, self.cfg),
            )
            if fallback:
                self.print(fallback)
            self.wandb = tracking.wandb_run(self.accelerator)
            tracking.define_metrics(self.wandb, self.monitor)
            if new_run:  # once per W&B run, not again on every resume
                tracking.log_class_distribution(self.wandb, counts, state.global_step)
            elif (self.run_dir / "best" / "info.json").is_file():  # this segment's summary starts at the best
                best = json.loads((self.run_dir / "best" / "info.json").read_text())
                tracking.set_best_summary(self.wandb, best["metrics"], best["epoch"])
        if not self.main:
            return
        runs.write_records(
            self.run_dir,
            self.cfg,
            runs.segment(self.cfg, self.accelerator, run_facts, state)
            | {"wandb": tracking.record(self.wandb)},
        )
        self.print(description)
        note = tracking.describe(self.wandb, self.run_dir)
        if note:
            self.print(note)
        print(self._line(), flush=True)
        for row in state.history:
            print(self._line(row), flush=True)

    def _line(self, row: dict | None = None) -> str:
        widths = [max(len(c), 7) for c in self.columns]
        if row is None:
            return " ".join(f"{c:>{w}}" for c, w in zip(self.columns, widths))
        return " ".join(f"{_fmt(row.get(c)):>{w}}" for c, w in zip(self.columns, widths))

    # ---- steps -----------------------------------------------------------------------------------------
    def progress(self, total: int, done: int, epoch: int):
        """tqdm's bar on a terminal; whole lines every few percent in a log file (`LineProgress`)."""
        desc = f"epoch {epoch + 1}/{self.cfg.epochs}"
        if self.main and not sys.stdout.isatty():
            return LineProgress(total, done, desc)
        return tqdm(total=total, initial=done, desc=desc, leave=False, disable=not self.main, file=sys.stdout)

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.main and global_step % 10 == 0:
            self.accelerator.log({"train/loss": loss, "train/lr": lr}, step=global_step)

    # ---- epochs ----------------------------------------------------------------------------------------
    def epoch(
        self, state, stats, metrics: dict, lr: float, seconds: float, val_y, val_p, classes, keys, best: bool
    ) -> dict:
        """The epoch's table row (returned for the loop state's history): printed, logged, and the
        validation metrics written to metrics.json. At a new best epoch, the W&B summary takes its metrics
        and the predictions table is logged."""
        row = {
            "epoch": state.epoch,
            "train_loss": stats.loss,
            "val_loss": metrics["loss"],
            **{c: metrics.get(c) for c in self.columns[len(FIXED_COLUMNS) : -len(RUN_COLUMNS)]},
            "lr": lr,
            "data_wait": stats.data_wait,
            "time_s": seconds,
            "corrupt": stats.skipped_corrupt,
            "nonfinite": stats.skipped_nonfinite,
        }
        if self.main:
            print(self._line(row), flush=True)
            values = {f"val/{k}": v for k, v in _numbers(metrics).items()}
            tracking.define_validation_metrics(self.wandb, values, self.defined)
            self.accelerator.log(
                values
                | {
                    "epoch": state.epoch,
                    "train/epoch_loss": row["train_loss"],
                    "train/data_wait_fraction": row["data_wait"],
                    "train/skipped_corrupt": row["corrupt"],
                    "train/skipped_nonfinite": row["nonfinite"],
                }
                | ({f"best/{self.monitor.name}": state.best} if math.isfinite(state.best) else {}),
                step=state.global_step,
            )
            tracking.log_eval_plots(self.wandb, val_y, val_p, classes, state.global_step)
            if best and self.wandb is not None:
                tracking.set_best_summary(self.wandb, metrics, state.epoch)
                thumbnails = self._thumbnails({keys[i] for i in tracking.prediction_order(val_y, val_p)})
                tracking.log_predictions(
                    self.wandb, keys, val_y, val_p, classes, thumbnails, state.global_step
                )
            write_json(
                self.run_dir / "metrics.json",
                {"epoch": state.epoch, "best": state.best, "monitor": self.monitor.name, **metrics},
            )
        return row

    def _thumbnails(self, keys: set[str]) -> dict:
        """The validation images of `keys` as the model saw them (centre crop), THUMBNAIL px square, HWC."""
        from lesionkit.data import eval_loader

        cfg, size, found = self.cfg, min(THUMBNAIL, self.cfg.image_size), {}
        # what the trainer validates on: --val, or fold K of --train with --fold K
        source, folds = labelmaps.validation_folders(cfg), None if cfg.val else [cfg.fold]
        reader = eval_loader(
            source, image_size=size, batch_size=64, workers=0, rank=0, world_size=1, folds=folds
        )
        for batch in reader:
            for key, image in zip(batch.keys, batch.images):
                if key in keys:
                    found[key] = image.permute(1, 2, 0).numpy()
        return found

    def model_card(self, folder: Path, task, classes, metrics: dict, val_y=None, val_p=None) -> None:
        """MODEL_CARD.md (and its facts, card.json) into a checkpoint folder before it is published."""
        if self.main:
            if self._training_facts is None:  # the manifests are read once per run, not at every save
                self._training_facts = modelcard.training_facts(self.cfg)
            modelcard.record_training(folder, self._training_facts, task, classes, metrics, val_y, val_p)

    def saved(self, state, metrics: dict, best: bool) -> None:
        """After an epoch's checkpoint is published: `--wandb-log-model` uploads it (best: each new best;
        all: every epoch's), aliases `best`/`last` moving to the newest version that earns them."""
        mode = self.cfg.wandb_log_model
        if self.wandb is None or mode == "none" or (mode == "best" and not best):
            return
        aliases = [f"epoch-{state.epoch}", *(["best"] if best else []), *(["last"] if mode == "all" else [])]
        tracking.log_checkpoint(
            self.wandb,
            (self.run_dir / "last").resolve(),
            aliases,
            {
                "epoch": state.epoch,
                "global_step": state.global_step,
                "monitor": self.monitor.name,
                "score": metrics.get(self.monitor.name),
                "best": best,
                **{f"val/{k}": v for k, v in _numbers(metrics).items()},
            },
        )

    # ---- end -------------------------------------------------------------------------------------------
    def finish(self, state, status: str, world_size: int, digests: list[str]) -> None:
        """world.json (world size, each rank's weights digest), status.json, the closing lines."""
        if self.main:
            write_json(self.run_dir / "world.json", {"world_size": world_size, "weights_sha256": digests})
            write_json(
                self.run_dir / "status.json",
                {"status": status, "epoch": state.epoch, "step": state.step, "best": state.best},
            )
            if status == "completed" and state.history:
                last = state.history[-1]
                aucs = ", ".join(
                    f"{k[4:]} {v:.3f}"
                    for k, v in last.items()
                    if k.startswith("auc_") and k != "auc_macro" and v is not None
                )
                self.print(
                    f"done. best {self.monitor.name} {state.best:.4f}"
                    + (f"; final validation AUCs: {aucs}" if aucs else "")
                    + f"; checkpoints in {self.run_dir}/best, {self.run_dir}/last"
                )
            note = tracking.describe(self.wandb, self.run_dir, end=True)
            if note:
                self.print(note)
        self.accelerator.end_training()
