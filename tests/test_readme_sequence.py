"""The README's pack commands and its 2-process CPU launch, run as written (only the paths point at tiny
synthetic data in the official ISIC 2017 layout, and the run is cut to a smoke length): the pack and
launch commands a new user copies must agree with each other."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lesionkit.synth.generator import synthesize

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE = "--epochs 1 --max-steps-per-epoch 2 --no-wandb"


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]
    return [c for c in commands if not c.startswith("#")]


@pytest.mark.ddp
def test_readme_pack_then_two_process_cpu_training(tmp_path):
    commands = readme_commands()
    packs = [c for c in commands if c.startswith("lesionkit pack")]
    launch = [
        c for c in commands if "cpu_ddp.yaml" in c and c.startswith("ACCELERATE_USE_CPU=1 accelerate launch")
    ]
    assert len(packs) == 2 and len(launch) == 1, commands

    data = tmp_path / "data" / "isic2017"  # the official layout: metadata inside the image folder
    synthesize(data, n_train=62, n_val=30, size=96, seed=3, workers=1)
    meta = "ISIC-2017_Training_Data_metadata.csv"
    (data / meta).rename(data / "ISIC-2017_Training_Data" / meta)

    def local(command: str) -> str:
        command = command.replace("data/isic2017", str(data)).replace(
            "shards/isic2017", str(tmp_path / "shards")
        )
        command = command.replace("runs/cn", str(tmp_path / "runs" / "cn"))
        return re.sub(r"(^|\s)(lesionkit|accelerate) ", lambda m: f"{m.group(1)}{BIN / m.group(2)} ", command)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    for command in packs:
        proc = subprocess.run(
            local(command), shell=True, env=env, cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        len(json.loads((tmp_path / "shards" / "train" / "manifest.json").read_text())["shards"]) == 2
    )  # 62 / 31

    cmd = f"{local(launch[0])} {SMOKE}"
    proc = subprocess.run(cmd, shell=True, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("lesionkit plan: 2 process(es) = 1 node(s) x 2, device cpu, profile cpu") == 1
    assert "lesionkit plan: training shards 2: 1 per rank" in out
    run = tmp_path / "runs" / "cn"
    assert json.loads((run / "world.json").read_text())["world_size"] == 2
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
