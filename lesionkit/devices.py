"""Which device a run trains on, decided before any process group starts.

CUDA when torch can use it; otherwise, if the launch asked for GPUs (`LK_GPUS_PER_NODE`, a Slurm GPU
allocation, or `accelerate launch` starting several processes without `ACCELERATE_USE_CPU=1`, i.e. a GPU
config), an error that says why CUDA is unusable (a CPU-only torch wheel, torch's CUDA version against the
driver's, no device visible) instead of a silent CPU run with gloo; otherwise Apple's MPS where there is
one, else the CPU. `--cpu` always means the CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping

from lesionkit.errors import UsageError

CUDA, MPS, CPU = "cuda", "mps", "cpu"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def gpus_requested(env: Mapping[str, str] = os.environ) -> str | None:
    """What in the launch asked for GPUs, in words, or None when nothing did."""
    lk = env.get("LK_GPUS_PER_NODE", "")
    if lk.isdigit() and int(lk) > 0:
        return f"LK_GPUS_PER_NODE={lk}"
    slurm = env.get("SLURM_GPUS_ON_NODE", "")
    if slurm.isdigit() and int(slurm) > 0:
        return f"the Slurm allocation (SLURM_GPUS_ON_NODE={slurm})"
    if env.get("SLURM_JOB_GPUS"):
        return f"the Slurm allocation (SLURM_JOB_GPUS={env['SLURM_JOB_GPUS']})"
    if (
        "ACCELERATE_DYNAMO_BACKEND" in env
        and "LOCAL_RANK" in env
        and not _truthy(env.get("ACCELERATE_USE_CPU"))
    ):
        processes = env.get("WORLD_SIZE", "?")
        return f"accelerate launch of {processes} processes without ACCELERATE_USE_CPU=1 (a GPU config)"
    return None


def _driver() -> str:
    """The driver's own words from nvidia-smi ('driver 550.54, CUDA 12.4'), or '' without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    driver, cuda = re.search(r"Driver Version: *([\d.]+)", out), re.search(r"CUDA Version: *([\d.]+)", out)
    return f"driver {driver.group(1)}, CUDA {cuda.group(1)}" if driver and cuda else ""


def cuda_problem() -> str | None:
    """Why torch cannot use CUDA here (None when it can)."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU-only build; install a CUDA wheel "
            "(`make venv TORCH_INDEX=cu126`, the flavour matching the driver)"
        )
    try:
        torch.cuda.init()
        why = "no CUDA device is visible"
    except Exception as exc:  # torch words it: no driver found, the driver is too old, ...
        why = str(exc).strip().splitlines()[0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        why += f" (CUDA_VISIBLE_DEVICES={visible!r})"
    driver = _driver()
    return (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"
        + (f" and nvidia-smi reports {driver}" if driver else "")
        + f": {why}"
    )


def choose(
    force_cpu: bool, requested: str | None, problem: str | None, mps: bool, strict: bool = True
) -> str:
    """The device from the facts: `--cpu`, who asked for GPUs, why CUDA is unusable (None: usable), whether
    MPS is there. `strict=False` (a dry run) plans for the GPUs asked for instead of failing."""
    if force_cpu:
        return CPU
    if problem is None:
        return CUDA
    if requested:
        if not strict:
            return CUDA
        raise UsageError(
            f"{requested} asked for GPUs, but CUDA is unusable here: {problem}. Fix the install, or pass "
            "--cpu to train on CPUs"
        )
    return MPS if mps else CPU


def select(
    force_cpu: bool = False, strict: bool = True, env: Mapping[str, str] = os.environ
) -> tuple[str, str]:
    """(device, note): the device of this process and, when GPUs were asked for but are unusable (only
    possible with strict=False), the reason."""
    if force_cpu:
        return CPU, ""
    import torch

    problem, requested = cuda_problem(), gpus_requested(env)
    device = choose(force_cpu, requested, problem, torch.backends.mps.is_available(), strict)
    note = (
        f"{requested} asked for GPUs, but CUDA is unusable here: {problem}" if problem and requested else ""
    )
    return device, note
