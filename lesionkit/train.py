"""Train a lesion classifier: `accelerate launch lesionkit/train.py --config resnet18 --train DIR --val DIR`.

One process or many (DDP through Accelerate), CPU or GPU, mixed precision from the accelerate config
or `--mixed-precision`. `build(cfg)` sets everything up into one `TrainContext`; `train(cfg)` is the loop:
`train_one_epoch` -> `validate` -> scheduler, best and patience -> `save_checkpoint`, with every rank-0
side effect (console, W&B, metrics.json) going to the context's `Reporter`.

Distributed rules this file keeps (each one is a known way to get silently wrong results):
- the WebDataset loader is NOT passed through `accelerator.prepare` (it would drop half the data);
  `data.train_loader` splits shards by rank itself and gives every rank the same number of batches;
- the LR scheduler is stepped once per epoch by us, not prepared (Accelerate would step it once per
  process), and ReduceLROnPlateau sees the metric gathered from all ranks;
- validation metrics, early stopping, NaN detection and preemption are decided from all-reduced or
  all-gathered values, so every rank takes the same branch;
- every random draw of a step is seeded from (seed, epoch, step, rank) (`lesionkit.seeds`), so a resumed
  run replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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

from lesionkit import (
    checkpoint,
    dedup,
    devices,
    labelmaps,
    metafeatures,
    planning,
    runs,
    seeds,
    sources,
    tasks,
    tracking,
    weights,
)
from lesionkit.augment import build_augment, build_mixup, choose_placement, preset_params
from lesionkit.config import TrainConfig
from lesionkit.data import eval_loader, exclusion, pixels, train_loader
from lesionkit.errors import ConfigError, RunError
from lesionkit.inference import gather_predictions, predict_logits
from lesionkit.manifest import Exclusion, dataset_info, read_manifest, split_of
from lesionkit.metrics import softmax_views
from lesionkit.models import (
    create_model,
    forward,
    freeze_backbone,
    freeze_leading_blocks,
    input_stats,
    list_models,
    prepare_model,
)
from lesionkit.optim import (
    build_average,
    build_optimizer,
    build_scheduler,
    scaled_lr,
    step_scheduler,
    warmup_factor,
)
from lesionkit.reporter import Reporter


class TrainingError(RunError):
    """A failure the user must see as one clear message (non-finite loss, diverged weights, full disk)."""


@dataclass
class LoopState:
    """Where the loop is and what early stopping knows: saved in every checkpoint, restored by --resume."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches completed inside `epoch` (non-zero only for a preemption checkpoint)
    global_step: int = 0
    best: float = -float("inf")
    bad_epochs: int = 0
    seconds: float = 0.0  # spent in completed epochs (training + validation), for --time-limit-min
    wandb_id: str = ""
    history: list = field(default_factory=list)


class TrainerState:
    """The trainer's state beyond model/optimizer/scaler/RNG (loop state, scheduler, EMA/SWA average),
    registered with Accelerate once so `save_state` / `load_state` carry it with everything else."""

    def __init__(self, loop: LoopState, scheduler, average):
        self.loop, self.scheduler, self.average = loop, scheduler, average

    def state_dict(self) -> dict:
        return {
            "loop": dataclasses.asdict(self.loop),
            "scheduler": self.scheduler.state_dict(),
            "average": self.average.state_dict() if self.average is not None else None,
        }

    def load_state_dict(self, saved: dict) -> None:
        for key, value in saved["loop"].items():
            setattr(self.loop, key, value)
        self.scheduler.load_state_dict(saved["scheduler"])
        average = saved.get("average", saved.get("ema"))  # "ema": checkpoints before SWA
        if self.average is not None and average is not None:
            self.average.load_state_dict(average)


