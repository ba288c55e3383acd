"""`make demo`: synthesize a small dermoscopy set, pack it into shards, and train on it through the
same entry point users call (`accelerate launch lesionkit/train.py`).

    python -m lesionkit.demo                 # shards (once) + a short customnet run in a new runs/demo-TIME
    python -m lesionkit.demo --prepare-only  # just the shards in shards/demo/{train,val}

Each demo run gets a new folder, so running it again never deletes the results of the last one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from lesionkit.runs import new_run_dir
from lesionkit.synth.demo_data import ensure_demo_shards

REPO = Path(__file__).resolve().parents[1]


def accelerate_config() -> Path:
    import torch

    return REPO / "accelerate_configs" / ("single_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lesionkit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prepare-only", action="store_true", help="only make the demo shards")
    parser.add_argument("--output-dir", help="run folder, new or empty (default: a new runs/demo-TIME)")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo recipe's epochs")
    args = parser.parse_args(argv)
    train_dir, val_dir = ensure_demo_shards()
    if args.prepare_only:
        return 0
    out = Path(args.output_dir) if args.output_dir else new_run_dir("demo")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config()),
        str(REPO / "lesionkit" / "train.py"),
        "--config",
        "demo",
        "--train",
        str(train_dir),
        "--val",
        str(val_dir),
        "--output-dir",
        str(out),
    ]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    print("lesionkit demo:", " ".join(cmd[2:]), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
