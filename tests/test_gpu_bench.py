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


def _run(out: Path, data: Path, size: int) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        LK_BENCH_DEVICE="cpu",
        LK_BENCH_N="200",
        LK_BENCH_BATCH="4",
        LK_BENCH_SIZE=str(size),
        LK_BENCH_WORKERS="1",
        LK_BENCH_OUT=str(out),
        LK_BENCH_DATA=str(data),
        LK_BENCH_LESIONKIT=str(Path(sys.executable).with_name("lesionkit")),
        OMP_NUM_THREADS="1",
    )
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=540)


@pytest.mark.slow
def test_gpu_bench_runs_every_step_and_reports_a_failing_one(tmp_path):
    res = _run(tmp_path / "ok", tmp_path / "data32", 32)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ok" / "gpu_bench.jsonl").read_text().splitlines()]
    assert [r["bench"] for r in rows] == ["step", "aug", "aug-placement", "e2e", "e2e", "e2e", "loader"]
    e2e = [r for r in rows if r["bench"] == "e2e"]
    assert [(r["params"]["preset"], r["params"]["decode"]) for r in e2e] == [
        ("derm", "workers"),
        ("none", "workers"),
        ("derm", "device"),
    ]
    # the loader's core count is computed at the e2e rate with augmentation (the first e2e row)
    assert rows[-1]["params"]["gpu_rate"] == round(e2e[0]["cases"]["e2e"]["items_per_s"])
    assert all(r["params"]["device"] == "cpu" for r in rows if "device" in r["params"])
    assert "sorted by self_cpu_time_total" in (tmp_path / "ok" / "e2e_profile.txt").read_text()
    for log in ("step", "aug", "e2e", "e2e_none", "e2e_device", "loader"):
        assert (tmp_path / "ok" / f"{log}.log").stat().st_size > 0, log

    # the same shards (no new synth) trained at 16 px: `bench aug` refuses sizes under 32 (exit 2); the steps
    # after it still run, and the script exits 1 naming it
    res = _run(tmp_path / "bad", tmp_path / "data32", 16)
    assert res.returncode == 1, (res.stdout + res.stderr)[-3000:]
    assert "FAILED: bench aug (exit 2)" in res.stdout and "failed: bench aug" in res.stdout
    rows = [json.loads(line) for line in (tmp_path / "bad" / "gpu_bench.jsonl").read_text().splitlines()]
    assert [r["bench"] for r in rows] == ["step", "e2e", "e2e", "e2e", "loader"]
