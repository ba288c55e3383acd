"""Train a lesion classifier: `accelerate launch lesionkit/train.py --config resnet18 --train DIR --val DIR`.

One process or many (DDP through Accelerate), CPU or GPU, mixed precision from the accelerate config
or `--mixed-precision`. The loop is `main()`; everything it calls is named for what it does.

Distributed rules this file keeps (each one is a known way to get silently wrong results):
- the WebDataset loader is NOT passed through `accelerator.prepare` (it would drop half the data);
  `data.train_loader` splits shards by rank itself and gives every rank the same number of batches;
- the LR scheduler is stepped once per epoch by us, not prepared (Accelerate would step it once per
  process), and ReduceLROnPlateau sees the metric gathered from all ranks;
- validation metrics, early stopping, NaN detection and preemption are decided from all-reduced or
  all-gathered values, so every rank takes the same branch;
- every random draw of a step is seeded from (seed, epoch, step, rank), so a resumed run replays
  exactly what the uninterrupted run would have done.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from tqdm.auto import tqdm

from lesionkit import checkpoint, tracking
from lesionkit.atomic import write_json
from lesionkit import seeds
from lesionkit.augment import build_augment, build_mixup, choose_placement
from lesionkit.config import ConfigError, TrainConfig, add_config_flags, config_from_args
from lesionkit.data import CorruptDataError, dataset_info, error_message, eval_loader, train_loader
from lesionkit.inference import gather_predictions, predict_logits
from lesionkit.metrics import compute_metrics, softmax_views
from lesionkit.models import (
    create_model,
    freeze_backbone,
    freeze_leading_blocks,
    input_stats,
    list_models,
    prepare_model,
)
from lesionkit.optim import build_optimizer, build_scheduler, step_scheduler

DEMO_SHARDS = Path("shards/demo")


class TrainingError(RuntimeError):
    """A failure the user must see as one clear message (non-finite loss, bad data, ...)."""


@dataclass
class LoopState:
    """What `--resume` needs beyond the model/optimizer: where we are and what early stopping knows."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches completed inside `epoch` (non-zero only for a preemption checkpoint)
    global_step: int = 0
    best: float = -math.inf
    bad_epochs: int = 0
    wandb_id: str = ""
    history: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- setup


def check_config(cfg: TrainConfig) -> None:
    """Fail before any process group starts, with one line that lists the valid choices."""
    if cfg.model not in list_models():
        raise ConfigError(f"unknown model {cfg.model!r}; valid models: {', '.join(list_models())}")
    from lesionkit.augment import preset_params

    try:
        preset_params(cfg.augment, **cfg.augment_overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    for split in ("train", "val"):
        for d in getattr(cfg, split):
            if not (Path(d) / "manifest.json").is_file():
                raise ConfigError(f"--{split} {d}: no manifest.json there (pack images with `lesionkit pack`)")
    if cfg.train and cfg.val:
        try:
            classes, val_classes = dataset_info(cfg.train)[0], dataset_info(cfg.val)[0]
        except (OSError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if val_classes != classes:
            raise ConfigError(f"class sets differ: --train has {classes}, --val has {val_classes}")
    check_resume(cfg)


def check_resume(cfg: TrainConfig) -> None:
    """`--resume` into a run of another model or class set: say so now, not as a state-dict error later."""
    ckpt = checkpoint.latest(Path(cfg.output_dir)) if cfg.resume else None
    if ckpt is None:
        return
    info = json.loads((ckpt / "info.json").read_text())
    if info["model"] != cfg.model:
        raise ConfigError(f"--resume: {ckpt} is a {info['model']} checkpoint, not {cfg.model}; pass --model "
                          f"{info['model']} or another --output-dir")
    if cfg.train and info["classes"] != dataset_info(cfg.train)[0]:
        raise ConfigError(f"--resume: {ckpt} was trained on classes {info['classes']}, --train has "
                          f"{dataset_info(cfg.train)[0]}")


def probe_writable(output_dir: Path) -> None:
    """Learn that the output folder is unwritable or the disk full now, not at the first checkpoint."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output dir {output_dir} is not writable: {e.strerror or e}") from None


def use_demo_data(cfg: TrainConfig) -> TrainConfig:
    """No --train/--val: the synthetic demo shards (made once by `lesionkit.demo.ensure_demo_shards`)."""
    if cfg.train and cfg.val:
        return cfg
    from lesionkit.demo import ensure_demo_shards

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (DEMO_SHARDS / "val" / "manifest.json").exists():
        raise ConfigError("no --train/--val and no demo shards yet; make them once with: python -m lesionkit.demo "
                          "--prepare-only (or pass --train/--val)")
    train_dir, val_dir = ensure_demo_shards(DEMO_SHARDS)
    print(f"lesionkit: no --train/--val given; using the synthetic demo shards in {DEMO_SHARDS}/", flush=True)
    cfg.train, cfg.val = cfg.train or [str(train_dir)], cfg.val or [str(val_dir)]
    return cfg


def mixed_precision(cfg: TrainConfig) -> str | None:
    """`auto`: what `accelerate launch` configured, else bf16 on a GPU that has it (fp32's range, about twice
    its throughput, no loss scaling); None lets Accelerate decide (fp32 on CPUs, which lack fast bf16)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if "ACCELERATE_MIXED_PRECISION" in os.environ or cfg.cpu or not torch.cuda.is_available():
        return None
    return "bf16" if torch.cuda.is_bf16_supported() else None


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    kwargs = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))]
    if cfg.freeze_epochs:  # frozen backbone params get no grads during the first epochs
        kwargs.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    if cfg.wandb:
        tracking.setup_wandb_env()
    return Accelerator(
        # Without a GPU, cpu=True is what makes a multi-process launch a real (gloo) DDP job; a YAML
        # with use_cpu alone starts N unsynchronised single processes.
        cpu=cfg.cpu or not torch.cuda.is_available(),
        mixed_precision=mixed_precision(cfg),
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="wandb" if cfg.wandb else None,
        project_dir=cfg.output_dir,
        kwargs_handlers=kwargs,
    )


