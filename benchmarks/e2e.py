"""`lesionkit bench e2e`: the real training loop (shards -> loader -> device -> augment -> step) vs the step
alone on one batch already on the device, with the share of time waiting for data; --world N also runs N
CPU DDP processes for per-rank throughput."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import gather_object

from benchmarks.harness import (
    machine,
    measure_interleaved,
    pick_device,
    pick_precision,
    report,
    set_threads,
    sync,
)
from lesionkit import train as trainer
from lesionkit.atomic import write_text
from lesionkit.augment import PRESETS
from lesionkit.config import TrainConfig
from lesionkit.data import Batch
from lesionkit.errors import RunError, UsageError
from lesionkit.manifest import read_manifest
from lesionkit.models import list_models

# --- one rank's measurement: the trainer's own build() and train_one_epoch() -----------------------------


class _SameBatch:
    """The step baseline's loader for `train_one_epoch`: one batch already on the device, `n` times."""

    skipped = 0  # what ShardLoader reports for --skip-corrupt: nothing here

    def __init__(self, batch: Batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)


def _e2e_rank(args) -> dict:
    """This process's part of `bench e2e`: the run `lesionkit.train.build` sets up, its `train_one_epoch` over
    one fixed normalized batch already on the device (the step baseline) and over the real shard loader +
    augmentation, in turns."""
    device = pick_device(args.device)
    set_threads(args.threads)
    precision = pick_precision(args.precision, device)
    cfg = TrainConfig(
        train=[str(args.data)],
        model=args.model,
        image_size=args.image_size,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        augment=args.preset,
        augment_placement=args.placement,
        decode=args.decode,
        channels_last=args.channels_last,
        compile=args.compile,
        max_steps_per_epoch=args.steps,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        cpu=device.type == "cpu",
        wandb=False,
        output_dir=str(Path(tempfile.gettempdir()) / "lk-bench-e2e"),  # never written: no checkpoints, no W&B
    )
    ctx = trainer.build(cfg)
    ctx.reporter.main = False  # the benchmark prints its own table: no progress bars from the trainer
    accelerator, device, loader = ctx.accelerator, ctx.accelerator.device, ctx.train_loader
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(rank)
    raw = torch.randint(
        0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=generator
    )
    fixed = ctx.preprocess(raw.to(device))
    labels = torch.randint(0, len(ctx.classes), (cfg.batch_size,), generator=generator).to(device)
    cases = {
        "step": dataclasses.replace(
            ctx,
            train_loader=_SameBatch(Batch(fixed, labels, [""] * cfg.batch_size), len(loader)),
            augment=None,
        ),
        "e2e": ctx,
    }
    totals: dict[str, list] = {"step": [], "e2e": []}

    def epoch(name: str) -> Callable[[], int]:
        def run() -> int:
            done = trainer.train_one_epoch(cases[name], trainer.LoopState())
            sync(device)
            totals[name].append(done)
            return done.samples

        return run

    rows, _ = measure_interleaved({name: epoch(name) for name in cases}, args.repeats)
    for name, row in rows.items():
        timed = totals[name][-args.repeats :]  # the warm-up pass also starts the loader workers
        row["data_wait"] = round(statistics.median(t.data_wait for t in timed), 3)
    if args.profile and rank == 0:
        _profile(epoch("e2e"), device, args.profile)
    result = {
        "rank": rank,
        "world": world,
        "rows": rows,
        "placement": ctx.placement,
        "precision": precision,
        "channels_last": cfg.channels_last,
        "batches_per_pass": len(loader),
        **machine(device),
    }
    if world > 1:
        result = gather_object([result])
    accelerator.end_training()
    return result


