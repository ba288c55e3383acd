"""The synthetic demo shards: `make demo`, the trainer without `--train/--val`, and quick experiments."""

from __future__ import annotations

import tempfile
from pathlib import Path

DEMO_SHARDS = Path("shards/demo")


def ensure_demo_shards(
    root: Path = DEMO_SHARDS, n_train: int = 1500, n_val: int = 400, size: int = 80, seed: int = 0
) -> tuple[Path, Path]:
    """Synthesize + pack once; later calls find the manifests and return at once."""
    from lesionkit.pack import pack
    from lesionkit.synth.generator import synthesize

    train_dir, val_dir = root / "train", root / "val"
    if (train_dir / "manifest.json").exists() and (val_dir / "manifest.json").exists():
        return train_dir, val_dir
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        raw = Path(tmp) / "isic"
        print(
            f"lesionkit demo: synthesizing {n_train} + {n_val} dermoscopy images ({size}px) ...", flush=True
        )
        synthesize(raw, n_train=n_train, n_val=n_val, size=size, seed=seed)
        for split, out in (("Training", train_dir), ("Validation", val_dir)):
            pack(
                images=raw / f"ISIC-2017_{split}_Data",
                labels=raw / f"ISIC-2017_{split}_Part3_GroundTruth.csv",
                out=out,
                size=size,
                shard_size=100,
                seed=seed,
                force=True,
            )
    return train_dir, val_dir
