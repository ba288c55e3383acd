"""A seeded tiny training run gives bit-identical weights: the digest below was recorded before the loop's
refactor into `build()` / `train_one_epoch()` / `Reporter` (issue 13) and must never change by accident.

The bits depend on the CPU kernels torch picks (oneDNN/MKL take other code paths with AVX-512, and other
ones again on AMD's AVX-512 than on Intel's), so the digest is recorded per (torch version, ATen CPU
capability, CPU vendor), one thread: AVX2 on the first sessions' AMD EPYC machines (no AVX-512); AVX512 on
an Intel Sapphire Rapids one, where the pre-refactor commit ecbcdf0 gives that same digest; AVX512 on an
AMD EPYC one (2026-12-04; commit ba77ca5 gives it too). On a machine not in the table the test still
asserts that two runs with the same seed agree bit for bit, and prints the digest to record. A deliberate
change of what a run computes (a new seed scheme, another default) updates every entry in the same commit,
saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from benchmarks.harness import cpu_info
from tests.conftest import make_shards
from tests.test_train import REPO, TINY, TRAIN, env

WEIGHTS_SHA256 = {
    ("2.14.1", "AVX2", "AuthenticAMD"): "617892f43a2d720f476e3aa219f77a618747bcf3eed50b35d753f24441f900a5",
    ("2.14.1", "AVX512", "GenuineIntel"): "23e7f6cebae116c3674351a8476945e88c41f0fb3485509027435f1fccdd942e",
    ("2.14.1", "AVX512", "AuthenticAMD"): "367cceae97f3828a378f94791a3823df070bb6efaaf661aa3fb3e4eb98460566",
}
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


def seeded_run(tmp_path, out) -> str:
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
    return world["weights_sha256"][0]


def test_seeded_tiny_run_gives_the_recorded_weights(tmp_path):
    make_shards(tmp_path / "train", 96, 4, seed=1)
    make_shards(tmp_path / "val", 32, 2, seed=2, prefix="VAL_")
    first, second = seeded_run(tmp_path, tmp_path / "run1"), seeded_run(tmp_path, tmp_path / "run2")
    assert first == second
    # the vendor is "" without /proc/cpuinfo: no recorded digest matches, the two runs must still agree
    key = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability(), cpu_info("vendor_id"))
    print(f"weights digest on {key}: {first}")
    if key in WEIGHTS_SHA256:
        assert first == WEIGHTS_SHA256[key]
