"""Resource planning before launch: processes, device, batch, LR and loader workers of a run, from the
config, the launch's environment and the shard manifests, checked before any process group starts.

Torch threads of the training process: on a GPU with loader workers, 1 (its CPU work is launching kernels
and drawing per-sample augmentation parameters on tiny tensors; torch's one thread per core made those
ops wait for cores busy decoding: `bench e2e` on an H200, 16 workers, derm: 1.59x with 1 thread,
docs/performance.md#gpu); on a CPU, torch's default (the model runs there).

Loader workers per process = the smallest of: the config's `workers`; the CPUs this process may use
(`os.sched_getaffinity`, capped by `SLURM_CPUS_PER_TASK`) divided among the node's training processes; the
training shards each rank gets (every worker streams whole shards). Fewer training shards than processes
is an error naming the `--shard-size` to repack with. Every process computes the same plan (the trainer
still agrees on the workers over all ranks, as nodes may differ); the main process prints it once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from lesionkit import devices, labelmaps, profiles, weights
from lesionkit.errors import UsageError
from lesionkit.manifest import as_list, read_manifest, shard_selection


@dataclass(frozen=True)
class Launch:
    """What the launcher set up: processes in all, processes on this node, this process's rank."""

    world: int = 1
    local: int = 1
    rank: int = 0

    @property
    def nodes(self) -> int:
        return max(1, self.world // self.local)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Launch:
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(world, int(env.get("LOCAL_WORLD_SIZE", str(world))), int(env.get("RANK", "0")))


def cpus(env: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """(CPUs this process may use, where that number comes from)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < count:
        return int(slurm), f"SLURM_CPUS_PER_TASK={slurm}"
    return count, "CPU affinity"


def count_shards(dirs, folds=None, whole=()) -> tuple[int, int]:
    """(shards holding samples, samples) over shard folders (of `folds` of their split, when given, except
    for the folders in `whole`: label-mapped extra training data)."""
    shards = samples = 0
    for folder in as_list(dirs):
        picked, _ = shard_selection(read_manifest(folder), folder, None if folder in whole else folds)
        shards += sum(1 for _, n, _ in picked if n > 0)
        samples += sum(n for _, n, _ in picked)
    return shards, samples


@dataclass(frozen=True)
class Plan:
    launch: Launch
    device: str
    device_note: str  # GPUs asked for but unusable here (a dry run plans for them anyway)
    profile: str
    global_batch: int
    lr: float
    lr_rule: str
    workers: int
    workers_why: str
    threads: int  # torch threads of each training process; 0: torch's default
    threads_why: str
    train_shards: int
    val_shards: int
    val_workers: int
    start: str  # where the initial weights come from

    def describe(self, cfg) -> str:
        """The plan as the few lines the main process prints (and `--dry-run` prints before exiting)."""
        launch, world = self.launch, self.launch.world
        lo, hi = self.train_shards // world, math.ceil(self.train_shards / world)
        warmup = f"; warm-up per step over {cfg.lr_warmup_epochs:g} epoch(s)" if cfg.lr_warmup_epochs else ""
        lines = [
            f"{world} process(es) = {launch.nodes} node(s) x {launch.local}, device {self.device}"
            + (" (one per process)" if self.device != devices.CPU else "")
            + f", profile {self.profile}"
            + (f" [{self.device_note}; a real run here exits 2]" if self.device_note else ""),
            f"batch {cfg.batch_size} per device x {world} process(es) x {cfg.grad_accum} accumulation "
            f"= global batch {self.global_batch}",
            f"lr {self.lr:.4g} ({self.lr_rule}){warmup}",
            f"loader workers {self.workers} per process ({self.workers_why}); validation {self.val_workers}; "
            f"torch threads {self.threads or 'default'} ({self.threads_why})",
            f"training shards {self.train_shards}: {lo if lo == hi else f'{lo}-{hi}'} per rank; "
            f"validation shards {self.val_shards}",
            f"image {cfg.image_size} px, precision {cfg.mixed_precision}, channels_last "
            f"{'on' if cfg.channels_last else 'off'}, frozen blocks {cfg.freeze_blocks}",
            f"initial weights: {self.start}",
        ]
        return "\n".join(f"lesionkit plan: {line}" for line in lines)


def plan_threads(threads: int, device: str, workers: int) -> tuple[int, str]:
    """(torch threads per training process, why): the config's, else 1 on a GPU with loader workers, else
    0 (torch's default: one per core, or what the launcher set). Measured on CUDA only: MPS keeps torch's."""
    if threads:
        return threads, f"config {threads}"
    if device == devices.CUDA and workers > 0:
        return 1, "auto: a GPU run, the cores are the loader workers'"
    return 0, "auto"


def make(
    cfg,
    launch: Launch | None = None,
    strict: bool = True,
    env: Mapping[str, str] = os.environ,
    folds: tuple = (None, None),
) -> Plan:
    """The plan of `cfg` under this launch; raises UsageError for a device or shard count it cannot run.
    `folds`: the (training, validation) folds of `--fold` (`train.fold_selection`)."""
    launch = launch or Launch.from_env(env)
    device, note = devices.select(cfg.cpu, strict=strict, env=env)
    world = launch.world
    train_shards, samples = count_shards(cfg.train, folds[0], labelmaps.mapped(cfg.train, cfg.label_maps))
    if train_shards < world:
        size = max(1, samples // (world * max(1, cfg.workers)))
        raise UsageError(
            f"{train_shards} training shard(s) in {' '.join(as_list(cfg.train))} for {world} processes: "
            f"every process needs at least one (each loader worker streams whole shards). Repack with "
            f"`lesionkit pack ... --shard-size {size} --force` ({math.ceil(samples / size)} shards for "
            f"{world} process(es) x {max(1, cfg.workers)} loader worker(s))"
        )
    have, source = cpus(env)
    per_process = have // launch.local
    limits = {
        f"config {cfg.workers}": cfg.workers,
        f"{have} CPU(s) ({source}) / {launch.local} process(es) on the node": per_process,
        f"{train_shards} shards / {world} rank(s)": train_shards // world,
    }
    workers = min(limits.values())
    capped = [why for why, n in limits.items() if n == workers and not why.startswith("config")]
    why = "capped by " + " and ".join(capped) if workers < cfg.workers else f"config {cfg.workers}"
    if workers < cfg.workers and train_shards // world == workers:
        better = max(1, samples // (world * cfg.workers))
        why += f"; --shard-size {better} would give every worker its shards"
    val_shards = count_shards(labelmaps.validation_folders(cfg), folds[1])[0] if cfg.val or folds[1] else 0
    start = weights.resolve(cfg)  # a weights cache without the file fails here, naming the fetch command
    if start is None:
        start = (
            "random (from scratch)"
            if not cfg.pretrained
            else "the efficientnet-lite0 package (offline)"
            if cfg.model == "efficientnet_lite0"
            else "torchvision's ImageNet download, once per node (no --weights-cache)"
        )
    threads, threads_why = plan_threads(cfg.threads, device, workers)
    global_batch = cfg.batch_size * world * cfg.grad_accum
    factor, rule = profiles.lr_rule(cfg, global_batch)
    return Plan(
        launch=launch,
        device=device,
        device_note=note,
        profile=cfg.profile,
        global_batch=global_batch,
        lr=cfg.lr * factor,
        lr_rule=rule,
        workers=workers,
        workers_why=why,
        threads=threads,
        threads_why=threads_why,
        train_shards=train_shards,
        val_shards=val_shards,
        val_workers=min(workers, math.ceil(val_shards / world)),
        start=start,
    )
