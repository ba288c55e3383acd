"""Shards over HTTP, S3 and `pipe:` against real servers on loopback: a static HTTP server started here
(tests/loopback.py, faults injected per request) and moto's standalone S3 server. The same samples as from
local disk; a dropped connection resumed; 404, refused connections and corrupt bytes as one clear error
naming the URL; the cache keeping only verified shards; untrusted manifests refused before any fetch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lesionkit import sources
from lesionkit.cli import run_command
from lesionkit.data import eval_loader, train_loader
from lesionkit.errors import CorruptDataError, RunError, UsageError
from lesionkit.manifest import read_manifest, sha256_file
from tests.conftest import cpu_ddp, make_shards
from tests.loopback import serve
from tests.test_train import TINY

REPO = Path(__file__).resolve().parents[1]
QUICK = sources.Fetch(retries=2, backoff_s=0.05)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    make_shards(root / "train", 48, 4)
    return root


@pytest.fixture
def server(root):
    with serve(root) as srv:
        yield srv


def samples(location, workers=0, fetch=QUICK) -> list[tuple]:
    """(key, label, pixel sum) of every sample the evaluation reader yields, sorted."""
    out = []
    for batch in eval_loader(
        location, image_size=32, batch_size=8, workers=workers, rank=0, world_size=1, fetch=fetch
    ):
        out += zip(batch.keys, batch.labels.tolist(), batch.images.sum((1, 2, 3)).tolist())
    return sorted(out)


def batches(location, fetch=QUICK) -> list[list[str]]:
    """Keys of each training batch, in order: the shard plan and shuffle must not depend on the origin."""
    loader = train_loader(
        location, image_size=32, batch_size=8, workers=2, seed=3, epoch=0, rank=0, world_size=1, fetch=fetch
    )
    return [list(b.keys) for b in loader]


def test_http_shards_read_as_from_disk_and_a_dropped_connection_is_resumed(root, server):
    local = samples(root / "train")
    assert len(local) == 48
    shard = "/train/shard-000001.tar"
    server.fault(shard, "drop")  # the first GET breaks half-way through the shard
    assert samples(f"{server.url}/train/", workers=2) == local
    assert server.requests[shard] == 2  # retried once, resumed past the bytes already read
    assert batches(f"{server.url}/train") == batches(root / "train")


def test_missing_shard_or_folder_and_refused_connection_name_the_url(root, server):
    server.fault("/train/shard-000002.tar", "missing")
    with pytest.raises(RunError, match=rf"{server.url}/train/shard-000002.tar: not found \(HTTP 404"):
        samples(f"{server.url}/train/")
    assert server.requests["/train/shard-000002.tar"] == 1  # a 404 is final, not retried
    with pytest.raises(UsageError, match=rf"{server.url}/nowhere/manifest.json: not found"):
        samples(f"{server.url}/nowhere/")
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(
        UsageError, match=rf"127.0.0.1:{port}/train/manifest.json: Cannot connect.*after 3 attempts"
    ):
        samples(f"http://127.0.0.1:{port}/train/")


def test_a_corrupt_byte_is_refused_by_sha256_streamed_or_cached(root, server, tmp_path):
    shard = "/train/shard-000003.tar"
    server.fault(shard, "corrupt")
    with pytest.raises(
        CorruptDataError, match=r"shard .*/train/shard-000003.tar is corrupt: sha256 .* differs"
    ):
        samples(f"{server.url}/train/")

    cache = tmp_path / "cache"
    server.fault(shard, "corrupt", times=3)  # every try of a 2-retry fetch
    with pytest.raises(CorruptDataError, match="every download was corrupt.*refused, nothing cached"):
        samples(f"{server.url}/train/", fetch=sources.Fetch(cache_dir=str(cache), retries=2, backoff_s=0.05))
    assert not any(p.name.endswith("shard-000003.tar") or ".tmp-" in p.name for p in cache.iterdir())

    server.fault(shard, "corrupt")  # once: refused, fetched again, and the good copy kept
    before = server.requests[shard]
    fetch = sources.Fetch(cache_dir=str(cache), retries=2, backoff_s=0.05)
    assert samples(f"{server.url}/train/", fetch=fetch) == samples(root / "train")
    assert server.requests[shard] - before == 2
    manifest = read_manifest(root / "train")
    cached = sorted(cache.iterdir())
    assert [p.name for p in cached] == sorted(f"{s['sha256']}-{s['name']}" for s in manifest["shards"])
    assert all(sha256_file(p) == p.name.split("-")[0] for p in cached)
    total = sum(server.requests.values())
    assert samples(f"{server.url}/train/", fetch=fetch) == samples(root / "train")
    assert sum(server.requests.values()) - total == 2  # the manifest only: every shard from the cache


@pytest.mark.parametrize(
    "name", ["../shard-000000.tar", "sub/shard-000000.tar", "http://evil/x.tar", "pipe:touch PWNED"]
)
def test_untrusted_manifest_names_are_refused_before_anything_is_fetched(root, tmp_path, name):
    folder = tmp_path / "site" / "train"
    shutil.copytree(root / "train", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][1]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    cache = tmp_path / "cache"
    with serve(tmp_path / "site") as srv:
        with pytest.raises(UsageError, match=r"shard name .* refused: a name with '/', '..' or a scheme"):
            samples(f"{srv.url}/train/", fetch=sources.Fetch(cache_dir=str(cache)))
        assert set(srv.requests) == {"/train/manifest.json"}
    assert not cache.exists() and not list(tmp_path.rglob("PWNED"))


def test_pipe_command_shards_and_a_failing_command(root):
    assert samples(f"pipe:cat {root}/train/{{shard}}", workers=2) == samples(root / "train")
    with pytest.raises(UsageError, match=r"pipe:cat .*/missing/manifest.json: `cat .*` exited with status 1"):
        samples(f"pipe:cat {root}/missing/{{shard}}")
    with pytest.raises(UsageError, match=r"names the file with \{shard\}"):
        samples(f"pipe:cat {root}/train/manifest.json")


@pytest.fixture(scope="module")
def s3(root):
    """moto's standalone S3 server on loopback, holding a copy of the shards."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="lesionkit-test")
    for path in (root / "train").iterdir():
        client.upload_file(str(path), "lesionkit-test", f"isic/train/{path.name}")
    yield "s3://lesionkit-test/isic/train/"
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


