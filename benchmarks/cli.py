"""`lesionkit bench BENCH ...`: the benchmarks' command line. `lesionkit.cli` hands `bench` to
`add_arguments(parser)` and `run(args) -> int` here, as it does for its own subcommands."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from lesionkit.errors import UsageError

# --precision(s) choices; benchmarks.harness.AUTOCAST maps each to its autocast dtype. Not imported from
# there: harness imports torch, and this module stays torch-free (see `run`).
PRECISIONS = ("fp32", "bf16", "fp16")


def _add_common(parser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported")
    parser.add_argument("--out", help="append the JSON result line to this file")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = sub.add_parser(
        "loader", help="images/s of the shard stream vs a per-file PIL Dataset on the same images"
    )
    p.add_argument("dir", type=Path, help="shard folder written by `lesionkit pack`")
    p.add_argument("--images", help="folder of the original images (default: the manifest's source)")
    p.add_argument("--labels", help="labels CSV of the original images (default: the manifest's source)")
    p.add_argument("--workers", type=int, default=2, help="loader workers, the same for both cases")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="training size (default: the size the shards were packed at, so no resize)",
    )
    p.add_argument("--epochs", type=int, default=1, help="passes per timed run (more for tiny folders)")
    p.add_argument(
        "--gpu-rate",
        type=float,
        default=8000,
        help="images/s a GPU trains at: prints the loader cores it needs (default: 8000, an H100's resnet18)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where the decode-on-device case decodes (default: cuda when available)",
    )
    _add_common(p)

    p = sub.add_parser(
        "aug",
        help="ms/batch of each augmentation preset beside a resnet18 training step; "
        "augmenting on the device vs in loader workers",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--presets", nargs="+", metavar="PRESET", help="default: all")
    p.add_argument("--placement-preset", default="derm", help="preset for the device-vs-workers comparison")
    p.add_argument(
        "--placement-batches", type=int, default=3, help="training batches per timed placement run"
    )
    p.add_argument("--workers", type=int, default=2, help="loader workers for the workers placement")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the main process (default: torch's); 1 on a busy shared CPU",
    )
    _add_common(p)
    p.set_defaults(repeats=5)

    p = sub.add_parser(
        "step",
        help="training images/s of a model alone on synthetic device tensors: fp32 vs "
        "bf16/fp16 autocast, channels_last, torch.compile",
    )
    p.add_argument("model", help="model name (lesionkit.models.list_models())")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed run")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile (optional rows; its warm-up compiles, minutes on a CPU)",
    )
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=PRECISIONS,
        metavar="P",
        help="fp32 (the baseline) and any of bf16 fp16 (default: all the device has; bf16 runs "
        "~7x slower than fp32 on CPUs without AMX)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's); 1 on a busy shared CPU"
    )
    _add_common(p)

    p = sub.add_parser(
        "e2e",
        help="the real loop (shards -> loader -> device -> augment -> step) vs the step "
        "alone, with the share of time waiting for data; --world N for CPU DDP",
    )
    p.add_argument("model", help="model name (lesionkit.models.list_models())")
    p.add_argument("--data", type=Path, required=True, help="shard folder written by `lesionkit pack`")
    p.add_argument(
        "--steps", type=int, default=20, help="training steps per timed pass (an epoch capped at N)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="loader workers per process")
    p.add_argument("--preset", default="derm", help="augmentation preset")
    p.add_argument(
        "--placement",
        choices=("auto", "device", "workers"),
        default="auto",
        help="where augmentation runs (auto: lesionkit.augment.choose_placement)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="auto: bf16 on GPUs that have it, fp32 on CPUs",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last model and batches (default on: 1.4-1.6x on CPUs too, see `bench step`)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument(
        "--world",
        type=int,
        default=1,
        help="N > 1: also run N CPU processes (accelerate_configs/cpu_ddp.yaml) for per-rank throughput",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process, as train --threads (0: auto, 1 on a GPU with loader workers, else "
        "torch's; accelerate gives CPU ranks 1); 1 on a busy CPU",
    )
    p.add_argument(
        "--decode",
        choices=("workers", "device"),
        default="workers",
        help="where JPEGs are decoded (device: workers only read bytes, nvJPEG on a GPU; as train --decode)",
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="also profile one e2e pass (torch.profiler) and write its operator tables to FILE",
    )
    p.add_argument("--result-file", help=argparse.SUPPRESS)  # set for the ranks of a --world N run
    _add_common(p)

    p = sub.add_parser(
        "pack", help="packing images/s and peak memory: draft decoding vs full decode + resize"
    )
    p.add_argument("images", type=Path, help="folder of images")
    p.add_argument("--labels", type=Path, required=True, help="labels CSV")
    p.add_argument("--size", type=int, default=256, help="stored shorter side, as `lesionkit pack --size`")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all CPUs)")
    _add_common(p)

    p = sub.add_parser("memory", help="peak RSS of packing + streaming --small vs --large synthetic images")
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--size", type=int, default=32, help="image size (tiny: what matters is the count)")
    p.add_argument("--workers", type=int, default=2, help="pack processes and loader workers")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workdir", default=None, help="where the temporary data goes (default: the system temp)")
    p.add_argument("--out", help="append the JSON result line to this file")


def run(args) -> int:
    for flag in ("repeats", "batch_size", "epochs"):
        if getattr(args, flag, 1) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    # Only the chosen benchmark's module is imported (benchmarks.loader for `bench loader`, ...): together
    # they import torch, kornia, accelerate and scikit-learn, ~10 s that `bench --help` and a bench that
    # needs few of them should not pay (lesionkit.cli imports its subcommands lazily for the same reason).
    module = importlib.import_module(f"benchmarks.{args.bench}")
    return module.bench(args)