@dataclass
class TrainContext:
    """Everything `build` sets up; the loop's functions take this instead of long argument lists."""

    cfg: TrainConfig
    accelerator: object
    task: tasks.Task
    monitor: tasks.Monitor
    classes: list[str]
    counts: dict[str, int]
    model: torch.nn.Module  # prepared (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    scheduler: object
    average: torch.optim.swa_utils.AveragedModel | None  # EMA or SWA of the weights (optim.build_average)
    augment: torch.nn.Module | None  # on the device; None when augmentation runs in the loader workers
    preprocess: torch.nn.Module  # the deterministic eval transform, on the device
    mixup: object | None
    class_weights: torch.Tensor | None
    train_loader: object
    val_loader: object
    placement: str
    state: LoopState
    reporter: Reporter
    stop: StopRequest
    warmup_steps: int = 0  # batches of per-step LR warm-up (lr_warmup_epochs x batches per epoch)
    exclusion: Exclusion | None = None  # training samples left out (`exclude`)
    meta: metafeatures.MetaSpec | None = None  # the metadata features the model takes (`metadata`)
    merge: labelmaps.Merge | None = None  # --train folders of other releases mapped into `classes`

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir)


@dataclass
class EpochStats:
    loss_sum: float = 0.0  # sum over samples of the (rank-averaged) step loss
    samples: int = 0
    data_s: float = 0.0
    compute_s: float = 0.0
    skipped_corrupt: int = 0  # samples the loader skipped (--skip-corrupt), summed over ranks
    skipped_nonfinite: int = 0  # steps skipped for a non-finite loss (--skip-nonfinite)
    stopped: bool = False  # a stop (pre-emption) signal ended the epoch early

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    @property
    def data_wait(self) -> float:
        busy = self.data_s + self.compute_s
        return self.data_s / busy if busy else 0.0


class StopRequest:
    """SIGUSR1 (Slurm's pre-emption warning) or SIGTERM: finish the step, checkpoint, exit."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested = True

    @staticmethod
    def ignore_repeats():
        """Once `last/` is saved, a repeated signal must not kill the exiting process (the default
        action of SIGUSR1 is to terminate, with a traceback)."""
        for sig in StopRequest.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self):
        """Give the caller its handlers back: `train()` runs in-process too (tests, notebooks, cv), and a
        SIGTERM left ignored is inherited by every process forked later, which then cannot be stopped
        (a `multiprocessing.Pool` hangs forever in `terminate()`)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------- checks


