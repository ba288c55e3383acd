"""Untrusted files: a checkpoint pickle carrying code is refused by --resume, evaluate and predict without
running it; a W&B API key is written nowhere; a shard with path tricks in member names extracts nothing."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.faults.conftest import train_cmd

SECRET = "wandb-secret-0123456789abcdef"


class Payload:
    """Unpickling this runs `touch MARKER` (what an attacker's checkpoint would do with any command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained(zygote, shards, tmp_path_factory):
    """A 1-epoch run with W&B offline and an API key in the environment."""
    out = tmp_path_factory.mktemp("trusted") / "run"
    rc, text = zygote.run(
        train_cmd(shards, out, "--epochs", "1", "--max-steps-per-epoch", "2", "--wandb"),
        out.parent / "log",
        env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"},
    )
    assert rc == 0, text[-3000:]
    return out, text


def poisoned_copy(run: Path, dest: Path, name: str) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    marker = dest.parent / f"PWNED-{name}"
    torch.save({"state": Payload(marker)}, (dest / "last").resolve() / name)
    return marker


@pytest.mark.parametrize(
    "name", ["model.pt", "custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"]
)
def test_resume_refuses_a_pickle_payload(zygote, shards, trained, tmp_path, name):
    run = tmp_path / "run"
    marker = poisoned_copy(trained[0], run, name)
    rc, out = zygote.run(
        train_cmd(shards, run, "--epochs", "2", "--max-steps-per-epoch", "2", "--resume"), tmp_path / "log"
    )
    errors = [x for x in out.splitlines() if x.startswith("lesionkit train: error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert f"{name}: refused to load, it holds more than tensors" in errors[0] and "posix.system" in errors[0]
    assert not marker.exists()
    assert (run / "last").resolve().name == "epoch-0001"  # nothing trained on top of it


def test_evaluate_and_predict_refuse_a_pickle_payload(zygote, shards, trained, tmp_path):
    marker = poisoned_copy(trained[0], tmp_path / "run", "model.pt")
    ckpt = tmp_path / "run" / "last"
    for cmd in (
        [
            "evaluate",
            "--checkpoint",
            ckpt,
            "--data",
            shards["val"],
            "--workers",
            "0",
            "--out",
            tmp_path / "eval",
        ],
        [
            "predict",
            "--checkpoint",
            ckpt,
            "--data",
            shards["val"],
            "--workers",
            "0",
            "--out",
            tmp_path / "sub.csv",
        ],
    ):
        rc, out = zygote.run(cmd, tmp_path / f"{cmd[0]}.log")
        errors = [x for x in out.splitlines() if x.startswith(f"lesionkit {cmd[0]}: error:")]
        assert rc != 0 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
        assert "model.pt: refused to load" in errors[0], errors[0]
    assert not marker.exists() and not (tmp_path / "eval").exists() and not (tmp_path / "sub.csv").exists()


def test_wandb_api_key_is_written_nowhere(trained):
    out, text = trained
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "W&B really ran"
    assert SECRET not in text
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaks = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_shard_member_names_with_path_tricks_are_read_never_extracted(zygote, trained, tmp_path):
    """lesionkit reads tar members into memory and never extracts: `../` and absolute names stay strings."""
    outside = tmp_path / "outside"
    tricks = ["ISIC_0000000", "../evil", "../../evil2", f"{outside}/evil3"]
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, key in enumerate(tricks):
            info_json = json.dumps({"id": key, "label": i % 3}).encode()
            for ext, data in (("cls", str(i % 3).encode()), ("jpg", jpeg()), ("json", info_json)):
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    with tarfile.open(folder / "shard-000000.tar") as tar:
        assert {m.name for m in tar.getmembers()} >= {"../evil.jpg", f"{outside}/evil3.jpg"}
    counts = {"nevus": 2, "melanoma": 1, "seborrheic_keratosis": 1}
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "classes": list(counts),
                "num_samples": 4,
                "counts": counts,
                "shards": [{"name": "shard-000000.tar", "num_samples": 4, "counts": counts}],
                "params": {"size": 40},
            }
        )
    )

    work = tmp_path / "a" / "b" / "cwd"  # `../` and `../../` from here land in tmp_path/a, tmp_path
    work.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    rc, out = zygote.run(
        [
            "predict",
            "--checkpoint",
            trained[0] / "last",
            "--data",
            folder,
            "--workers",
            "0",
            "--format",
            "isic-scoring",
            "--out",
            work / "sub.csv",
        ],
        tmp_path / "log",
        cwd=work,
    )
    assert rc == 0, out[-3000:]
    created = {p for p in tmp_path.rglob("*")} - before
    assert created == {work / "sub.csv", tmp_path / "log"}, created
    assert not outside.exists() and not list(tmp_path.rglob("evil*"))
    ids = [line.split(",")[0] for line in (work / "sub.csv").read_text().splitlines()[1:]]
    assert sorted(ids) == sorted(tricks)  # read as plain keys, each exactly once