def _profile(run: Callable[[], int], device: torch.device, path: str) -> None:
    """One more e2e pass under torch.profiler; its operators by self device time and by self CPU time go to
    `path` (which ops a GPU waits on, which ones keep the CPU busy or block it: cudaStreamSynchronize)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=activities) as prof:
        run()
    table = prof.key_averages()
    text = [f"one e2e pass (the real loader, augmentation and step) on {device}", ""]
    for key in ("self_cuda_time_total",) * cuda + ("self_cpu_time_total",):
        text += [f"sorted by {key}", table.table(sort_by=key, row_limit=30, max_name_column_width=60), ""]
    write_text(path, "\n".join(text))
    print(f"profile of one e2e pass: {path}")


# --- --world N: the same measurement in N CPU DDP processes ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_ranks(args, world: int) -> list[dict]:
    """`bench e2e` again in `world` CPU processes through the cpu_ddp accelerate config (gloo DDP: the
    gradient all-reduce is part of every step); the ranks' results come back through a file."""
    config = Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu_ddp.yaml"
    launcher = Path(sys.executable).with_name("accelerate")
    if not config.is_file() or not launcher.exists():
        raise UsageError(f"--world {world} needs {config} and {launcher} (a source checkout with its venv)")
    with tempfile.TemporaryDirectory(prefix="lk-bench-e2e-") as tmp:
        result = Path(tmp) / "ranks.json"
        cmd = [
            str(launcher),
            "launch",
            "--config_file",
            str(config),
            "--num_processes",
            str(world),
            "--main_process_port",
            str(_free_port()),
            "-m",
            "lesionkit.cli",
            "bench",
            "e2e",
            args.model,
            "--data",
            str(args.data),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--image-size",
            str(args.image_size),
            "--workers",
            str(args.workers),
            "--preset",
            args.preset,
            "--placement",
            args.placement,
            "--decode",
            args.decode,
            "--precision",
            args.precision,
            "--device",
            "cpu",
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
            "--world",
            str(world),
            "--result-file",
            str(result),
            "--channels-last" if args.channels_last else "--no-channels-last",
        ] + (["--compile"] * args.compile)
        done = subprocess.run(
            cmd, env=dict(os.environ, ACCELERATE_USE_CPU="1"), capture_output=True, text=True, check=False
        )
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(
                f"the {world}-process run failed (exit {done.returncode}):\n"
                f"{(done.stdout + done.stderr)[-3000:]}"
            )
        return json.loads(result.read_text())


def bench(args) -> int:
    if args.model not in list_models():
        raise UsageError(f"unknown model {args.model!r}; valid models: {', '.join(list_models())}")
    if args.preset not in PRESETS:
        raise UsageError(f"unknown --preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    if args.world < 1 or args.steps < 1 or args.workers < 0:
        raise UsageError("--world and --steps must be >= 1, --workers >= 0")
    manifest = read_manifest(args.data)  # a missing or foreign folder fails here, naming it
    if args.result_file:  # a rank of a --world N run started by `_launch_ranks`
        ranks = _e2e_rank(args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result_file).write_text(json.dumps(ranks))
        return 0
    if args.world > 1 and pick_device(args.device).type != "cpu":
        raise UsageError(
            "--world N runs CPU processes (cpu_ddp config); on GPUs use `accelerate launch` yourself"
        )
    one = _e2e_rank(args)
    cases = {"step": one["rows"]["step"], "e2e": one["rows"]["e2e"]}
    if args.world > 1:
        try:
            ranks = _launch_ranks(args, args.world)
        except RuntimeError as exc:
            raise RunError(str(exc)) from None
        for name in ("step", "e2e"):
            per_rank = [r["rows"][name] for r in ranks]
            cases[f"{name}, {args.world} procs, per rank"] = {
                "items_per_s": statistics.mean(r["items_per_s"] for r in per_rank),
                "runs": [r["runs"] for r in per_rank],
                "items": per_rank[0]["items"],
                "cpu_ms_per_item": statistics.mean(r["cpu_ms_per_item"] for r in per_rank),
                "data_wait": max(r["data_wait"] for r in per_rank),
            }
        total = cases[f"e2e, {args.world} procs, per rank"]
        cases[f"e2e, {args.world} procs, all ranks"] = {
            **total,
            "items_per_s": total["items_per_s"] * args.world,
        }
    params = {
        "model": args.model,
        "data": str(args.data),
        "num_samples": manifest["num_samples"],
        "stored_size": manifest.get("params", {}).get("size"),
        "steps": args.steps,
        "batches_per_pass": one["batches_per_pass"],
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "workers": args.workers,
        "preset": args.preset,
        "placement": one["placement"],
        "decode": args.decode,
        "precision": one["precision"],
        "channels_last": one["channels_last"],
        "compile": args.compile,
        "world": args.world,
        "repeats": args.repeats,
        **{k: one[k] for k in ("device", "device_name", "torch", "cpus", "torch_threads", "loadavg_1m")},
    }
    record = report("e2e", cases, "step", params, args.out)
    print(f"{'case':<28} {'data wait':>9}")
    for name, row in record["cases"].items():
        print(f"{name:<28} {100 * row['data_wait']:8.1f}%")
    print(f"e2e / step: {cases['e2e']['ratio']:.2f}x (goal >= 0.9x: the pipeline does not starve the model)")
    return 0
