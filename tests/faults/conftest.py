"""Fixtures of the fault-injection suite: tiny shards, a fork server for fast trainer starts, run helpers."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_shards
from tests.test_train import TINY

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# The trainer of tests/test_train.py, in-process data loading (no worker processes to outlive a kill -9).
FAST = [*TINY, "--workers", "0"]


def base_env() -> dict:
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true"
    )
    env.pop("WANDB_API_KEY", None)
    return env


class Child:
    """One command forked by the zygote: a real process with its own pid, log file and exit code."""

    def __init__(self, zygote: Zygote, pid: int, log: Path):
        self.zygote, self.pid, self.log = zygote, pid, log
        self.rc: int | None = None
        self.cpu_s = 0.0

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.rc is None and not self.zygote.poll_exit(self, 0)

    def cpu_now(self) -> float:
        """CPU seconds the process has used so far (utime + stime from /proc), 0 once it is gone."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait(self, timeout: float) -> int:
        if self.rc is None and not self.zygote.poll_exit(self, timeout):
            raise TimeoutError(f"pid {self.pid} still running after {timeout} s:\n{self.output()[-3000:]}")
        return self.rc

    def kill(self, sig: int = 9) -> None:
        if self.rc is None:
            os.kill(self.pid, sig)


class Zygote:
    """Client of tests/faults/zygote.py (see there why): start(argv) -> Child."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=base_env(),
        )
        self.buf = b""
        self.current: Child | None = None

    def _line(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left < 0 or not select.select([self.proc.stdout], [], [], max(left, 0))[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"zygote died (rc {self.proc.poll()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def start(
        self, argv: list[str], log: Path, env: dict | None = None, fsize_limit: int = 0, cwd: Path = REPO
    ) -> Child:
        assert self.current is None or self.current.rc is not None, "one child at a time"
        req = {
            "argv": [str(a) for a in argv],
            "log": str(log),
            "env": env or {},
            "cwd": str(cwd),
            "fsize_limit": fsize_limit,
        }
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        msg = self._line(120)
        assert msg is not None, "zygote did not fork in 120 s"
        self.current = Child(self, msg["pid"], Path(log))
        return self.current

    def poll_exit(self, child: Child, timeout: float) -> bool:
        msg = self._line(timeout)
        if msg is None:
            return False
        assert msg["pid"] == child.pid
        child.rc, child.cpu_s = msg["rc"], msg["cpu_s"]
        return True

    def run(self, argv: list[str], log: Path, timeout: float = 180, **kw) -> tuple[int, str]:
        child = self.start(argv, log, **kw)
        return child.wait(timeout), child.output()

    def close(self):
        if self.current is not None and self.current.rc is None:
            self.current.kill()
        self.proc.kill()  # it holds no state worth a slow interpreter shutdown
        self.proc.wait(30)


@pytest.fixture(scope="session")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> dict[str, Path]:
    """160 train / 60 val noise images stored at 40 px: 8 + 3 shards (2 ranks x 1 worker fit)."""
    root = tmp_path_factory.mktemp("fault-shards")
    make_shards(root / "train", 160, 8, size=40, seed=1)
    make_shards(root / "val", 60, 3, size=40, seed=2)
    return {"train": root / "train", "val": root / "val"}


def data_args(shards: dict, out: Path) -> list[str]:
    return ["--train", str(shards["train"]), "--val", str(shards["val"]), "--output-dir", str(out)]


def train_cmd(shards: dict, out: Path, *extra) -> list[str]:
    """argv of `lesionkit train` with the tiny fast config."""
    return ["train", *FAST, *data_args(shards, out), *map(str, extra)]
