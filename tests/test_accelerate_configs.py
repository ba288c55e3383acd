"""The shipped accelerate configs parse as accelerate reads them, and cpu_ddp.yaml really is DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
ACCELERATE = Path(sys.executable).with_name("accelerate")

EXPECTED = {
    # name: (distributed_type, use_cpu, mixed_precision, num_machines)
    "cpu.yaml": (DistributedType.NO, True, "no", 1),
    "cpu_ddp.yaml": (DistributedType.MULTI_GPU, True, "no", 1),
    "single_gpu.yaml": (DistributedType.NO, False, "bf16", 1),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, False, "bf16", 1),
    "multi_node.yaml": (DistributedType.MULTI_GPU, False, "bf16", 2),
}


def test_every_shipped_config_is_known():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerate(name):
    path = CONFIGS / name
    cfg = load_config_from_file(str(path))
    dist, use_cpu, mp, machines = EXPECTED[name]
    assert cfg.distributed_type == dist
    assert cfg.use_cpu is use_cpu
    assert str(cfg.mixed_precision) == mp
    assert cfg.num_machines == machines
    assert path.read_text().startswith("#"), f"{name} must open with a comment saying when to use it"


def test_multi_node_template_uses_c10d_rendezvous():
    assert load_config_from_file(str(CONFIGS / "multi_node.yaml")).rdzv_backend == "c10d"


@pytest.mark.ddp
def test_cpu_ddp_config_gives_two_synchronised_processes(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            str(ACCELERATE),
            "launch",
            "--config_file",
            str(CONFIGS / "cpu_ddp.yaml"),
            "--main_process_port",
            "0",
            str(ROOT / "tests" / "slurm" / "world.py"),
            str(tmp_path),
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    worlds = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("world-*.json"))]
    assert sorted(w["rank"] for w in worlds) == [0, 1]
    assert all(w["world_size"] == 2 and w["distributed_type"] == "DistributedType.MULTI_CPU" for w in worlds)
    assert all(w["sum"] == 3.0 for w in worlds), worlds  # all_reduce of rank+1 over both ranks