def class_weight_tensor(counts: dict[str, int], classes: list[str]) -> torch.Tensor:
    """Inverse class frequency, normalised so a balanced set gets weight 1 everywhere."""
    n = torch.tensor([max(counts.get(c, 0), 1) for c in classes], dtype=torch.float32)
    return n.sum() / (len(classes) * n)


def seed_step(cfg: TrainConfig, epoch: int, step: int, rank: int) -> None:
    """Seed augmentation, mixup and dropout for one step from (seed, epoch, step, rank) alone."""
    torch.manual_seed(seeds.derive(seeds.STEP, cfg.seed, epoch, step, rank))


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class StopRequest:
    """SIGUSR1 (Slurm's pre-emption warning) or SIGTERM: finish the step, checkpoint, exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    @staticmethod
    def ignore_repeats():
        """Once `last/` is saved, a repeated signal must not kill the exiting process (the default
        action of SIGUSR1 is to terminate, with a traceback)."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------- steps


def total(accelerator, *values) -> list[float]:
    """Sum a few numbers (floats, bools or 0-d device tensors) over all ranks in one collective; every
    rank gets the sums. One host-device sync however many values, so the loop pays one per step."""
    t = torch.stack([v.float().reshape(()) if torch.is_tensor(v)  # device values stay there (no sync)
                     else torch.full((), float(v), device=accelerator.device) for v in values])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def train_one_epoch(cfg, accelerator, model, optimizer, loader, augment, mixup, class_weights, state, stop,
                    ema, skip_batches: int, pbar) -> dict:
    model.train()
    rank, device = accelerator.process_index, accelerator.device
    totals = {"loss": 0.0, "n": 0, "data_s": 0.0, "compute_s": 0.0, "skipped_nonfinite": 0}
    corrupt_before = loader.skipped  # --skip-corrupt: samples the loader skipped (summed over ranks below)
    tick = time.perf_counter()
    for step, (images, labels, keys) in enumerate(loader):
        if step < skip_batches:  # resuming a pre-empted epoch: replay the stream up to where we were
            continue
        t_data = time.perf_counter()
        seed_step(cfg, state.epoch, step, rank)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if augment is not None:
            images = augment(images)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels if mixup is None else None
        if mixup is not None:
            images, targets = mixup(images, labels)  # soft targets [B, C]
        with accelerator.accumulate(model), accelerator.autocast():
            logits = model(images).float()
            loss = F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=cfg.label_smoothing)
            # the step's only sync: every rank learns if any loss is non-finite or any rank must stop
            bad, stops, loss_sum = total(accelerator, ~torch.isfinite(loss.detach()), stop.requested, loss.detach())
            nonfinite, stop_now, step_loss = bad > 0, stops > 0, loss_sum / accelerator.num_processes
            if nonfinite and not cfg.skip_nonfinite:
                raise TrainingError(
                    f"non-finite loss at epoch {state.epoch} step {step} (global step {state.global_step}), "
                    f"lr {optimizer.param_groups[0]['lr']:.3g}, batch keys {list(keys)[:8]}"
                    " (the last good checkpoint is intact; --skip-nonfinite skips such steps)"
                )
            if nonfinite:
                totals["skipped_nonfinite"] += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                accelerator.backward(loss)
                if cfg.clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None and accelerator.sync_gradients:
                    ema.update_parameters(accelerator.unwrap_model(model))
                totals["loss"] += step_loss * labels.shape[0]
                totals["n"] += labels.shape[0]
        state.step, state.global_step = step + 1, state.global_step + 1
        now = time.perf_counter()
        totals["data_s"] += t_data - tick
        totals["compute_s"] += now - t_data
        tick = now
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{step_loss:.3f}")
        if accelerator.is_main_process and state.global_step % 10 == 0:
            accelerator.log({"train/loss": step_loss, "train/lr": optimizer.param_groups[0]["lr"]},
                            step=state.global_step)
        if stop_now:
            totals["stopped"] = True
            break
    totals["skipped_corrupt"] = int(total(accelerator, loader.skipped - corrupt_before)[0])
    return totals


