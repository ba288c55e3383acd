"""The run folder: where a run writes, what `--resume` continues, and the records that let a result be
reproduced without W&B.

- Without `--output-dir` a run gets a new folder `runs/MODEL-YYYYmmdd-HHMMSS` (`-2`, `-3`, ... when several
  start in the same second), made by the main process and shared with the others (`settle`).
- A fresh run never writes into a folder that already holds files: `prepare` refuses it (exit 2) unless
  `--resume` continues that run or `--force` replaces it; `--force` removes only what a run writes
  (`RUN_FILES`), never other files in the folder.
- `--resume` continues OUTPUT_DIR/last; `--resume PATH` takes a run folder (its `last`) or a checkpoint
  folder. A checkpoint that is not its run's `last` continues in a new run folder, with a W&B run of its
  own, so the later checkpoints of the earlier run are never replaced.
- `run.json` keeps one record per start of the run (the first, and each resume or requeue): command line,
  environment (versions, devices, host, Slurm job), git commit; `config.yaml` the resolved config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from lesionkit import __version__, checkpoint
from lesionkit.atomic import write_json, write_text
from lesionkit.config import TrainConfig, to_yaml
from lesionkit.errors import ConfigError, UsageError
from lesionkit.manifest import read_manifest

ROOT = Path("runs")  # where runs without --output-dir go (relative to the working directory)
REPO = Path(__file__).resolve().parents[1]
PROBE = ".write-probe-"  # `probe_writable`'s file: every rank writes one, so it never counts as content
# Everything a run writes into its folder: what `--force` removes.
RUN_FILES = (
    "checkpoints",
    "last",
    "best",
    ".last.tmp",
    ".best.tmp",
    "metrics.json",
    "status.json",
    "world.json",
    "run.json",
    "config.yaml",
    "wandb",
)
PACKAGES = ("torch", "torchvision", "accelerate", "timm", "kornia", "webdataset", "numpy", "wandb")
SLURM = {"job_id": "SLURM_JOB_ID", "job_name": "SLURM_JOB_NAME", "restart": "SLURM_RESTART_COUNT"}
LAUNCH_ENV = (
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "ACCELERATE_USE_CPU",
    "ACCELERATE_MIXED_PRECISION",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "SLURM_JOB_NODELIST",
)


# ------------------------------------------------------------------------------------ where a run goes


def contents(folder: Path) -> list[str]:
    """The entries of `folder` (none if it does not exist), other ranks' write probes left out."""
    if not Path(folder).is_dir():
        return []
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith(PROBE))


def locate(path: Path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to load) of `--resume PATH`: a checkpoint folder (its info.json) or a run
    folder (its `last`, None before the first checkpoint)."""
    path = Path(path)
    if (path / "info.json").is_file() and (path / checkpoint.TRAINER_STATE).is_file():
        return run_of(path), path.resolve()
    if path.is_dir():
        return path, checkpoint.latest(path)
    raise UsageError(f"--resume {path}: no such run or checkpoint folder")


def run_of(ckpt: Path) -> Path:
    """The run folder a checkpoint belongs to (`RUN/checkpoints/epoch-N`, also through `RUN/last`)."""
    ckpt = Path(ckpt).resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def prepare(cfg: TrainConfig) -> TrainConfig:
    """Every rank, before any process group: resolve `--resume PATH` into the run folder, and refuse to start
    a fresh run where an earlier one's files are (exit 2, the earlier run untouched)."""
    if cfg.resume and cfg.force:
        raise ConfigError("--resume continues the run in the output dir and --force replaces it: pass one")
    continues = bool(cfg.resume)
    if isinstance(cfg.resume, str):
        run, ckpt = locate(Path(cfg.resume))
        own_last = ckpt is None or ckpt == checkpoint.latest(run)
        out = Path(cfg.output_dir) if cfg.output_dir else None
        continues = own_last and (out is None or out.resolve() == run.resolve())
        if continues:
            cfg = dataclasses.replace(cfg, output_dir=str(run))
        elif out is not None and out.resolve() == run.resolve():
            raise ConfigError(
                f"--resume {cfg.resume}: not the last checkpoint of {run}; continuing from it there would "
                "replace the later ones: pass another --output-dir (or none: a new run folder)"
            )
    elif cfg.resume and not cfg.output_dir:
        raise ConfigError(
            "--resume continues a run: pass its folder (--resume RUN, or --output-dir RUN --resume)"
        )
    found = [] if continues or cfg.force or not cfg.output_dir else contents(Path(cfg.output_dir))
    if found:
        raise ConfigError(
            f"output dir {cfg.output_dir} already holds files ({', '.join(found[:4])}"
            f"{', ...' if len(found) > 4 else ''}): pass --resume to continue that run, --force to replace "
            "it, or another --output-dir (none: a new folder under runs/)"
        )
    return cfg


def resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint a run with `--resume` starts from (None: nothing saved yet, start fresh)."""
    if isinstance(cfg.resume, str):
        return locate(Path(cfg.resume))[1]
    return checkpoint.latest(Path(cfg.output_dir)) if cfg.resume else None


def probe_writable(output_dir: Path) -> None:
    """Learn that the output folder is unwritable or the disk full now, not at the first checkpoint."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f"{PROBE}{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output dir {output_dir} is not writable: {e.strerror or e}") from None


def tidy(cfg: TrainConfig) -> list[str]:
    """Main process, before any rank can save: with `--force` remove the earlier run's files, and remove the
    `.tmp-*` checkpoints an interrupted run never finished. Returns what it did, one line each."""
    if not cfg.output_dir:
        return []
    run_dir, done = Path(cfg.output_dir), []
    if cfg.force:
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            done.append(f"--force: removed {path} of the earlier run")
    for stale in checkpoint.clean_staging(run_dir):
        done.append(f"removed {stale}, an unfinished checkpoint of an interrupted run")
    return done


def new_run_dir(prefix: str, root: Path = ROOT) -> Path:
    """Make a new folder `root/PREFIX-YYYYmmdd-HHMMSS` (`-2`, `-3`, ... if taken): mkdir is atomic, so two
    runs starting in the same second never share one."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        path = root / (f"{prefix}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def settle(accelerator, cfg: TrainConfig) -> TrainConfig:
    """A run without --output-dir: the main process makes its new folder and tells the other ranks (they
    would each pick another name, or find the folder taken)."""
    if cfg.output_dir:
        return cfg
    from accelerate.utils import broadcast_object_list

    name = [str(new_run_dir(cfg.model)) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    return dataclasses.replace(cfg, output_dir=name[0])


# ------------------------------------------------------------------------------------ records


def git_commit() -> dict | None:
    """The commit of the lesionkit checkout that runs (None when installed from a package, or without git)."""
    if not (REPO / ".git").exists():
        return None
    try:
        git = ["git", "-C", str(REPO)]
        run = dict(capture_output=True, text=True, timeout=20, check=True)
        commit = subprocess.run([*git, "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def slurm() -> dict | None:
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {key: os.environ.get(var) for key, var in SLURM.items()}


def data_summary(cfg: TrainConfig) -> dict:
    """Each shard folder of the run: name, path, samples and class counts (from its manifest), and the
    label map of a mapped training folder."""
    from lesionkit.labelmaps import mapped

    out, maps = {}, mapped(cfg.train, cfg.label_maps)
    for split in ("train", "val"):
        out[split] = []
        for folder in getattr(cfg, split):
            manifest = read_manifest(folder)
            out[split].append(
                {
                    "name": Path(folder).name,
                    "path": str(folder),
                    "samples": int(manifest["num_samples"]),
                    "counts": manifest.get("counts", {}),
                    **({"label_map": maps[folder]} if split == "train" and folder in maps else {}),
                }
            )
    return out


def facts(cfg: TrainConfig, accelerator) -> dict:
    """What a result depends on beyond the config: also the W&B run's config (`tracking.run_config`)."""
    world = accelerator.num_processes
    git = git_commit()
    return {
        "world_size": world,
        "batch_size_per_device": cfg.batch_size,
        "global_batch_size": cfg.batch_size * world * cfg.grad_accum,
        "lesionkit_version": __version__,
        "git_commit": git and git["commit"],
        "git_dirty": git and git["dirty"],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "data": data_summary(cfg),
    }


def environment(accelerator) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # with its build (+cu130, +cpu), which the metadata leaves out
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
        "packages": versions,
        "device": accelerator.device.type,
        "mixed_precision": accelerator.mixed_precision,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),  # of this process, after the plan's --threads
        "launch_env": {k: os.environ[k] for k in LAUNCH_ENV if k in os.environ},
    }


def write_records(run_dir: Path, cfg: TrainConfig, segment: dict) -> None:
    """Main process, at each start: config.yaml (the resolved config) and one more entry in run.json."""
    path = Path(run_dir) / "run.json"
    try:
        segments = json.loads(path.read_text())["segments"]
    except (OSError, ValueError, KeyError, TypeError):
        segments = []
    write_text(Path(run_dir) / "config.yaml", to_yaml(cfg))
    write_json(path, {"segments": [*segments, segment]})


def segment(cfg: TrainConfig, accelerator, run_facts: dict, state) -> dict:
    """The record of this start of the run."""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "from_epoch": state.epoch,
        "from_step": state.step,
        "slurm": slurm(),
        **run_facts,
        "environment": environment(accelerator),
    }
