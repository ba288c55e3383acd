"""`jobs/gpu_bench.sh` rehearsed on the CPU (`LK_BENCH_DEVICE=cpu`, tiny data): every step runs and appends
its JSON line, and a failing step neither stops the others nor passes unnoticed, so a GPU lease (15 minutes,
rarely lent) is not spent discovering a broken flag."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "jobs" / "gpu_bench.sh"
LESIONKIT = Path(sys.executable).with_name("lesionkit")


@pytest.mark.slow
def test_gpu_bench_runs_every_step_and_reports_a_failing_one(tmp_path):
    # the data the script would synthesize, at 32 px (synth's least), so that it can run at 16 px below
    data, run = tmp_path / "data", dict(capture_output=True, text=True, check=True, timeout=300)
    subprocess.run(
        [LESIONKIT, "synth", data / "synth", "--n-train", "48", "--n-val", "0", "--size", "32"], **run
    )
    images, labels = (
        data / "synth" / "ISIC-2017_Training_Data",
        data / "synth" / "ISIC-2017_Training_Part3_GroundTruth.csv",
    )
    subprocess.run(
        [LESIONKIT, "pack", "--images", images, "--labels", labels, "--out", data / "shards", "--size", "32"],
        **run,
    )
    env = dict(
        os.environ,
        LK_BENCH_DEVICE="cpu",
        LK_BENCH_BATCH="4",
        LK_BENCH_SIZE="16",  # `bench aug` refuses sizes under 32 (exit 2): the failing step
        LK_BENCH_WORKERS="1",
        LK_BENCH_PRECISION="fp32",
        LK_BENCH_PARTS="step aug e2e threads loader",  # all but compile (minutes on a CPU)
        LK_BENCH_OUT=str(tmp_path / "out"),
        LK_BENCH_DATA=str(data),
        LK_BENCH_LESIONKIT=str(LESIONKIT),
        OMP_NUM_THREADS="1",
    )
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=540)
    out = tmp_path / "out"
    assert res.returncode == 1, (res.stdout + res.stderr)[-3000:]
    assert "FAILED: bench aug (exit 2)" in res.stdout and "failed: bench aug" in res.stdout
    assert "--image-size must be >= 32" in (out / "aug.log").read_text()  # its flags parsed; it ran, refused
    rows = [json.loads(line) for line in (out / "gpu_bench.jsonl").read_text().splitlines()]
    assert [r["bench"] for r in rows] == ["step"] + ["e2e"] * 5 + ["loader"]  # every step after aug ran
    e2e = [r for r in rows if r["bench"] == "e2e"]
    cores = len(os.sched_getaffinity(0))
    keys = ("preset", "decode", "workers", "torch_threads")
    assert [tuple(r["params"][k] for k in keys) for r in e2e] == [
        ("derm", "workers", 1, 1),  # OMP_NUM_THREADS=1 here; auto is torch's default on a CPU
        ("none", "workers", 1, 1),
        ("derm", "device", 1, 1),
        ("derm", "workers", 1, cores),  # the threads part: one per core, and 2 fewer workers (at least 1)
        ("derm", "workers", 1, 1),
    ]
    assert all(r["params"]["image_size"] == 16 and r["params"]["device"] == "cpu" for r in e2e)
    # the loader's core count is computed at the e2e rate with augmentation (the first e2e row)
    assert rows[-1]["params"]["gpu_rate"] == round(e2e[0]["cases"]["e2e"]["items_per_s"])
    assert "sorted by self_cpu_time_total" in (out / "e2e_profile.txt").read_text()
    assert "sorted by self_cpu_time_total" in (out / "e2e_threads_profile.txt").read_text()
    assert "bench e2e resnet18, 1 workers" in res.stdout  # what it ran is what its log line says
    for log in ("step", "e2e", "e2e_none", "e2e_device", "e2e_threads", "e2e_fewer", "loader"):
        assert (out / f"{log}.log").stat().st_size > 0, log