@pytest.mark.slow
def test_s3_shards_from_a_local_s3_server_match_local_disk(root, s3, tmp_path):
    local = samples(root / "train")
    assert samples(s3, workers=2) == local
    assert batches(s3) == batches(root / "train")
    assert samples(s3, fetch=sources.Fetch(cache_dir=str(tmp_path / "c"))) == local
    assert len(list((tmp_path / "c").iterdir())) == 4
    with pytest.raises(UsageError, match="s3://lesionkit-test/none/manifest.json: not found"):
        samples("s3://lesionkit-test/none/")


@pytest.mark.ddp
def test_two_rank_ddp_training_over_http_ends_with_the_weights_of_local_disk(tmp_path):
    make_shards(tmp_path / "data" / "train", 128, 8, seed=1)
    make_shards(tmp_path / "data" / "val", 40, 3, seed=2, prefix="VAL_")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    flags = [*TINY, "--epochs", "2", "--workers", "1", "--fetch-retries", "2"]

    def run(out, train, val):
        cmd = cpu_ddp(
            REPO / "lesionkit" / "train.py", *flags, "--train", train, "--val", val, "--output-dir", out
        )
        proc = subprocess.run(
            cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    local = tmp_path / "local"
    run(local, tmp_path / "data" / "train", tmp_path / "data" / "val")
    with serve(tmp_path / "data") as srv:
        srv.fault("/train/shard-000005.tar", "drop")
        out = run(tmp_path / "http", f"{srv.url}/train/", f"{srv.url}/val/")
        assert srv.requests["/train/shard-000005.tar"] >= 3  # 2 epochs, one retry
        cache = tmp_path / "cache"
        args = ["--checkpoint", tmp_path / "http" / "best", "--data", f"{srv.url}/val/", "--cache-dir", cache]
        assert run_command("evaluate", [*map(str, args), "--bootstrap", "0", "--workers", "0"]) == 0
    scored = json.loads((tmp_path / "http" / "eval-val" / "metrics.json").read_text())
    assert scored["n"] == 40 and len(list(cache.iterdir())) == 3  # every val sample; each shard verified
    assert "2 process(es) = 1 node(s) x 2" in out
    for run_dir in (local, tmp_path / "http"):
        assert json.loads((run_dir / "world.json").read_text())["world_size"] == 2
    a = torch.load(local / "last" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "http" / "last" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (local, tmp_path / "http")]
    assert metrics[0]["isic2017_score"] == metrics[1]["isic2017_score"]  # every val sample scored once


def test_stats_verify_refuses_remote_folders(server):
    res = subprocess.run(
        [sys.executable, "-m", "lesionkit.cli", "stats", f"{server.url}/train/", "--verify"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=REPO,
    )
    assert res.returncode == 2 and "remote shards are checked as they are read" in res.stderr, res.stderr
