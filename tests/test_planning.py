"""Resource planning, hardware profiles and the device check, before any process group starts: loader
workers capped by CPUs and shards, the too-few-shards error and the --shard-size it names, the plan
printed once, the LR rule, and GPUs asked for where CUDA is unusable (this machine's real torch)."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from lesionkit import devices, planning, profiles
from lesionkit.cli import run_command
from lesionkit.config import TrainConfig
from lesionkit.errors import UsageError
from lesionkit.optim import scaled_lr, warmup_factor
from tests.conftest import make_shards

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND",
               "ACCELERATE_USE_CPU", "LK_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS",
               "SLURM_CPUS_PER_TASK")  # fmt: skip


@pytest.fixture(autouse=True)
def clean_launch(monkeypatch):
    """Each test sets the launch environment it simulates; none leaks in from the machine."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CUDA unusable here, also on a machine with GPUs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    make_shards(root / "six", 60, 6)
    make_shards(root / "three", 30, 3)
    make_shards(root / "val", 12, 2, prefix="VAL_")
    return root


def cfg(data, train="six", **kw) -> TrainConfig:
    return TrainConfig(train=[str(data / train)], val=[str(data / "val")], **kw)


def test_workers_are_capped_by_the_cpus_of_each_process_on_the_node(data):
    cpus = len(os.sched_getaffinity(0))
    plan = planning.make(
        cfg(data, workers=8), planning.Launch(world=1, local=1), env={"SLURM_CPUS_PER_TASK": "1"}
    )
    assert plan.workers == 1 and "1 CPU(s) (SLURM_CPUS_PER_TASK=1) / 1 process(es)" in plan.workers_why
    plan = planning.make(cfg(data, workers=8), planning.Launch(world=2, local=2), env={})
    assert plan.workers == min(8, cpus // 2, 3)  # CPUs / 2 processes, 6 shards / 2 ranks
    plan = planning.make(cfg(data, workers=1), planning.Launch(world=2, local=2), env={})
    assert plan.workers == min(1, cpus // 2) and plan.workers_why.startswith(("config 1", "capped"))


def test_workers_are_capped_by_the_shards_each_rank_gets(data):
    plan = planning.make(cfg(data, "three", workers=8), planning.Launch(world=3, local=1), env={})
    assert plan.workers == 1 and "3 shards / 3 rank(s)" in plan.workers_why
    assert "--shard-size 1 would give every worker its shards" in plan.workers_why  # 30 samples / (3 x 8)
    assert plan.train_shards == 3 and plan.val_workers == 1  # 2 validation shards over 3 ranks


def test_too_few_shards_is_one_error_naming_the_shard_size_to_repack_with(data):
    with pytest.raises(UsageError) as err:
        planning.make(cfg(data, workers=4), planning.Launch(world=8, local=8), env={})
    message = str(err.value)
    assert "6 training shard(s)" in message and "for 8 processes" in message
    size = int(message.split("--shard-size ")[1].split()[0])
    assert size == 60 // (8 * 4) and math.ceil(60 / size) >= 8 * 4  # enough shards for every worker
    assert f"({math.ceil(60 / size)} shards for 8 process(es) x 4 loader worker(s))" in message


def test_cli_fails_before_any_process_group_and_prints_the_plan_once(data, monkeypatch, capsys, tmp_path):
    args = ["--train", str(data / "six"), "--val", str(data / "val"), "--output-dir", str(tmp_path), "--cpu"]
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert run_command("train", [*args, "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shard-size 3 --force" in err[0], err  # 60 samples / (8 x 2)
    assert not torch.distributed.is_initialized() and not (tmp_path / "status.json").exists()

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank, lines in (("0", 7), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        assert run_command("train", [*args, "--dry-run"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert len([x for x in out if x.startswith("lesionkit plan:")]) == lines, out
    monkeypatch.setenv("RANK", "0")
    assert run_command("train", [*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 process(es) = 1 node(s) x 2, device cpu, profile cpu" in out
    assert "batch 32 per device x 2 process(es) x 1 accumulation = global batch 64" in out
    assert "training shards 6: 3 per rank; validation shards 2" in out
    assert not (tmp_path / "status.json").exists()  # a dry run trains nothing


def test_training_threads_are_1_on_a_gpu_with_loader_workers_else_torch_default_or_the_config(data, capsys):
    # 1 on CUDA: the process's CPU work is kernel launches and small augmentation tensors, and torch's
    # thread per core fought the loader workers for the cores (bench e2e on an H200: 1.42x, 1.59x)
    auto_gpu = (1, "auto: a GPU run, the cores are the loader workers'")
    assert planning.plan_threads(0, devices.CUDA, 16) == auto_gpu
    assert planning.plan_threads(0, devices.CUDA, 0) == (0, "auto")  # no workers: it decodes, keep them
    assert planning.plan_threads(0, devices.CPU, 2) == (0, "auto")  # the model runs on those cores
    assert planning.plan_threads(0, devices.MPS, 2) == (0, "auto")  # not measured there
    assert planning.plan_threads(3, devices.CUDA, 16) == (3, "config 3")
    assert planning.make(cfg(data, threads=2), planning.Launch(), env={}).threads == 2
    args = ["--train", str(data / "six"), "--val", str(data / "val"), "--cpu", "--dry-run"]
    assert run_command("train", args) == 0
    assert "; torch threads default (auto)" in capsys.readouterr().out


def test_gpu_profile_scales_the_lr_with_the_global_batch(data, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    base = ["--train", str(data / "six"), "--val", str(data / "val"), "--dry-run", "--profile", "gpu"]
    assert run_command("train", ["--config", "resnet18", *base]) == 0
    out = capsys.readouterr().out
    # SGD: linear, 0.001 tuned for 64 -> 128 per device x 2 processes = 256
    assert "global batch 256" in out and "lr 0.004 (linear scaling (sgd): recipe lr 0.001 x 256/64)" in out
    assert "warm-up per step over 1 epoch(s)" in out
    assert run_command("train", ["--config", "customnet", *base]) == 0  # Adam: square root
    assert "lr 0.001414 (sqrt scaling (adam): recipe lr 0.0005 x sqrt(256/32))" in capsys.readouterr().out
    assert run_command("train", ["--config", "resnet18", *base[:-2]]) == 0  # the cpu profile: as tuned
    assert "lr 0.001 (as the recipe's)" in capsys.readouterr().out


def test_warmup_runs_each_step_at_a_fraction_of_the_scheduler_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    seen = []
    for step in range(4):
        with scaled_lr(optimizer, warmup_factor(step, 3)):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (step // 2))
        if step % 2:
            scheduler.step()  # an epoch of 2 steps: the scheduler never sees the warm-up
    assert seen == pytest.approx([0.1 / 3, 0.2 / 3, 0.05, 0.05])


@pytest.mark.parametrize(
    "env, who",
    [
        ({"LK_GPUS_PER_NODE": "1"}, "LK_GPUS_PER_NODE=1"),
        ({"SLURM_GPUS_ON_NODE": "4"}, "the Slurm allocation (SLURM_GPUS_ON_NODE=4)"),
        (
            {
                "ACCELERATE_DYNAMO_BACKEND": "no",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
            },
            "accelerate launch of 2 processes without ACCELERATE_USE_CPU=1 (a GPU config)",
        ),
    ],
)
def test_gpus_asked_for_where_cuda_is_unusable_exit_2_with_the_reason(
    data, monkeypatch, capsys, tmp_path, env, who
):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    args = ["--train", str(data / "six"), "--val", str(data / "val"), "--output-dir", str(tmp_path)]
    assert run_command("train", args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"{who} asked for GPUs, but CUDA is unusable here: torch {torch.__version__}" in err[0]
    )
    assert "--cpu to train on CPUs" in err[0] and not torch.distributed.is_initialized()
    assert run_command("train", [*args, "--cpu", "--dry-run"]) == 0  # --cpu forces the CPU
    assert "device cpu, profile cpu" in capsys.readouterr().out
    assert run_command("train", [*args, "--dry-run"]) == 0  # a dry run plans for the GPUs, and says so
    assert "device cuda (one per process), profile gpu [" in capsys.readouterr().out


def test_cpu_processes_with_accelerate_use_cpu_ask_for_no_gpu(monkeypatch):
    env = {"ACCELERATE_DYNAMO_BACKEND": "no", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "1"}
    assert devices.gpus_requested(env) is None and devices.gpus_requested({"LK_GPUS_PER_NODE": "0"}) is None


def test_device_choice_cuda_then_mps_then_cpu():
    assert devices.choose(False, None, None, mps=True) == "cuda"
    assert devices.choose(False, None, "no driver", mps=True) == "mps"  # a Mac: Apple's GPU, no CUDA
    assert devices.choose(False, None, "no driver", mps=False) == "cpu"
    assert devices.choose(True, "LK_GPUS_PER_NODE=1", None, mps=True) == "cpu"  # --cpu wins
    with pytest.raises(
        UsageError, match="LK_GPUS_PER_NODE=1 asked for GPUs, but CUDA is unusable here: no driver"
    ):
        devices.choose(False, "LK_GPUS_PER_NODE=1", "no driver", mps=True)  # never silently MPS or CPU
    assert devices.choose(False, "LK_GPUS_PER_NODE=1", "no driver", mps=False, strict=False) == "cuda"
    assert [profiles.for_device(d) for d in ("cuda", "mps", "cpu")] == ["gpu", "gpu", "cpu"]


def test_recipe_profile_sections_take_only_machine_settings(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: customnet\nprofiles:\n  gpu: {lr: 0.1}\n")
    assert run_command("train", ["--config", str(recipe), "--print-config"]) == 2
    assert "profiles.gpu may set only" in capsys.readouterr().err


def test_makefile_installs_the_torch_wheel_flavour_asked_for():
    def dry_run(*args: str) -> str:
        cmd = ["make", "-n", "-B", "venv", *args]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout

    cpu = dry_run("TORCH_INDEX=cpu")
    assert "pip install -q --index-url https://download.pytorch.org/whl/cpu torch==" in cpu
    assert 'echo "cpu" > .venv/.torch-index' in cpu  # remembered for later `make` runs
    assert "--index-url" not in dry_run("TORCH_INDEX=")  # PyPI's default build
