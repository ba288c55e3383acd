"""Atomic checkpoints: training state for `--resume`, and a model-only copy for inference.

Layout of a run folder::

    runs/NAME/checkpoints/epoch-0003/      accelerate state: model, optimizer, scaler, RNG, and the
                                           trainer's state registered with `register_for_checkpointing`
                                           (custom_checkpoint_0.pkl: loop state, scheduler, EMA) +
                                           model.pt, config.yaml, info.json (inference)
    runs/NAME/last -> checkpoints/...      symlinks, swapped atomically
    runs/NAME/best -> checkpoints/...

A checkpoint is written into `checkpoints/.tmp-*`, flushed to disk (fsync), renamed into place, and only then
are the `last`/`best` links swapped (os.replace), so a crash or a full disk at any moment leaves the
previous checkpoint whole. Every pickle is loaded with `weights_only=True` first (`verify_loadable`): a
checkpoint file carrying a pickled code payload is refused instead of executed.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

from lesionkit.atomic import fsync, fsync_tree, write_json, write_text
from lesionkit.config import TrainConfig, to_yaml
from lesionkit.errors import UsageError

TRAINER_STATE = "custom_checkpoint_0.pkl"  # the one object the trainer registers with Accelerate
# What accelerator.load_state unpickles. It loads the registered trainer state with weights_only=False and
# skips an unreadable RNG state silently; `verify_loadable` turns any refusal into an error first.
ACCELERATE_PICKLES = (
    "optimizer*.bin",
    "scheduler*.bin",
    "sampler*.bin",
    "scaler*.pt",
    "random_states_*.pkl",
    "custom_checkpoint_*.pkl",
)


class CheckpointError(UsageError):
    """A checkpoint file that is unreadable or holds more than tensors; the message names the file."""


def safe_load(path: Path, map_location="cpu"):
    """`torch.load(weights_only=True)` through accelerate's loader (which also allows numpy RNG states);
    a pickled code payload or a damaged file becomes one CheckpointError line naming the file."""
    from accelerate.utils import load

    try:
        return load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line for line in str(e).splitlines() if "GLOBAL" in line), "not plain tensors").strip()
        raise CheckpointError(f"{path}: refused to load, it holds more than tensors: {why}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint file ({str(e).splitlines()[0]})") from None


def verify_loadable(ckpt_dir: Path) -> None:
    """Load every pickle of a checkpoint `--resume` starts from with weights_only=True first, so a tampered
    one is refused loudly (CheckpointError) instead of executed, ignored or carried on."""
    for pattern in ("model.pt", *ACCELERATE_PICKLES):
        for path in sorted(Path(ckpt_dir).glob(pattern)):
            safe_load(path)


def trainer_state(ckpt_dir: Path) -> dict:
    """The registered trainer state of a checkpoint: {"loop": ..., "scheduler": ..., "ema": ...}."""
    return safe_load(Path(ckpt_dir) / TRAINER_STATE)


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """`epoch-0003` at an epoch boundary (epoch = epochs completed), `epoch-0003-step-000040` mid-epoch."""
    return f"epoch-{epoch:04d}" + (f"-step-{step:06d}" if step else "")


def staging_dir(run_dir: Path, name: str) -> Path:
    """Where every process writes its part of checkpoint `name` before `publish` renames it."""
    return Path(run_dir) / "checkpoints" / f".tmp-{name}"


def clean_staging(run_dir: Path) -> list[Path]:
    """Remove the `.tmp-*` folders of checkpoints a killed run never finished (main process, before the
    first save): a new save must not write into, or publish, a stale half of one."""
    stale = sorted((Path(run_dir) / "checkpoints").glob(".tmp-*"))
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def write_inference_files(ckpt_dir: Path, state_dict: dict, cfg: TrainConfig, info: dict) -> None:
    """model.pt (weights only), config.yaml and info.json: what `inference.load_checkpoint` reads."""
    import torch  # here, not at the top: `runs` imports this module, and `lesionkit sweep` needs no torch

    torch.save(state_dict, ckpt_dir / "model.pt")
    write_text(ckpt_dir / "config.yaml", to_yaml(cfg))
    write_json(ckpt_dir / "info.json", info)


def _swap_link(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(Path("checkpoints") / target_name, tmp)
    os.replace(tmp, link)


def publish(run_dir: Path, name: str, best: bool) -> Path:
    """Main process only: rename the staged checkpoint into place, swap links, drop unreferenced ones."""
    run_dir = Path(run_dir)
    final = run_dir / "checkpoints" / name
    if final.exists():
        shutil.rmtree(final)
    staged = staging_dir(run_dir, name)
    fsync_tree(staged)
    os.replace(staged, final)
    fsync(final.parent)
    _swap_link(run_dir / "last", name)
    if best:
        _swap_link(run_dir / "best", name)
    fsync(run_dir)
    keep = {resolve(run_dir / link) for link in ("last", "best")}
    for old in (run_dir / "checkpoints").iterdir():
        if old.resolve() not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: Path) -> Path | None:
    path = Path(path)
    return path.resolve() if path.exists() else None


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (`last`), or None for a fresh run."""
    return resolve(Path(run_dir) / "last")
