"""Shared test helpers: tiny shard folders in the contract's format, written with webdataset directly."""

from __future__ import annotations

import hashlib
import io
import json
import os
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
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            *map(str, target)]  # fmt: skip


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


def pytest_collection_modifyitems(items):
    """Slurm and 2-process tests are slow too: `pytest -m "not slow"` leaves them out of the inner loop."""
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
def cluster(tmp_path_factory):
    """Two slurmd (lkn1, lkn2) on this host (tests/slurm/cluster.sh), one for the whole session (the Slurm
    tests of test_slurm.py and test_sweep.py share it); torn down (by PID) after the session. Under
    `pytest -n 2` (make test) each worker that runs Slurm tests starts its own: free ports, its own folder."""
    d = tmp_path_factory.mktemp("slurm")
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
