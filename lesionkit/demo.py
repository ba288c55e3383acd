"""`make demo`: synthesize a small dermoscopy set, pack it into shards, and train on it through the
same entry point users call (`accelerate launch lesionkit/train.py`).

    python -m lesionkit.demo                 # shards (once) + a short customnet run in runs/demo
    python -m lesionkit.demo --prepare-only  # just the shards in shards/demo/{train,val}
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEMO_SHARDS = Path("shards/demo")
REPO = Path(__file__).resolve().parents[1]


def ensure_demo_shards(root: Path = DEMO_SHARDS, n_train: int = 1500, n_val: int = 400, size: int = 80,
                       seed: int = 0) -> tuple[Path, Path]:
    """Synthesize + pack once; later calls find the manifests and return at once."""
    from lesionkit.pack import pack
    from lesionkit.synth import synthesize

    train_dir, val_dir = root / "train", root / "val"
    if (train_dir / "manifest.json").exists() and (val_dir / "manifest.json").exists():
        return train_dir, val_dir
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        raw = Path(tmp) / "isic"
        print(f"lesionkit demo: synthesizing {n_train} + {n_val} dermoscopy images ({size}px) ...", flush=True)
        synthesize(raw, n_train=n_train, n_val=n_val, size=size, seed=seed)
        for split, out in (("Training", train_dir), ("Validation", val_dir)):
            pack(images=raw / f"ISIC-2017_{split}_Data", labels=raw / f"ISIC-2017_{split}_Part3_GroundTruth.csv",
                 out=out, size=size, shard_size=100, seed=seed, force=True)
    return train_dir, val_dir


def accelerate_config() -> Path:
    import torch

    return REPO / "accelerate_configs" / ("single_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lesionkit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prepare-only", action="store_true", help="only make the demo shards")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo recipe's epochs")
    args = parser.parse_args(argv)
    train_dir, val_dir = ensure_demo_shards()
    if args.prepare_only:
        return 0
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)  # the demo always starts fresh
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config()),
           str(REPO / "lesionkit" / "train.py"), "--config", "demo", "--train", str(train_dir),
           "--val", str(val_dir), "--output-dir", str(out)]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    print("lesionkit demo:", " ".join(cmd[2:]), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