def validate(cfg, accelerator, model, loader, preprocess, classes):
    """Score every validation sample exactly once across ranks (averaging `val_tta` views, as `evaluate
    --tta` does); every rank gets the same metrics."""
    keys, labels, logits = predict_logits(model, loader, accelerator.device, preprocess, cfg.val_tta,
                                          autocast=accelerator.autocast)
    _, y, logits = gather_predictions(accelerator, keys, labels, logits)
    if not np.isfinite(logits).all():  # every rank sees the same gathered outputs, so all stop here together
        raise TrainingError("validation outputs are not finite: the weights diverged (lower --lr or set "
                            "--clip-grad; the last good checkpoint is intact)")
    p = softmax_views(logits)
    metrics = compute_metrics(y, p, classes)
    metrics["loss"] = metrics["nll"]  # cross-entropy of the (view-averaged) probabilities
    return metrics, y, p


def save_checkpoint(cfg, accelerator, model, scheduler, ema, state, classes, metrics, best: bool) -> None:
    """Every rank writes its part into a staging folder; the main process publishes it atomically."""
    run_dir = Path(cfg.output_dir)
    name = checkpoint.checkpoint_name(state.epoch, state.step)
    staging = checkpoint.staging_dir(run_dir, name)
    try:
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            checkpoint.save_trainer_state(staging, {
                "loop": {k: v for k, v in vars(state).items()},
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
            })
            weights = (ema.module if ema is not None else accelerator.unwrap_model(model)).state_dict()
            mean, std = input_stats(cfg.model)
            checkpoint.write_inference_files(staging, {k: v.cpu() for k, v in weights.items()}, cfg, {
                "classes": classes, "model": cfg.model, "image_size": cfg.image_size, "mean": list(mean),
                "std": list(std), "color_constancy": cfg.color_constancy, "epoch": state.epoch,
                "step": state.step, "metrics": metrics,
            })
    except (OSError, RuntimeError, SafetensorError) as e:  # disk full, quota, size limit (torch, safetensors)
        shutil.rmtree(staging, ignore_errors=True)
        why = e.strerror if isinstance(e, OSError) else str(e).strip().splitlines()[0]
        raise TrainingError(f"could not write checkpoint {name} in {staging.parent} ({why}): disk full or not "
                            f"writable? {run_dir}/last is unchanged") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.publish(run_dir, name, best=best)
    accelerator.wait_for_everyone()


def resume(cfg, accelerator, scheduler, ema) -> LoopState:
    ckpt = checkpoint.latest(Path(cfg.output_dir))
    if ckpt is None:
        accelerator.print(f"lesionkit: --resume: no checkpoint in {cfg.output_dir}/last yet, starting fresh")
        return LoopState()
    checkpoint.verify_loadable(ckpt)
    accelerator.load_state(str(ckpt))
    saved = checkpoint.load_trainer_state(ckpt)
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if ema is not None and saved["ema"] is not None:
        ema.load_state_dict(saved["ema"])
    state = LoopState(**saved["loop"])
    accelerator.print(f"lesionkit: resumed from {ckpt} (epoch {state.epoch}, step {state.step})")
    return state


# ---------------------------------------------------------------------------------------------- report


EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "auc_melanoma", "auc_seborrheic_keratosis", "isic2017_score",
                 "balanced_accuracy", "lr", "data_wait", "time_s", "corrupt", "nonfinite")


def epoch_row(epoch, totals, metrics, lr, seconds) -> dict:
    busy = totals["data_s"] + totals["compute_s"]
    return {
        "epoch": epoch, "train_loss": totals["loss"] / max(totals["n"], 1), "val_loss": metrics["loss"],
        **{k: metrics.get(k) for k in EPOCH_COLUMNS[3:7]},
        "lr": lr, "data_wait": totals["data_s"] / busy if busy else 0.0, "time_s": seconds,
        # samples skipped by --skip-corrupt, steps skipped by --skip-nonfinite
        "corrupt": totals["skipped_corrupt"], "nonfinite": totals["skipped_nonfinite"],
    }


def format_row(row: dict, header: bool = False) -> str:
    widths = [5, 10, 8, 12, 24, 14, 17, 9, 9, 7, 7, 9]
    if header:
        return " ".join(f"{c:>{w}}" for c, w in zip(EPOCH_COLUMNS, widths))

    def fmt(v):
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    return " ".join(f"{fmt(row.get(c)):>{w}}" for c, w in zip(EPOCH_COLUMNS, widths))  # .get: older histories


# ---------------------------------------------------------------------------------------------- main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        check_config(cfg)
        probe_writable(Path(cfg.output_dir))
    except ConfigError as e:
        print(f"lesionkit train: error: {e}", file=sys.stderr)
        return 2
    try:
        return train(cfg)
    except (TrainingError, ConfigError, checkpoint.CheckpointError) as e:
        print(f"lesionkit train: error: {e}", file=sys.stderr, flush=True)
        return 1
    except CorruptDataError as e:  # validation never skips; training without --skip-corrupt does not either
        print(f"lesionkit train: error: {error_message(e)}", file=sys.stderr, flush=True)
        return 1


