"""A seeded tiny training run gives bit-identical weights: the digest below was recorded before the loop's
refactor into `build()` / `train_one_epoch()` / `Reporter` (issue 13) and must never change by accident.

Recorded with torch 2.14.1 on this project's 2-core x86-64 CPU, one thread. A deliberate change of what a
run computes (a new seed scheme, another default) updates it in the same commit, saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import make_shards
from tests.test_train import REPO, TINY, TRAIN, env

WEIGHTS_SHA256 = "617892f43a2d720f476e3aa219f77a618747bcf3eed50b35d753f24441f900a5"
RUN = [
    *TINY,
    "--epochs",
    "2",
    "--class-weights",
    "--ema-decay",
    "0.9",
    "--mixup-alpha",
    "0.2",
    "--augment-placement",
    "workers",
    "--seed",
    "7",
]


def test_seeded_tiny_run_gives_the_recorded_weights(tmp_path):
    make_shards(tmp_path / "train", 96, 4, seed=1)
    make_shards(tmp_path / "val", 32, 2, seed=2, prefix="VAL_")
    out = tmp_path / "run"
    res = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            *RUN,
            "--train",
            str(tmp_path / "train"),
            "--val",
            str(tmp_path / "val"),
            "--output-dir",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    world = json.loads((out / "world.json").read_text())
    assert world["world_size"] == 1
    assert world["weights_sha256"] == [WEIGHTS_SHA256]
