"""kill -9 at random points, ten times in a row: every resume starts from a complete checkpoint, and the
final weights equal those of a run that was never interrupted."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from lesionkit.checkpoint import trainer_state
from tests.faults.conftest import train_cmd
from tests.test_train import assert_same_weights, final_weights

EPOCHS = ["--epochs", "4", "--max-steps-per-epoch", "4"]
CHECKPOINT_FILES = {
    "model.pt",
    "custom_checkpoint_0.pkl",
    "info.json",
    "config.yaml",
    "model.safetensors",
    "optimizer.bin",
    "random_states_0.pkl",
}
MARK = "stale-marker"  # planted in leftover .tmp-* folders: must never reach a published checkpoint


def assert_complete(run: Path) -> int:
    """`last` (and `best`) point to whole, loadable, non-staging checkpoints; returns last's epoch (or 0)."""
    epoch = 0
    for link in ("last", "best"):
        if not (run / link).is_symlink():
            continue
        target = (run / link).resolve()
        assert target.parent == (run / "checkpoints").resolve() and not target.name.startswith(".tmp"), target
        assert CHECKPOINT_FILES <= {p.name for p in target.iterdir()}, sorted(
            p.name for p in target.iterdir()
        )
        assert isinstance(torch.load(target / "model.pt", weights_only=True), dict)
        loop = trainer_state(target)["loop"]
        info = json.loads((target / "info.json").read_text())
        assert info["epoch"] == loop["epoch"] and target.name == f"epoch-{loop['epoch']:04d}"
        if link == "last":
            epoch = loop["epoch"]
    return epoch


def wait_for(cond, timeout: float, child) -> bool:
    """Poll `cond` until true; False if the child ended first (or the time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if not child.alive():
            return False
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_kill9_ten_times_resumes_to_the_uninterrupted_weights(zygote, shards, tmp_path):
    rc, out = zygote.run(train_cmd(shards, tmp_path / "ref", *EPOCHS), tmp_path / "ref.log")
    assert rc == 0, out[-3000:]
    ref_cpu = zygote.current.cpu_s
    epoch_cpu = ref_cpu / 4  # CPU, not wall time: a kill point that does not depend on the machine's load

    run, rng, kills = tmp_path / "killed", random.Random(9), []
    for i in range(10):
        epoch = assert_complete(run)
        stale = list((run / "checkpoints").glob(".tmp-*"))
        for folder in stale:
            (folder / MARK).write_text("left by a killed run")
        child = zygote.start(train_cmd(shards, run, *EPOCHS, "--resume"), tmp_path / f"kill{i}.log")
        if rng.random() < 0.4:  # bias: inside the checkpoint write (after the stale folders were cleaned)
            mode = "checkpoint"
            fired = wait_for(lambda old=stale: not any(p.exists() for p in old), 120, child) and wait_for(
                lambda: any((run / "checkpoints").glob(".tmp-*")), 120, child
            )
            time.sleep(rng.uniform(0, 0.01))
        else:  # anywhere: setup, a step, validation, a save, after a given amount of CPU work
            mode = "cpu"
            budget = rng.uniform(0.05, 0.8) * (4 - epoch) * epoch_cpu
            fired = wait_for(lambda c=child, b=budget: c.cpu_now() >= b, 120, child)
        assert fired, f"kill {i} ({mode}): the run ended before it was killed:\n{child.output()[-2000:]}"
        child.kill(9)
        assert child.wait(60) == -9
        kills.append((mode, epoch, assert_complete(run)))

    child = zygote.start(train_cmd(shards, run, *EPOCHS, "--resume"), tmp_path / "final.log")
    assert child.wait(180) == 0, child.output()[-3000:]
    assert "resumed from" in child.output() or kills[-1][2] == 0
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert assert_complete(run) == 4
    assert_same_weights(final_weights(run), final_weights(tmp_path / "ref"), atol=1e-6)
    assert [r["epoch"] for r in trainer_state(run / "last")["loop"]["history"]] == [1, 2, 3, 4]
    assert not list(run.rglob(MARK)) and not list((run / "checkpoints").glob(".tmp-*"))
    # the kills really were spread: some in checkpoint writes, some elsewhere, resumes from several epochs
    assert {m for m, _, _ in kills} == {"checkpoint", "cpu"}, kills
    assert len({e for _, e, _ in kills}) >= 2, kills
