"""Shared test helpers: tiny shard folders in the contract's format, written with webdataset directly."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["nevus", "melanoma", "seborrheic_keratosis"]
CLUSTER = Path(__file__).resolve().parent / "slurm" / "cluster.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ddp(*target, procs: int = 2) -> list[str]:
    """argv of `accelerate launch --multi_gpu` running `target` (a script and its flags, or `-m module ...`)
    in `procs` processes: a real gloo DDP job on CPUs when run with ACCELERATE_USE_CPU=1 in the env."""
    accelerate = Path(sys.executable).with_name("accelerate")
    return [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(procs),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *map(str, target),
    ]


def make_shards(
    folder,
    n: int,
    num_shards: int,
    size: int = 32,
    classes=CLASSES,
    labels=None,
    corrupt=(),
    prefix: str = "ISIC_",
    seed: int = 0,
) -> dict:
    """Write `n` samples into `num_shards` nearly equal shards + manifest.json; return the manifest.

    Images are `size` x `size * 5 // 4` (shorter side = size, like pack output), labels round-robin
    over `classes` unless given; sample indices in `corrupt` get bytes that are not a JPEG.
    """
    import webdataset as wds

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = [i % len(classes) for i in range(n)] if labels is None else list(labels)
    shards = []
    for s, idx in enumerate(np.array_split(np.arange(n), num_shards)):
        name = f"shard-{s:06d}.tar"
        counts = dict.fromkeys(classes, 0)
        with wds.TarWriter(str(folder / name)) as sink:
            for i in idx.tolist():
                key, label = f"{prefix}{i:07d}", labels[i]
                pixels = rng.integers(0, 256, (size, size * 5 // 4, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                jpeg = b"not a jpeg" if i in corrupt else buf.getvalue()
                info = {
                    "id": key,
                    "label": label,
                    "label_name": classes[label],
                    "width": size * 5 // 4,
                    "height": size,
                    "meta": {},
                }
                sink.write(
                    {
                        "__key__": key,
                        "jpg": jpeg,
                        "cls": str(label).encode("ascii"),
                        "json": json.dumps(info).encode("utf-8"),
                    }
                )
                counts[classes[label]] += 1
        data = (folder / name).read_bytes()
        shards.append(
            {
                "name": name,
                "num_samples": len(idx),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "counts": counts,
            }
        )
    totals = {c: sum(sh["counts"][c] for sh in shards) for c in classes}
    manifest = {
        "format_version": 1,
        "lesionkit_version": "0.1.0",
        "classes": list(classes),
        "num_samples": n,
        "counts": totals,
        "shards": shards,
        "params": {"size": size, "quality": 90, "shard_size": -(-n // num_shards), "seed": seed},
        "sources": {"images": "synthetic", "labels": "synthetic", "metadata": None},
        "skipped": [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# ------------------------------------------------------------------ `pytest -n 2` (make test): work units
# xdist hands each worker whole units (the scheduler below): a test file is a unit, except that the files
# sharing an expensive session fixture are one unit together, so one worker makes that fixture once (and
# only one Slurm cluster runs: two workers would each start one and submit every job of test_slurm.py
# twice). A test using one of these fixtures outside its unit fails at its setup (`check_units`).
JOINED = {
    "slurm": ("tests/test_slurm.py", "tests/test_sweep.py"),  # `cluster`
    "registry": ("tests/test_export.py", "tests/test_explain.py"),  # `registry_checkpoint`
    "faults": ("tests/faults/",),  # `zygote` (a trainer fork server), `shards` of tests/faults/conftest.py
}
SESSION_FIXTURES = {"cluster": "slurm", "registry_checkpoint": "registry", "zygote": "faults"}
# Seconds per unit in `make test` (--junitxml summed per unit: 2,037 s of tests in 1,041 s on the 2-core EPYC,
# 2026-12-03, at nice 19 beside another training job). The longest waiting unit goes first and the short ones
# fill in behind (longest processing time first): with these numbers both workers get ~1,018 s. Only the
# order depends on them; refresh them when a unit changes a lot. A unit not listed counts 10 s.
UNIT_SECONDS = {
    "tests/test_demo.py": 318,
    "slurm": 290,
    "faults": 225,
    "tests/test_train.py": 200,
    "registry": 186,
    "tests/test_runs.py": 130,
    "tests/test_gpu_bench.py": 165,  # 130 alone, quiet, 2026-12-04, + the threads part (2 e2e runs)
    "tests/test_folds.py": 126,
    "tests/test_remote.py": 81,
    "tests/test_merge.py": 52,
    "tests/test_metadata.py": 77,
    "tests/test_readme_sequence.py": 48,
    "tests/test_evaluate.py": 39,
    "tests/test_bench.py": 37,
    "tests/test_reproducible.py": 32,
    "tests/test_dedup.py": 28,
    "tests/test_data_ddp.py": 23,
    "tests/test_models.py": 19,
    "tests/test_weights.py": 18,
    "tests/test_data.py": 17,
    "tests/test_pack.py": 16,
    "tests/test_tasks.py": 15,
    "tests/test_modelcard.py": 14,
    "tests/test_accelerate_configs.py": 14,
    "tests/test_ensemble.py": 14,
    "tests/test_api.py": 13,
    "tests/test_synth.py": 12,
    "tests/test_style.py": 8,
    "tests/test_augment.py": 8,
    "tests/test_isic_scoring.py": 7,
    "tests/test_compare.py": 4,
    "tests/test_download.py": 4,
    "tests/test_config.py": 3,
    "tests/test_planning.py": 3,
    "tests/test_pack_errors.py": 3,
    "tests/test_metrics.py": 2,
    "tests/test_cli.py": 2,
    "tests/test_optim.py": 0,
}
UNIT_SECONDS_DEFAULT = 10.0


def unit_of(nodeid: str) -> str:
    """The work unit of a test id (`tests/test_x.py::test_y[...]`): a JOINED name, or the test's file."""
    path = nodeid.split("::", 1)[0]
    for unit, members in JOINED.items():
        if any(path == m or (m.endswith("/") and path.startswith(m)) for m in members):
            return unit
    return path