def check_config(cfg: TrainConfig) -> tasks.Monitor:
    """Fail before any process group starts, with one line that lists the valid choices; returns the
    monitor (checked against the metrics the training data's task produces)."""
    if cfg.model not in list_models():
        raise ConfigError(f"unknown model {cfg.model!r}; valid models: {', '.join(list_models())}")
    try:
        preset_params(cfg.augment, **cfg.augment_overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    for split in ("train", "val"):
        for d in getattr(cfg, split):
            if not sources.is_remote(d) and not (Path(d) / "manifest.json").is_file():
                raise ConfigError(
                    f"--{split} {d}: no manifest.json there (pack images with `lesionkit pack`)"
                )
    fold_selection(cfg)
    if cfg.exclude and not Path(cfg.exclude).is_file():
        raise ConfigError(
            f"--exclude {cfg.exclude}: no such file (write one with `lesionkit dedup --exclude-out`)"
        )
    spec = metafeatures.parse(cfg.metadata)
    if spec is not None:
        metafeatures.check_folders(spec, [*cfg.train, *cfg.val])
    if cfg.source_weights and len(cfg.source_weights) != len(cfg.train):
        raise ConfigError(
            f"--source-weights gives {len(cfg.source_weights)} weight(s) for {len(cfg.train)} --train "
            "folder(s)"
        )
    if cfg.source_weights and (cfg.balanced or min(cfg.source_weights) <= 0):
        raise ConfigError("--source-weights must be positive, and cannot be combined with --balanced")
    task, merge = label_space(cfg)
    classes, _, _ = dataset_info(cfg.train, merge=merge)
    if cfg.val and dataset_info(cfg.val)[0] != classes:
        raise ConfigError(
            f"class sets differ: --train has {classes}, --val has {dataset_info(cfg.val)[0]} (map --train "
            f"folders of another release into the validation classes with --label-maps)"
        )
    monitor = task.monitor_for(cfg.monitor, classes)
    ckpt = runs.resume_checkpoint(cfg)
    if ckpt is not None:  # resuming into a run of another model or class set: say so now
        info = json.loads((ckpt / "info.json").read_text())
        if info["model"] != cfg.model:
            raise ConfigError(
                f"--resume: {ckpt} is a {info['model']} checkpoint, not {cfg.model}; pass --model "
                f"{info['model']} or another --output-dir"
            )
        if info["classes"] != classes:
            raise ConfigError(
                f"--resume: {ckpt} was trained on classes {info['classes']}, --train has {classes}"
            )
    return monitor


def label_space(
    cfg: TrainConfig, fetch: sources.Fetch | None = None
) -> tuple[tasks.Task, labelmaps.Merge | None]:
    """The task the run is judged by, and the merge of the --train folders into its classes (None without
    --label-maps): the validation data (--val, or the unmapped --train folders with --fold) decides when
    folders are mapped, the training data when not."""
    if not labelmaps.mapped(cfg.train, cfg.label_maps):
        return tasks.for_manifest(read_manifest(cfg.train[0], fetch)), None
    judged = labelmaps.validation_folders(cfg)
    if not judged or not (cfg.val or cfg.fold != -1):
        raise ConfigError(
            "--label-maps maps --train folders into the classes of the validation data: give --val, or "
            "--fold K with the release to validate on among --train under `none`"
        )
    merge = labelmaps.merge(cfg.train, cfg.label_maps, dataset_info(judged, fetch=fetch)[0], fetch)
    return tasks.for_manifest(read_manifest(judged[0], fetch)), merge


def fold_selection(cfg: TrainConfig) -> tuple[list[int] | None, list[int] | None]:
    """(training folds, validation folds) of `--fold K`: every other fold of each --train folder's split,
    and fold K of the same folders (label-mapped folders are read whole: `labelmaps.validation_folders`);
    (None, None) without --fold."""
    if cfg.fold == -1:
        return None, None
    if cfg.fold < -1:
        raise ConfigError(f"fold must be >= 0 (or -1 = off), got {cfg.fold}")
    if cfg.val:
        raise ConfigError(f"--fold {cfg.fold} validates on fold {cfg.fold} of --train: drop --val")
    counts = {
        d: split_of(read_manifest(d), d, [cfg.fold])["folds"] for d in labelmaps.validation_folders(cfg)
    }
    if not counts:
        raise ConfigError(
            f"--fold {cfg.fold}: every --train folder has a label map; which one to validate on?"
        )
    if len(set(counts.values())) > 1:
        raise ConfigError(f"--train folders have different numbers of folds: {counts}")
    k = next(iter(counts.values()))
    return [f for f in range(k) if f != cfg.fold], [cfg.fold]


def use_demo_data(cfg: TrainConfig) -> TrainConfig:
    """No --train/--val: the synthetic demo shards (made once; `python -m lesionkit.demo --prepare-only`)."""
    if cfg.train and (cfg.val or cfg.fold != -1):
        return cfg
    from lesionkit.synth.demo_data import DEMO_SHARDS, ensure_demo_shards

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (DEMO_SHARDS / "val" / "manifest.json").exists():
        raise ConfigError(
            "no --train/--val and no demo shards yet; make them once with: python -m lesionkit.demo "
            "--prepare-only (or pass --train/--val)"
        )
    train_dir, val_dir = ensure_demo_shards(DEMO_SHARDS)
    print(f"lesionkit: no --train/--val given; using the synthetic demo shards in {DEMO_SHARDS}/", flush=True)
    return dataclasses.replace(cfg, train=cfg.train or [str(train_dir)], val=cfg.val or [str(val_dir)])


# ---------------------------------------------------------------------------------------------- build


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
        # with use_cpu alone starts N unsynchronised single processes. GPUs asked for but unusable: exit 2.
        cpu=devices.select(cfg.cpu)[0] == devices.CPU,
        mixed_precision=mixed_precision(cfg),
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="wandb" if cfg.wandb else None,
        project_dir=cfg.output_dir or None,
        kwargs_handlers=kwargs,
    )


