"""Faults in a real 2-process CPU DDP job (`accelerate launch --multi_gpu`, gloo): a rank killed, a rank
hung (the collective timeout lesionkit sets ends the job), a non-finite loss seen by every rank at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lesionkit.checkpoint import trainer_state
from tests.conftest import cpu_ddp
from tests.faults.conftest import REPO, base_env, data_args
from tests.test_train import TINY

pytestmark = pytest.mark.ddp


class Job:
    """A launched 2-process job with its output in a file (polled while it runs)."""

    def __init__(self, shards: dict, out: Path, *extra: str):
        self.log = out.parent / f"{out.name}.log"
        env = dict(base_env(), ACCELERATE_USE_CPU="1")
        cmd = cpu_ddp(REPO / "lesionkit" / "train.py", *TINY, *data_args(shards, out), *extra)
        self.proc = subprocess.Popen(
            cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output()):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.1)

    def rank_pid(self, rank: int) -> int:
        """The worker process of `rank`: a child of the launcher with RANK=<rank> in its environment."""
        for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(child)
        raise AssertionError(f"no rank {rank} among the launcher's children")

    def finish(self, timeout: float) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"job still running after {timeout} s:\n{self.output()[-3000:]}") from None
        return rc, time.monotonic() - t0


def test_killed_rank_ends_the_job_fast_naming_it(shards, tmp_path):
    job = Job(shards, tmp_path / "run", "--epochs", "50")
    job.wait_for(r"epoch 1/50", 240)  # both ranks are training (every step all-reduces)
    victim = job.rank_pid(1)
    os.kill(victim, signal.SIGKILL)
    rc, seconds = job.finish(90)
    out = job.output()
    assert rc != 0 and seconds < 60, (rc, seconds)
    # torchrun's ChildFailedError report names the rank and how it died
    root = out.split("Root Cause", 1)[1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root) and f"pid: {victim}" in root
    assert "Signal 9 (SIGKILL)" in root, root[:2000]


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to notice."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_hung_rank_ends_the_job_after_the_collective_timeout(shards, tmp_path):
    """Rank 1 stops (SIGSTOP: alive, sockets open, never answering, as a rank stuck in I/O or a driver):
    rank 0 waits in its next all-reduce exactly `collective_timeout_s`, fails, and the job ends."""
    job = Job(shards, tmp_path / "run", "--epochs", "50", "--collective-timeout-s", "8")
    job.wait_for(r"epoch 1/50", 240)
    victim, rank0 = job.rank_pid(1), job.rank_pid(0)
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        job.wait_for(r"Timed out waiting \d+ms", 90)
        waited = time.monotonic() - stopped
        deadline = time.monotonic() + 60  # rank 0 exits; torchrun polls and records it as the first failure
        while alive(rank0) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
    finally:
        # torchrun would SIGTERM the stopped rank and SIGKILL it after a 30 s grace: do that part now
        if Path(f"/proc/{victim}").exists():
            os.kill(victim, signal.SIGKILL)
    rc, _ = job.finish(90)
    out = job.output()
    assert 8 <= waited < 40, waited  # the configured 8 s, not the 300 s default
    assert "Timed out waiting 8000ms" in out
    assert rc != 0 and re.search(r"rank\s*:\s*0 \(local_rank: 0\)", out.split("Root Cause", 1)[1])


def test_nonfinite_loss_stops_every_rank_at_the_same_step_keeping_the_last_checkpoint(shards, tmp_path):
    # epoch 1 at lr 0.01 writes a good checkpoint; the step scheduler then multiplies the LR by 1e10
    out = tmp_path / "run"
    job = Job(shards, out, "--epochs", "3", "--max-steps-per-epoch", "3", "--gamma", "1e10")
    rc, _ = job.finish(300)
    text = job.output()
    errors = re.findall(
        r"lesionkit train: error: non-finite loss at epoch (\d+) step (\d+) \(global step (\d+)\), "
        r"lr ([\d.e+]+), batch keys \[((?:'ISIC_\d+'(?:, )?)+)\]",
        text,
    )
    assert rc != 0 and len(errors) == 2, text[-3000:]  # one line from each rank, at the same step and LR ...
    assert errors[0][:4] == errors[1][:4] and errors[0][0] == "1" and errors[0][3] == "1e+08", errors
    assert errors[0][4] != errors[1][4]  # ... each naming its own batch
    assert re.search(r"exitcode\s*:\s*1", text)  # both ranks exited; torchrun reports, nothing hangs
    last = (out / "last").resolve()
    assert last.name == "epoch-0001"
    weights = torch.load(last / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert trainer_state(last)["loop"]["epoch"] == 1
