"""Every rank-0 side effect of a training run in one place: the console (start line, progress bar, the
per-epoch table, the final line), W&B (through Accelerate's tracker) and the run folder's JSON records
(`metrics.json`, `world.json`, `status.json`). On other ranks every method is a no-op, so the loop calls
them unconditionally.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from lesionkit import tracking
from lesionkit.atomic import write_json

FIXED_COLUMNS = ("epoch", "train_loss", "val_loss")
RUN_COLUMNS = ("lr", "data_wait", "time_s", "corrupt", "nonfinite")


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


class Reporter:
    def __init__(self, accelerator, cfg, columns: list[str], monitor):
        self.accelerator, self.cfg, self.monitor = accelerator, cfg, monitor
        self.main = accelerator.is_main_process
        self.run_dir = Path(cfg.output_dir)
        self.columns = [*FIXED_COLUMNS, *columns, *RUN_COLUMNS]

    def print(self, message: str) -> None:
        if self.main:
            print(f"lesionkit: {message}", flush=True)

    # ---- start -----------------------------------------------------------------------------------------
    def start(self, state, counts: dict[str, int], description: str) -> None:
        """Open the W&B run (same id on resume), then the start line, the table header and, on resume,
        the rows of the epochs already done."""
        if self.cfg.wandb:
            self.accelerator.init_trackers(
                self.cfg.wandb_project,
                config=self.cfg.to_dict(),
                init_kwargs=tracking.init_kwargs(self.run_dir, state.wandb_id, self.cfg.run_name),
            )
            tracking.log_class_distribution(self.accelerator, counts)
        self.print(description)
        if self.main:
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
        return tqdm(
            total=total,
            initial=done,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            leave=False,
            disable=not self.main,
            file=sys.stdout,
        )

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.main and global_step % 10 == 0:
            self.accelerator.log({"train/loss": loss, "train/lr": lr}, step=global_step)

    # ---- epochs ----------------------------------------------------------------------------------------
    def epoch(self, state, stats, metrics: dict, lr: float, seconds: float, val_y, val_p, classes) -> dict:
        """The epoch's table row (returned for the loop state's history): printed, logged, and the
        validation metrics written to metrics.json."""
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
            self.accelerator.log(
                {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
                | {
                    "epoch": state.epoch,
                    "train/epoch_loss": row["train_loss"],
                    "train/data_wait_fraction": row["data_wait"],
                    "train/skipped_corrupt": row["corrupt"],
                    "train/skipped_nonfinite": row["nonfinite"],
                },
                step=state.global_step,
            )
            tracking.log_eval_plots(self.accelerator, val_y, val_p, classes, state.global_step)
            write_json(
                self.run_dir / "metrics.json",
                {"epoch": state.epoch, "best": state.best, "monitor": self.monitor.name, **metrics},
            )
        return row

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
            note = tracking.describe(self.accelerator)
            if note:
                print(note, flush=True)
        self.accelerator.end_training()
