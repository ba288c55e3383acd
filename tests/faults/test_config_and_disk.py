"""An unwritable or full disk: one clear line before training (and before any process group: these runs pose
as rank 0 of a 2-process job whose rank 1 never comes, so a process group would hang them), and a failed
checkpoint save leaves the previous checkpoint in place. Configuration errors: tests/test_config.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lesionkit.checkpoint import trainer_state
from tests.conftest import free_port, make_shards
from tests.faults.conftest import train_cmd


def lone_rank0() -> dict:
    return {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "ACCELERATE_USE_CPU": "1",
    }


def assert_one_line_error(rc: int, out: str, *needles: str, code: int = 2) -> str:
    errors = [x for x in out.splitlines() if x.startswith("lesionkit train: error:")]
    assert rc == code and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def one_epoch(zygote, shards, tmp_path_factory):
    """A finished 1-epoch run: the checkpoint the --resume and disk tests start from."""
    out = tmp_path_factory.mktemp("one") / "run"
    rc, text = zygote.run(
        train_cmd(shards, out, "--epochs", "1", "--max-steps-per-epoch", "2"), out.parent / "log"
    )
    assert rc == 0, text[-3000:]
    return out


def test_evaluate_refuses_data_with_another_class_set(zygote, one_epoch, tmp_path):
    make_shards(tmp_path / "two", 20, 2, size=40, classes=["nevus", "melanoma"])
    rc, out = zygote.run(
        [
            "evaluate",
            "--checkpoint",
            one_epoch / "last",
            "--data",
            tmp_path / "two",
            "--workers",
            "0",
            "--out",
            tmp_path / "eval",
        ],
        tmp_path / "log",
        timeout=60,
    )
    lines = [x for x in out.splitlines() if x.startswith("lesionkit evaluate: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert "seborrheic_keratosis" in lines[0] and "['nevus', 'melanoma']" in lines[0]
    assert not (tmp_path / "eval").exists()


def test_unwritable_or_full_output_dir_fails_before_training(zygote, shards, tmp_path):
    # root ignores permission bits, so: a folder below a regular file (ENOTDIR) ...
    (tmp_path / "file").write_text("not a folder")
    rc, out = zygote.run(
        train_cmd(shards, tmp_path / "file" / "run"), tmp_path / "log1", timeout=60, env=lone_rank0()
    )
    assert_one_line_error(
        rc, out, f"output dir {tmp_path / 'file' / 'run'} is not writable", "Not a directory"
    )
    # ... and a full disk, as a 64 KiB file size limit (writes past it fail with EFBIG)
    rc, out = zygote.run(
        train_cmd(shards, tmp_path / "full"),
        tmp_path / "log2",
        timeout=60,
        env=lone_rank0(),
        fsize_limit=64 << 10,
    )
    assert_one_line_error(rc, out, f"output dir {tmp_path / 'full'} is not writable", "File too large")
    assert not (tmp_path / "full" / "checkpoints").exists()


def test_disk_full_during_checkpoint_keeps_the_previous_one(zygote, shards, one_epoch, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_epoch, run, symlinks=True)
    before = (run / "last").resolve()
    weights = torch.load(run / "last" / "model.pt", weights_only=True)
    # 2 MiB per file: the 1 MiB write probe passes, the epoch-2 checkpoint (6 MB weights) does not fit
    rc, out = zygote.run(
        train_cmd(shards, run, "--epochs", "2", "--max-steps-per-epoch", "2", "--resume"),
        tmp_path / "log",
        fsize_limit=2 << 20,
    )
    line = assert_one_line_error(
        rc,
        out,
        "could not write checkpoint epoch-0002",
        "File too large",
        "disk full",
        f"{run}/last is unchanged",
        code=1,
    )
    assert "resumed from" in out, line
    assert (run / "last").resolve() == before and before.name == "epoch-0001"
    for name, tensor in torch.load(run / "last" / "model.pt", weights_only=True).items():
        assert torch.equal(tensor, weights[name])
    assert trainer_state(run / "last")["loop"]["epoch"] == 1
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial save was removed
    assert json.loads((run / "last" / "info.json").read_text())["epoch"] == 1