def train(cfg: TrainConfig) -> int:
    cfg = use_demo_data(cfg)
    accelerator = make_accelerator(cfg)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    run_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:  # before `prepare`: no rank can reach a save before rank 0 gets there
        for stale in checkpoint.clean_staging(run_dir):
            print(f"lesionkit: removed {stale}, an unfinished checkpoint of an interrupted run", flush=True)
    classes, counts, _ = dataset_info(cfg.train)
    stop = StopRequest()

    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # same initial weights on every rank and in every rerun
    model = create_model(cfg.model, num_classes=len(classes), pretrained=cfg.pretrained, weights=cfg.weights)
    if cfg.freeze_blocks:
        freeze_leading_blocks(model, cfg.freeze_blocks)
    model = prepare_model(model, channels_last=cfg.channels_last, compile=cfg.compile)
    optimizer = build_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(cfg, optimizer)
    ema = None
    if cfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))

    mean, std = input_stats(cfg.model)
    placement = choose_placement(device.type, cfg.augment) if cfg.augment_placement == "auto" \
        else cfg.augment_placement
    augment = build_augment(cfg.augment, cfg.image_size, mean, std, color_constancy=cfg.color_constancy,
                            **cfg.augment_overrides)
    preprocess = build_augment("none", cfg.image_size, mean, std, color_constancy=cfg.color_constancy)
    preprocess.eval().to(device)
    worker_augment = augment if placement == "workers" else None
    device_augment = None if placement == "workers" else augment.to(device)
    mixup = build_mixup(len(classes), cfg.mixup_alpha, cfg.cutmix_alpha)
    class_weights = class_weight_tensor(counts, classes).to(device) if cfg.class_weights else None

    state = resume(cfg, accelerator, scheduler, ema) if cfg.resume else LoopState()
    if accelerator.is_main_process:
        state.wandb_id = state.wandb_id or tracking.new_run_id()
    if cfg.wandb:
        accelerator.init_trackers(cfg.wandb_project, config=cfg.to_dict(),
                                  init_kwargs=tracking.init_kwargs(run_dir, state.wandb_id, cfg.run_name))
        tracking.log_class_distribution(accelerator, counts)
    val_loader = eval_loader(cfg.val, image_size=cfg.image_size, batch_size=cfg.batch_size,
                             workers=cfg.workers, rank=rank, world_size=world)
    accelerator.print(f"lesionkit: {cfg.model} on {world} x {device.type}, mixed precision "
                      f"{accelerator.mixed_precision}, augment {cfg.augment} on {placement}, "
                      f"classes {classes}, train {sum(counts.values())} samples")
    if accelerator.is_main_process:
        print(format_row({}, header=True), flush=True)
        for row in state.history:
            print(format_row(row), flush=True)

    loader = train_loader(cfg.train, image_size=cfg.image_size, batch_size=cfg.batch_size, workers=cfg.workers,
                          seed=cfg.seed, epoch=state.epoch, rank=rank, world_size=world,
                          shuffle_buffer=cfg.shuffle_buffer, balanced=cfg.balanced,
                          batch_transform=worker_augment, skip_corrupt=cfg.skip_corrupt,
                          max_batches=cfg.max_steps_per_epoch)
    status = "completed"
    while state.epoch < cfg.epochs:
        epoch, t0 = state.epoch, time.perf_counter()
        if cfg.freeze_epochs:
            freeze_backbone(accelerator.unwrap_model(model), frozen=epoch < cfg.freeze_epochs)
            freeze_leading_blocks(accelerator.unwrap_model(model), cfg.freeze_blocks)
        loader.set_epoch(epoch)
        skip = state.step
        pbar = tqdm(total=len(loader), initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                    disable=not accelerator.is_main_process, file=sys.stdout)
        totals = train_one_epoch(cfg, accelerator, model, optimizer, loader, device_augment, mixup,
                                 class_weights, state, stop, ema, skip, pbar)
        pbar.close()
        if totals.get("stopped"):
            save_checkpoint(cfg, accelerator, model, scheduler, ema, state, classes, {}, best=False)
            stop.ignore_repeats()
            accelerator.print(f"lesionkit: stop requested; saved {run_dir}/last at epoch {epoch} step "
                              f"{state.step}; rerun with --resume to continue")
            status = "preempted"
            break
        eval_model = ema.module if ema is not None else model
        metrics, val_y, val_p = validate(cfg, accelerator, eval_model, val_loader, preprocess, classes)
        lr = optimizer.param_groups[0]["lr"]
        step_scheduler(scheduler, metrics.get(cfg.monitor))
        score = metrics.get(cfg.monitor)
        improved = score is not None and score > state.best
        state.best, state.bad_epochs = (score, 0) if improved else (state.best, state.bad_epochs + 1)
        state.epoch, state.step = epoch + 1, 0
        row = epoch_row(epoch + 1, totals, metrics, lr, time.perf_counter() - t0)
        state.history.append(row)
        save_checkpoint(cfg, accelerator, model, scheduler, ema, state, classes, metrics, best=improved)
        if accelerator.is_main_process:
            print(format_row(row), flush=True)
            accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
                            | {"epoch": epoch + 1, "train/epoch_loss": row["train_loss"],
                               "train/data_wait_fraction": row["data_wait"],
                               "train/skipped_corrupt": row["corrupt"], "train/skipped_nonfinite": row["nonfinite"]},
                            step=state.global_step)
            tracking.log_eval_plots(accelerator, val_y, val_p, classes, state.global_step)
            write_json(run_dir / "metrics.json", {"epoch": epoch + 1, "best": state.best,
                                                         "monitor": cfg.monitor, **metrics})
        if cfg.early_stop_patience and state.bad_epochs >= cfg.early_stop_patience:
            accelerator.print(f"lesionkit: early stopping at epoch {epoch + 1}: {cfg.monitor} has not "
                              f"improved for {state.bad_epochs} epochs (best {state.best:.4f})")
            break

    finish(cfg, accelerator, model, state, status)
    return 0


def finish(cfg, accelerator, model, state, status: str) -> None:
    from accelerate.utils import gather_object

    digests = gather_object([weights_digest(accelerator.unwrap_model(model))])
    if accelerator.is_main_process:
        run_dir = Path(cfg.output_dir)
        write_json(run_dir / "world.json", {"world_size": accelerator.num_processes,
                                                   "weights_sha256": digests})
        write_json(run_dir / "status.json", {"status": status, "epoch": state.epoch,
                                                    "step": state.step, "best": state.best})
        if status == "completed" and state.history:
            last = state.history[-1]
            aucs = ", ".join(f"{k[4:]} {v:.3f}" for k, v in last.items() if k.startswith("auc_") and v is not None)
            accelerator.print(f"lesionkit: done. best {cfg.monitor} {state.best:.4f}; final validation AUCs: "
                              f"{aucs}; checkpoints in {run_dir}/best, {run_dir}/last")
        note = tracking.describe(accelerator)
        if note:
            print(note, flush=True)
    accelerator.end_training()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lesionkit/train.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