def class_weight_tensor(counts: dict[str, int], classes: list[str]) -> torch.Tensor:
    """Inverse class frequency, normalised so a balanced set gets weight 1 everywhere."""
    n = torch.tensor([max(counts.get(c, 0), 1) for c in classes], dtype=torch.float32)
    return n.sum() / (len(classes) * n)


def agreed_workers(accelerator, plan: planning.Plan) -> tuple[int, int]:
    """(training, validation) loader workers every rank uses: the smallest any rank planned (nodes may
    have different CPUs, and the shard plan needs the same count everywhere)."""
    if plan.launch.world != accelerator.num_processes:
        raise RunError(
            f"planned for {plan.launch.world} process(es) (WORLD_SIZE) but accelerate started "
            f"{accelerator.num_processes}"
        )
    workers = plan.workers
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        workers = min(gather_object([workers]))
    return workers, min(workers, plan.val_workers)


def build(
    cfg: TrainConfig, monitor: tasks.Monitor | None = None, plan: planning.Plan | None = None
) -> TrainContext:
    """The accelerator, model, optimizer, scheduler, EMA, augmentation, loss and loaders of a run, with the
    trainer's state registered for checkpointing. Same seed, same initial weights on every rank. `plan`
    (`lesionkit.planning`; made here when not given) sets the loader workers and the scaled LR."""
    from accelerate.utils import set_seed

    plan = plan or planning.make(cfg, folds=fold_selection(cfg))
    accelerator = make_accelerator(cfg)
    cfg = runs.settle(accelerator, cfg)  # no --output-dir: a new run folder, named by the main process
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    train_folds, val_folds = fold_selection(cfg)
    workers, val_workers = agreed_workers(accelerator, plan)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    fetch = sources.Fetch(cache_dir=cfg.cache_dir or None, retries=cfg.fetch_retries)
    excluded = exclusion(cfg.train, dedup.read_exclusion(cfg.exclude), fetch) if cfg.exclude else None
    task, merge = label_space(cfg, fetch)
    classes, counts, _ = dataset_info(cfg.train, train_folds, fetch, excluded, merge)
    monitor = monitor or task.monitor_for(cfg.monitor, classes)
    meta = metafeatures.parse(cfg.metadata)

    set_seed(cfg.seed)
    with accelerator.local_main_process_first():  # a download happens once per node; the others read it
        model = create_model(
            cfg.model,
            num_classes=len(classes),
            pretrained=cfg.pretrained,
            weights=weights.resolve(cfg),
            meta_features=meta.size if meta else 0,
        )
    if cfg.freeze_blocks:
        freeze_leading_blocks(model, cfg.freeze_blocks)
    model = prepare_model(model, channels_last=cfg.channels_last, compile=cfg.compile)
    model, optimizer = accelerator.prepare(
        model, build_optimizer(dataclasses.replace(cfg, lr=plan.lr), model)
    )
    scheduler = build_scheduler(cfg, optimizer, monitor.mode)
    average = build_average(accelerator.unwrap_model(model), cfg.ema_decay, swa=cfg.swa_epochs > 0)

    mean, std = input_stats(cfg.model)
    placement = (
        cfg.augment_placement
        if cfg.augment_placement != "auto"
        else "device"
        if cfg.decode == "device"  # the workers hold JPEG bytes, not pixels
        else choose_placement(device.type, cfg.augment)
    )
    augment = build_augment(
        cfg.augment, cfg.image_size, mean, std, color_constancy=cfg.color_constancy, **cfg.augment_overrides
    )
    preprocess = build_augment("none", cfg.image_size, mean, std, color_constancy=cfg.color_constancy)
    state = LoopState(best=monitor.worst)
    accelerator.register_for_checkpointing(TrainerState(state, scheduler, average))
    loader = train_loader(
        cfg.train,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        workers=workers,
        seed=cfg.seed,
        epoch=0,
        rank=rank,
        world_size=world,
        shuffle_buffer=cfg.shuffle_buffer,
        balanced=cfg.balanced,
        batch_transform=augment if placement == "workers" else None,
        skip_corrupt=cfg.skip_corrupt,
        max_batches=cfg.max_steps_per_epoch,
        folds=train_folds,
        fetch=fetch,
        decode=cfg.decode,
        exclude=excluded,
        features=meta,
        merge=merge,
        source_weights=cfg.source_weights or None,
    )
    return TrainContext(
        cfg=cfg,
        accelerator=accelerator,
        task=task,
        monitor=monitor,
        classes=classes,
        counts=counts,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        average=average,
        augment=augment.to(device) if placement == "device" else None,
        preprocess=preprocess.eval().to(device),
        mixup=build_mixup(len(classes), cfg.mixup_alpha, cfg.cutmix_alpha),
        class_weights=class_weight_tensor(counts, classes).to(device) if cfg.class_weights else None,
        train_loader=loader,
        val_loader=eval_loader(
            labelmaps.validation_folders(cfg),
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            workers=val_workers,
            rank=rank,
            world_size=world,
            folds=val_folds,
            fetch=fetch,
            decode=cfg.decode,
            features=meta,
        )
        if cfg.val or val_folds
        else None,
        placement=placement,
        state=state,
        reporter=Reporter(accelerator, cfg, task.table_columns(classes), monitor),
        stop=StopRequest(),
        warmup_steps=round(cfg.lr_warmup_epochs * len(loader)),
        exclusion=excluded,
        meta=meta,
        merge=merge,
    )


