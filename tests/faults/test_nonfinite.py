"""--skip-nonfinite: a step whose loss is NaN/inf is skipped (no update) and counted, instead of stopping; a
diverged model still stops the run at validation. (Stopping on every rank at once: test_ddp_faults.py.)"""

from __future__ import annotations

import io
import json
import tarfile

import torch

from lesionkit.checkpoint import trainer_state
from tests.conftest import make_shards
from tests.faults.conftest import train_cmd

BATCHES = ["--batch-size", "16", "--shuffle-buffer", "1", "--epochs", "2"]


def unlabel(shard) -> list[str]:
    """Rewrite every label in `shard` to -100, cross-entropy's ignore index: a batch of only such samples
    has a 0/0 = NaN loss. Returns the keys."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            data = b"-100" if m.name.endswith(".cls") else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return sorted({m.name.split(".", 1)[0] for m, _ in members})


def test_skip_nonfinite_skips_exactly_the_nan_steps(zygote, shards, tmp_path):
    data = tmp_path / "train"
    make_shards(data, 128, 4, size=40, seed=3)  # 4 shards x 32 samples = 2 whole batches each, no shuffling
    keys = unlabel(data / "shard-000002.tar")
    args = {"train": data, "val": shards["val"]}

    rc, text = zygote.run(train_cmd(args, tmp_path / "stop", *BATCHES), tmp_path / "stop.log")
    assert rc == 1, text[-3000:]
    error = next(x for x in text.splitlines() if "lesionkit train: error: non-finite loss at epoch 0" in x)
    assert "lr 0.01" in error and any(k in error for k in keys)  # the crafted shard's keys are named

    out = tmp_path / "skip"
    rc, text = zygote.run(train_cmd(args, out, *BATCHES, "--skip-nonfinite"), tmp_path / "skip.log")
    assert rc == 0, text[-3000:]
    history = trainer_state(out / "last")["loop"]["history"]
    assert [row["nonfinite"] for row in history] == [2, 2]  # the 2 all-unlabelled batches of each epoch
    rows = [x.split() for x in text.splitlines() if x.split()[:1] in (["1"], ["2"])]
    assert [r[-1] for r in rows] == ["2", "2"]
    weights = torch.load(out / "last" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_skip_nonfinite_does_not_hide_a_diverged_model(zygote, shards, tmp_path):
    out = tmp_path / "run"
    # epoch 1 at lr 0.01 (checkpointed), then lr x1e10: one finite step blows the weights up
    rc, text = zygote.run(
        train_cmd(
            shards, out, "--epochs", "2", "--max-steps-per-epoch", "3", "--gamma", "1e10", "--skip-nonfinite"
        ),
        tmp_path / "log",
    )
    errors = [x for x in text.splitlines() if x.startswith("lesionkit train: error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert "validation outputs are not finite: the weights diverged" in errors[0]
    assert (out / "last").resolve().name == "epoch-0001"
    assert json.loads((out / "last" / "info.json").read_text())["epoch"] == 1
