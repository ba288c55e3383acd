"""Pretrained weights on offline nodes: `lesionkit weights fetch` from a mirror (a loopback HTTP server
serving the efficientnet-lite0 package's file), every file checked against the sha256 prefix in its name,
and training from the cache with no way out to the internet. Nothing is downloaded from outside."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lesionkit.cli import run_command
from lesionkit.manifest import sha256_file
from lesionkit.models import lite0_package_weights
from tests.conftest import make_shards
from tests.loopback import serve
from tests.test_train import TINY

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}


def test_fetch_from_a_mirror_fills_the_cache_once(tmp_path, capsys):
    package = lite0_package_weights()
    (tmp_path / "site").mkdir()
    shutil.copy(package, tmp_path / "site" / package.name)
    cache = tmp_path / "cache"
    with serve(tmp_path / "site") as mirror:
        args = ["fetch", "efficientnet_lite0", "--weights-cache", str(cache), "--mirror", mirror.url]
        assert run_command("weights", args) == 0
        assert run_command("weights", args) == 0  # already there: nothing downloaded again
        assert mirror.requests == {f"/{package.name}": 1}
    cached = cache / "checkpoints" / package.name
    assert sha256_file(cached) == sha256_file(package)
    out = capsys.readouterr().out
    assert f"efficientnet_lite0: {cached}\n" in out and f"efficientnet_lite0: {cached} (already there)" in out
    assert f"train offline with --weights-cache {cache}" in out


def test_a_file_that_fails_its_hash_is_refused_and_never_cached(tmp_path, capsys):
    (tmp_path / "site").mkdir()
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "site" / "resnet18-f37072fd.pth")  # wrong bytes
    cache = tmp_path / "cache"
    with serve(tmp_path / "site") as mirror:
        rc = run_command(
            "weights", ["fetch", "resnet18", "--weights-cache", str(cache), "--mirror", mirror.url]
        )
    assert rc == 1
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth: invalid hash value" in err and "refused, nothing cached" in err
    assert list((cache / "checkpoints").iterdir()) == []
    assert run_command("weights", ["fetch", "customnet", "--weights-cache", str(cache)]) == 2
    assert "customnet has no pretrained weights to fetch; models that do: " in capsys.readouterr().err


def test_a_missing_weight_offline_names_the_fetch_command(tmp_path, monkeypatch, capsys):
    for var, value in OFFLINE.items():
        monkeypatch.setenv(var, value)
    make_shards(tmp_path / "d", 8, 2)
    empty = tmp_path / "empty"
    args = [*TINY, "--model", "resnet18", "--pretrained", "--weights-cache", str(empty), "--cpu"]
    args += [
        "--train",
        str(tmp_path / "d"),
        "--val",
        str(tmp_path / "d"),
        "--output-dir",
        str(tmp_path / "r"),
    ]
    assert run_command("train", args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no pretrained weights for resnet18 in {empty}" in err[0]
    assert f"`lesionkit weights fetch resnet18 --weights-cache {empty}`" in err[0]
    monkeypatch.setenv("LESIONKIT_WEIGHTS_CACHE", str(empty))  # the environment variable does the same
    assert run_command("train", [a for a in args if a not in ("--weights-cache", str(empty))]) == 2
    assert "lesionkit weights fetch resnet18" in capsys.readouterr().err


@pytest.mark.slow
def test_training_offline_loads_the_cached_weights(tmp_path):
    cache = tmp_path / "cache"
    assert run_command("weights", ["fetch", "efficientnet_lite0", "--weights-cache", str(cache)]) == 0
    cached = cache / "checkpoints" / lite0_package_weights().name
    make_shards(tmp_path / "d", 32, 2)
    env = dict(os.environ, **OFFLINE, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "lesionkit" / "train.py"), *TINY, "--model", "efficientnet_lite0"]
    cmd += ["--pretrained", "--weights-cache", str(cache), "--epochs", "1", "--max-steps-per-epoch", "1"]
    cmd += ["--train", str(tmp_path / "d"), "--val", str(tmp_path / "d"), "--output-dir", str(tmp_path / "r")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"lesionkit plan: initial weights: {cached}" in proc.stdout
    assert (tmp_path / "r" / "last" / "model.pt").is_file()