def resume(ctx: TrainContext) -> None:
    """Load `last/` (or the `--resume PATH` checkpoint) into the model, optimizer, RNG and the registered
    trainer state (every pickle checked with weights_only=True first)."""
    ckpt = runs.resume_checkpoint(ctx.cfg)
    if ckpt is None:
        ctx.reporter.print(f"--resume: no checkpoint in {ctx.run_dir}/last yet, starting fresh")
        return
    checkpoint.verify_loadable(ckpt)
    ctx.accelerator.load_state(str(ckpt))
    if runs.run_of(ckpt) != ctx.run_dir.resolve():  # continued in a new run folder: its own best, W&B run
        ctx.state.best, ctx.state.bad_epochs, ctx.state.wandb_id = ctx.monitor.worst, 0, ""
    ctx.reporter.print(f"resumed from {ckpt} (epoch {ctx.state.epoch}, step {ctx.state.step})")


# ---------------------------------------------------------------------------------------------- steps


def total(accelerator, *values) -> list[float]:
    """Sum a few numbers (floats, bools or 0-d device tensors) over all ranks in one collective; every
    rank gets the sums. One host-device sync however many values, so the loop pays one per step."""
    t = torch.stack(
        [
            v.float().reshape(())
            if torch.is_tensor(v)  # device values stay there (no sync)
            else torch.full((), float(v), device=accelerator.device)
            for v in values
        ]
    )
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def train_step(ctx: TrainContext, batch, epoch: int, step: int) -> tuple[float, bool, bool]:
    """One optimisation step on `batch`: (loss averaged over ranks, whether any rank's loss was non-finite
    (then nobody stepped), whether any rank was asked to stop)."""
    cfg, accelerator, model, optimizer = ctx.cfg, ctx.accelerator, ctx.model, ctx.optimizer
    torch.manual_seed(seeds.derive(seeds.STEP, cfg.seed, epoch, step, accelerator.process_index))
    images = pixels(batch, accelerator.device)
    targets = batch.labels.to(accelerator.device, non_blocking=True)
    meta = None if batch.meta is None else batch.meta.to(accelerator.device, non_blocking=True)
    if ctx.augment is not None:
        images = ctx.augment(images)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if ctx.mixup is not None:
        images, targets = ctx.mixup(images, targets)  # soft targets [B, C]
    with accelerator.accumulate(model), accelerator.autocast():
        logits = forward(model, images, meta).float()
        loss = F.cross_entropy(logits, targets, weight=ctx.class_weights, label_smoothing=cfg.label_smoothing)
        # the step's only sync: every rank learns if any loss is non-finite or any rank must stop
        bad, stops, loss_sum = total(
            accelerator, ~torch.isfinite(loss.detach()), ctx.stop.requested, loss.detach()
        )
        if bad:
            if not cfg.skip_nonfinite:
                raise TrainingError(
                    f"non-finite loss at epoch {epoch} step {step} (global step {ctx.state.global_step}), "
                    f"lr {optimizer.param_groups[0]['lr']:.3g}, batch keys {list(batch.keys)[:8]}"
                    " (the last good checkpoint is intact; --skip-nonfinite skips such steps)"
                )
            optimizer.zero_grad(set_to_none=True)
        else:
            accelerator.backward(loss)
            if cfg.clip_grad and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            with scaled_lr(optimizer, warmup_factor(ctx.state.global_step, ctx.warmup_steps)):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.ema_decay and accelerator.sync_gradients:
                ctx.average.update_parameters(accelerator.unwrap_model(model))
    return loss_sum / accelerator.num_processes, bad > 0, stops > 0