STRAY = pytest.StashKey[str]()


def check_units(items) -> None:
    """Every test that uses a shared session fixture belongs to that fixture's unit (one cluster, ...): one
    that does not fails at its setup, before any fixture is made, saying which unit to add its file to
    (an error raised here would be lost in an xdist worker's internal error)."""
    for item in items:
        stray = [
            f"{item.nodeid} uses `{name}` but is not in the {unit!r} unit: add its file to that unit in "
            "tests/conftest.py JOINED (so that one worker makes the fixture once)"
            for name, unit in SESSION_FIXTURES.items()
            if name in item.fixturenames and unit_of(item.nodeid) != unit
        ]
        if stray:
            item.stash[STRAY] = "\n".join(stray)


def pytest_runtest_setup(item):
    if STRAY in item.stash:
        pytest.fail(item.stash[STRAY], pytrace=False)


def pytest_xdist_make_scheduler(config, log):
    """`pytest -n N` (the default --dist load): whole units (above), longest first. Other --dist modes are
    xdist's own."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            # xdist pops the front of its queue: move the longest unit waiting there first
            longest = max(self.workqueue, key=lambda unit: UNIT_SECONDS.get(unit, UNIT_SECONDS_DEFAULT))
            self.workqueue.move_to_end(longest, last=False)
            self.log(f"unit {longest} -> {node.gateway.id}")
            super()._assign_work_unit(node)

    return UnitScheduling(config, log)


def pytest_collection_modifyitems(items):
    """Slurm and 2-process tests are slow too: `pytest -m "not slow"` leaves them out of the inner loop."""
    check_units(items)
    for item in items:
        if item.get_closest_marker("slurm") or item.get_closest_marker("ddp"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def registry_checkpoint(tmp_path_factory):
    """name -> a 64 px checkpoint of that registry model (seeded random weights), made once per session:
    the export and explain tests share them (AlexNet's alone is 240 MB to write)."""
    from tests.test_evaluate import make_checkpoint

    root, made = tmp_path_factory.mktemp("registry"), {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_checkpoint(root / name, model=name, image_size=64)
        return made[name]

    return get


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, pytestconfig):
    """Two slurmd (lkn1, lkn2) on this host (tests/slurm/cluster.sh), one for the whole session (the Slurm
    tests of test_slurm.py and test_sweep.py share it); torn down (by PID) after the session. Under
    `pytest -n 2` (make test) the Slurm tests are one work unit (JOINED), so one worker starts the one
    cluster; a second one in the session fails here (other --dist modes may start one per worker)."""
    d = tmp_path_factory.mktemp("slurm")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and pytestconfig.getvalue("dist") == "load":
        first = tmp_path_factory.getbasetemp().parent / "slurm-cluster"  # the session's folder, all workers
        try:
            with open(first, "x") as f:
                f.write(worker)
        except FileExistsError:
            pytest.fail(
                f"{worker}: a second Slurm cluster in this session ({first.read_text()} has one): "
                "tests/conftest.py JOINED should keep the Slurm tests in one unit"
            )
    up = subprocess.run(
        ["bash", str(CLUSTER), "up", "--dir", str(d), "--nodes", "2", "--cpus", "3"],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert up.returncode == 0, up.stderr
    env = dict(os.environ, SLURM_CONF=str(d / "etc" / "slurm.conf"))
    yield env
    down = subprocess.run(
        ["bash", str(CLUSTER), "down", "--dir", str(d)],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert down.returncode == 0, down.stderr


def wait_until(predicate, what, timeout=600, poll=0.2):
    """Poll `predicate` until it returns something truthy (returned); fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


SLURM_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")  # the job states that are final


def scontrol_job(env, job: str) -> dict:
    """`scontrol show job` of one job (or array task, `ARRAY_TASK`) as a dict of its fields."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _signal_masks(pid: int) -> dict[str, int]:
    """The signal masks of /proc/PID/status (SigPnd, ShdPnd, SigIgn, SigCgt), as ints."""
    fields = [line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines()]
    return {k: int(v, 16) for k, v in fields if k in ("SigPnd", "ShdPnd", "SigIgn", "SigCgt")}


@contextlib.contextmanager
def usr1_lands_while_training(env, job: str, timeout: float = 120):
    """Around the `scancel --signal=USR1 --batch` of a running job: its trainers (the python processes of
    the job that catch SIGUSR1) are stopped (SIGSTOP) first, and continued only once the USR1 that Slurm
    forwards through the batch shell and srun is pending in each, so a short training cannot finish before
    the signal lands, however loaded the machine (it raced when it could: "ended without a requeue")."""
    job_id = scontrol_job(env, job)["JobId"]  # an array task's own id
    listed = subprocess.run(
        ["scontrol", "listpids", job_id], env=env, capture_output=True, text=True, check=True
    )
    pids = [int(line.split()[0]) for line in listed.stdout.splitlines()[1:] if line.split()]
    usr1 = 1 << (signal.SIGUSR1 - 1)

    def is_trainer(pid: int) -> bool:
        try:
            python = Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("python")
            return python and bool(_signal_masks(pid)["SigCgt"] & usr1)
        except (FileNotFoundError, ProcessLookupError):
            return False

    trainers = [pid for pid in pids if is_trainer(pid)]
    assert trainers, f"job {job}: no process catching SIGUSR1 among {pids}"
    for pid in trainers:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield trainers

        def pending() -> bool:
            return all((m := _signal_masks(pid))["SigPnd"] & usr1 or m["ShdPnd"] & usr1 for pid in trainers)

        wait_until(pending, f"SIGUSR1 to reach the stopped trainers {trainers} of job {job}", timeout)
    finally:
        for pid in trainers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
