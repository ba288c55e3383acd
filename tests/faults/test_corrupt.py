"""Corrupt shards at read time: training stops naming shard and key, or with --skip-corrupt skips and counts
(epoch table, history, W&B); validation and `lesionkit evaluate` never skip."""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

import pytest

from lesionkit.checkpoint import trainer_state
from tests.conftest import make_shards
from tests.faults.conftest import train_cmd
from tests.wandb_log import logged

BAD_KEYS = ("ISIC_0000005", "ISIC_0000047")  # not JPEG bytes: in shard-000000 and shard-000002


def truncate_in_sample(shard: Path, index: int) -> int:
    """Cut `shard` inside the first member of its sample `index`; returns the samples lost: from `index - 1`
    on (the reader emits a sample when it reaches the next one's first member)."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    first = next(m for m in members if m.name.split(".", 1)[0] == keys[index])
    with open(shard, "r+b") as f:
        f.truncate(first.offset_data + 100)
    return len(keys) - index + 1


@pytest.fixture(scope="module")
def bad(tmp_path_factory, shards):
    root = tmp_path_factory.mktemp("bad-shards")
    make_shards(root / "jpeg", 160, 8, size=40, seed=1, corrupt={int(k[-7:]) for k in BAD_KEYS})
    shutil.copytree(shards["train"], root / "truncated")
    lost = truncate_in_sample(root / "truncated" / "shard-000003.tar", 12)
    shutil.copytree(root / "jpeg", root / "both")
    truncate_in_sample(root / "both" / "shard-000003.tar", 12)
    make_shards(root / "val", 60, 3, size=40, seed=2, corrupt={31})
    return {
        "jpeg": root / "jpeg",
        "truncated": root / "truncated",
        "both": root / "both",
        "val": root / "val",
        "lost": lost,
    }


def test_corrupt_jpeg_stops_training_naming_shard_and_key(zygote, shards, bad, tmp_path):
    # one loader worker: the error crosses the DataLoader's process boundary and is still one clean line
    rc, out = zygote.run(
        train_cmd(
            {"train": bad["jpeg"], "val": shards["val"]}, tmp_path / "run", "--epochs", "1", "--workers", "1"
        ),
        tmp_path / "log",
    )
    assert rc == 1, out[-3000:]
    line = re.findall(
        r"lesionkit train: error: .*", out
    )  # (stdout's progress bar may precede it on the line)
    assert len(line) == 1 and "Traceback" not in out, out[-3000:]
    assert re.search(r"corrupt sample 'ISIC_00000(05|47)' in shard \S+/jpeg/shard-00000[02]\.tar", line[0]), (
        line
    )
    assert "skip_corrupt" in line[0]


def test_truncated_shard_stops_training_naming_shard_and_member(zygote, shards, bad, tmp_path):
    rc, out = zygote.run(
        train_cmd({"train": bad["truncated"], "val": shards["val"]}, tmp_path / "run", "--epochs", "1"),
        tmp_path / "log",
    )
    assert rc == 1 and "Traceback" not in out, out[-3000:]
    assert re.search(
        r"lesionkit train: error: shard \S+/truncated/shard-000003\.tar is truncated: member "
        r"ISIC_\d{7}\.\w+ ends past byte",
        out,
    ), out[-3000:]


@pytest.fixture(scope="module")
def skipped_run(zygote, shards, bad, tmp_path_factory):
    """2 epochs on shards with 2 bad JPEGs and a truncated shard, --skip-corrupt, W&B offline."""
    out = tmp_path_factory.mktemp("skip") / "run"
    rc, text = zygote.run(
        train_cmd(
            {"train": bad["both"], "val": shards["val"]},
            out,
            "--epochs",
            "2",
            "--skip-corrupt",
            "--wandb",
            "--run-name",
            "skip",
        ),
        out.parent / "log",
    )
    assert rc == 0, text[-3000:]
    return out, text


def test_skip_corrupt_skips_and_counts_per_epoch_in_table_history_and_wandb(skipped_run, bad):
    out, text = skipped_run
    history = trainer_state(out / "last")["loop"]["history"]
    counts = [row["corrupt"] for row in history]
    # every epoch reads every sample at least once: both bad JPEGs and the lost rest of the truncated shard
    assert len(counts) == 2 and all(c >= len(BAD_KEYS) + bad["lost"] for c in counts), counts
    # the exact tally: one warning per skipped JPEG, one per pass over the truncated shard
    jpeg = re.findall(r"skipped corrupt sample '(ISIC_\d+)' in shard", text)
    passes = len(re.findall(r"skipped the rest of shard \S+/both/shard-000003\.tar", text))
    assert set(jpeg) == set(BAD_KEYS) and passes >= 2
    assert sum(counts) == len(jpeg) + passes * bad["lost"]
    # the epoch table shows the column
    header = next(x for x in text.splitlines() if x.split()[:1] == ["epoch"])
    assert header.split()[-2:] == ["corrupt", "nonfinite"]
    rows = [x.split() for x in text.splitlines() if re.match(r"\s+[12]\s+\d", x)]
    assert [int(r[-2]) for r in rows] == counts and [r[-1] for r in rows] == ["0", "0"]
    # and W&B got the same numbers
    _, logged_rows = logged(next(out.glob("wandb/offline-run-*/run-*.wandb")))
    assert [r["train/skipped_corrupt"] for r in logged_rows if "train/skipped_corrupt" in r] == counts


def test_validation_never_skips_even_with_skip_corrupt(zygote, shards, bad, tmp_path):
    rc, out = zygote.run(
        train_cmd(
            {"train": shards["train"], "val": bad["val"]},
            tmp_path / "run",
            "--epochs",
            "1",
            "--skip-corrupt",
            "--max-steps-per-epoch",
            "2",
        ),
        tmp_path / "log",
    )
    assert rc == 1 and "Traceback" not in out, out[-3000:]
    assert re.search(
        r"lesionkit train: error: corrupt sample 'ISIC_0000031' in shard \S+/val/shard-000001\.tar", out
    ), out[-3000:]
    assert not (tmp_path / "run" / "last").exists()  # no checkpoint scored on a partial validation set


def test_evaluate_never_skips_a_corrupt_sample(zygote, skipped_run, bad, tmp_path):
    out, _ = skipped_run
    rc, text = zygote.run(
        [
            "evaluate",
            "--checkpoint",
            out / "last",
            "--data",
            bad["val"],
            "--workers",
            "0",
            "--bootstrap",
            "0",
            "--out",
            tmp_path / "eval",
        ],
        tmp_path / "log",
    )
    assert rc == 1 and not (tmp_path / "eval").exists() and "Traceback" not in text, text[-3000:]
    assert re.search(
        r"lesionkit evaluate: error: corrupt sample 'ISIC_0000031' in shard \S+/val/shard-000001\.tar", text
    ), text[-3000:]
    assert "skip_corrupt" not in text.split("corrupt sample", 1)[1].splitlines()[0]  # no skipping offered