def train_one_epoch(ctx: TrainContext, state: LoopState) -> EpochStats:
    """One pass over the training stream; a resumed pre-empted epoch replays the stream up to `state.step`."""
    ctx.model.train()
    stats, skip, corrupt_before = EpochStats(), state.step, ctx.train_loader.skipped
    pbar = ctx.reporter.progress(len(ctx.train_loader), skip, state.epoch)
    tick = time.perf_counter()
    for step, batch in enumerate(ctx.train_loader):
        if step < skip:
            continue
        t_data = time.perf_counter()
        loss, nonfinite, stop_now = train_step(ctx, batch, state.epoch, step)
        if nonfinite:
            stats.skipped_nonfinite += 1
        else:
            stats.loss_sum += loss * len(batch.keys)
            stats.samples += len(batch.keys)
        state.step, state.global_step = step + 1, state.global_step + 1
        now = time.perf_counter()
        stats.data_s, stats.compute_s, tick = (
            stats.data_s + t_data - tick,
            stats.compute_s + now - t_data,
            now,
        )
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss:.3f}")
        ctx.reporter.step(state.global_step, loss, ctx.optimizer.param_groups[0]["lr"])
        if stop_now:
            stats.stopped = True
            break
    pbar.close()
    stats.skipped_corrupt = int(total(ctx.accelerator, ctx.train_loader.skipped - corrupt_before)[0])
    return stats


def evaluated(ctx: TrainContext, unwrap: bool = False) -> torch.nn.Module:
    """The weights validated and saved: the EMA/SWA average once it holds any, else the trained model."""
    if ctx.average is not None and ctx.average.n_averaged > 0:
        return ctx.average.module
    return ctx.accelerator.unwrap_model(ctx.model) if unwrap else ctx.model


def validate(ctx: TrainContext):
    """(metrics, labels, probs, keys): every validation sample scored exactly once across ranks (averaging
    `val_tta` views, as `evaluate --tta` does); every rank gets the same metrics."""
    model = evaluated(ctx)
    keys, labels, logits = predict_logits(
        model,
        ctx.val_loader,
        ctx.accelerator.device,
        ctx.preprocess,
        ctx.cfg.val_tta,
        autocast=ctx.accelerator.autocast,
    )
    keys, y, logits = gather_predictions(ctx.accelerator, keys, labels, logits)
    if not np.isfinite(logits).all():  # every rank sees the same gathered outputs, so all stop here together
        raise TrainingError(
            "validation outputs are not finite: the weights diverged (lower --lr or set "
            "--clip-grad; the last good checkpoint is intact)"
        )
    p = softmax_views(logits)
    metrics = ctx.task.metrics(y, p, ctx.classes)
    metrics["loss"] = metrics["nll"]  # cross-entropy of the (view-averaged) probabilities
    return metrics, y, p, keys


def save_checkpoint(ctx: TrainContext, metrics: dict, best: bool, val=None) -> None:
    """Every rank writes its part into a staging folder; the main process publishes it atomically, with
    its model card (`val`: the validation labels and probabilities, for the card's CIs)."""
    cfg, accelerator, state = ctx.cfg, ctx.accelerator, ctx.state
    name = checkpoint.checkpoint_name(state.epoch, state.step)
    staging = checkpoint.staging_dir(ctx.run_dir, name)
    try:
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            weights = evaluated(ctx, unwrap=True).state_dict()
            mean, std = input_stats(cfg.model)
            checkpoint.write_inference_files(
                staging,
                {k: v.cpu() for k, v in weights.items()},
                cfg,
                {
                    "classes": ctx.classes,
                    "task": ctx.task.name,
                    "model": cfg.model,
                    "image_size": cfg.image_size,
                    "mean": list(mean),
                    "std": list(std),
                    "color_constancy": cfg.color_constancy,
                    "meta_features": ctx.meta.to_info() if ctx.meta else None,
                    "epoch": state.epoch,
                    "step": state.step,
                    "monitor": ctx.monitor.name,
                    "metrics": metrics,
                    "wandb_id": state.wandb_id,
                },
            )
            ctx.reporter.model_card(staging, ctx.task, ctx.classes, metrics, *(val or (None, None)))
    except (OSError, RuntimeError, SafetensorError) as e:  # disk full, quota, size limit (torch, safetensors)
        shutil.rmtree(staging, ignore_errors=True)
        why = e.strerror if isinstance(e, OSError) else str(e).strip().splitlines()[0]
        raise TrainingError(
            f"could not write checkpoint {name} in {staging.parent} ({why}): disk full or not "
            f"writable? {ctx.run_dir}/last is unchanged"
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.publish(ctx.run_dir, name, best=best)
    accelerator.wait_for_everyone()


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- loop


def train(cfg: TrainConfig, monitor: tasks.Monitor | None = None, plan: planning.Plan | None = None) -> int:
    cfg = use_demo_data(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # before any rank can reach a save
        for done in runs.tidy(cfg):  # --force: the earlier run's files; unfinished checkpoints
            print(f"lesionkit: {done}", flush=True)
    ctx = build(cfg, monitor, plan)
    try:
        return _loop(ctx)
    finally:
        ctx.stop.restore()


def check_data(ctx: TrainContext) -> list[str]:
    """The main process's lines about the data before the first epoch: the samples `exclude` leaves out,
    and the validation samples that are duplicates of training images (`dedup.leak_warning`)."""
    cfg, lines = ctx.cfg, []
    ex = ctx.exclusion
    train_folds, val_folds = fold_selection(cfg)
    fetch = sources.Fetch(cache_dir=cfg.cache_dir or None, retries=cfg.fetch_retries)
    if ex is not None:
        left_out = dataset_info(cfg.train, train_folds, fetch, merge=ctx.merge)[2] - sum(ctx.counts.values())
        missing = ex.ids - {i for shards in ex.found.values() for found in shards.values() for i, _ in found}
        lines.append(
            f"excluding {left_out} training sample(s) listed in {cfg.exclude}"
            + (f" ({len(missing)} of its {len(ex.ids)} id(s) are not in --train)" if missing else "")
        )
    if ctx.merge is not None:
        lines += labelmaps.summary(ctx.merge, fetch)
    if cfg.val or cfg.fold != -1:
        warning = dedup.leak_warning(
            cfg.train,
            labelmaps.validation_folders(cfg),
            train_folds=train_folds,
            val_folds=val_folds,
            whole=labelmaps.mapped(cfg.train, cfg.label_maps),
            exclude=ex.ids if ex is not None else frozenset(),
            fetch=fetch,
        )
        if warning:
            lines.append(warning)
    return lines


def stop_reason(ctx: TrainContext, state: LoopState) -> str:
    """Why training ends before `epochs` (empty: it goes on). Every rank takes the same branch: early
    stopping reads the all-reduced validation score; the time limit is all-reduced here, so the slowest
    rank's clock decides for all."""
    cfg = ctx.cfg
    if cfg.early_stop_patience and state.bad_epochs >= cfg.early_stop_patience:
        return (
            f"early stopping at epoch {state.epoch}: {ctx.monitor.name} has not improved for "
            f"{state.bad_epochs} epochs (best {state.best:.4f})"
        )
    if cfg.time_limit_min and state.epoch < cfg.epochs:
        mean = state.seconds / state.epoch
        (over,) = total(ctx.accelerator, state.seconds + mean > cfg.time_limit_min * 60)
        if over:
            return (
                f"time limit: stopping after epoch {state.epoch} of {cfg.epochs}: "
                f"{state.seconds / 60:.1f} min so far, one more epoch (~{mean / 60:.1f} min) would pass "
                f"--time-limit-min {cfg.time_limit_min:g}"
            )
    return ""


def _loop(ctx: TrainContext) -> int:
    cfg, state, accelerator = ctx.cfg, ctx.state, ctx.accelerator
    if cfg.resume:
        resume(ctx)
    if accelerator.is_main_process:
        for line in check_data(ctx):
            ctx.reporter.print(line)
    ctx.reporter.start(
        state,
        ctx.counts,
        f"{cfg.model} on {accelerator.num_processes} x {accelerator.device.type}, "
        f"mixed precision {accelerator.mixed_precision}, augment {cfg.augment} on {ctx.placement}, "
        f"classes {ctx.classes}, train {sum(ctx.counts.values())} samples"
        + (f" (validating on fold {cfg.fold})" if cfg.fold != -1 else ""),
    )
    status = "completed"
    while state.epoch < cfg.epochs:
        t0 = time.perf_counter()
        if cfg.freeze_epochs:
            freeze_backbone(accelerator.unwrap_model(ctx.model), frozen=state.epoch < cfg.freeze_epochs)
            freeze_leading_blocks(accelerator.unwrap_model(ctx.model), cfg.freeze_blocks)
        ctx.train_loader.set_epoch(state.epoch)
        stats = train_one_epoch(ctx, state)
        if stats.stopped:
            save_checkpoint(ctx, {}, best=False)
            ctx.stop.ignore_repeats()
            ctx.reporter.print(
                f"stop requested; saved {ctx.run_dir}/last at epoch {state.epoch} step {state.step}; "
                "rerun with --resume to continue"
            )
            status = "preempted"
            break
        if cfg.swa_epochs and state.epoch >= cfg.epochs - cfg.swa_epochs:
            ctx.average.update_parameters(accelerator.unwrap_model(ctx.model))
        metrics, val_y, val_p, val_keys = validate(ctx)
        lr, score = ctx.optimizer.param_groups[0]["lr"], metrics.get(ctx.monitor.name)
        step_scheduler(ctx.scheduler, score if score is not None else ctx.monitor.worst)
        improved = ctx.monitor.better(score, state.best)
        state.best, state.bad_epochs = (score, 0) if improved else (state.best, state.bad_epochs + 1)
        seconds = time.perf_counter() - t0
        state.epoch, state.step, state.seconds = state.epoch + 1, 0, state.seconds + seconds
        row = ctx.reporter.epoch(
            state, stats, metrics, lr, seconds, val_y, val_p, ctx.classes, val_keys, improved
        )
        state.history.append(row)
        save_checkpoint(ctx, metrics, best=improved, val=(val_y, val_p))
        ctx.reporter.saved(state, metrics, best=improved)
        reason = stop_reason(ctx, state)
        if reason:
            ctx.reporter.print(reason)
            break

    from accelerate.utils import gather_object

    digests = gather_object([weights_digest(accelerator.unwrap_model(ctx.model))])
    ctx.reporter.finish(state, status, accelerator.num_processes, digests)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lesionkit.cli import run_command

    return run_command("train", argv, prog="lesionkit/train.py")


if __name__ == "__main__":
    sys.exit(main())
