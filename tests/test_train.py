"""The training entry point as users run it: single process, 2-process CPU DDP, resume, W&B offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lesionkit.checkpoint import trainer_state
from tests.conftest import cpu_ddp
from tests.wandb_log import logged

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "lesionkit" / "train.py"
VENV_BIN = Path(sys.executable).parent

# Small enough for seconds per epoch on 2 cores; step scheduler so the LR visibly changes every epoch.
TINY = [
    "--model",
    "customnet",
    "--image-size",
    "32",
    "--batch-size",
    "16",
    "--workers",
    "1",
    "--optimizer",
    "sgd",
    "--lr",
    "0.01",
    "--scheduler",
    "step",
    "--step-size",
    "1",
    "--gamma",
    "0.5",
    "--augment",
    "light",
    "--no-wandb",
    "--mixed-precision",
    "no",
]


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("WANDB_API_KEY", None)
    return e


def train(out, shards, *extra, procs=1, timeout=240, check=True):
    data = ["--train", str(shards["train"]), "--val", str(shards["val"]), "--output-dir", str(out)]
    if procs == 1:
        cmd = [sys.executable, str(TRAIN)]
    else:
        cmd = cpu_ddp(TRAIN, procs=procs)
    e = env()
    if procs > 1:
        e["ACCELERATE_USE_CPU"] = "1"
    res = subprocess.run(
        cmd + TINY + data + list(extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=e,
        cwd=REPO,
    )
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def history(out) -> list[dict]:
    return trainer_state(Path(out) / "last")["loop"]["history"]


def final_weights(out) -> dict:
    return torch.load(Path(out) / "last" / "model.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.allclose(value.float(), b[k].float(), atol=atol), k


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_shards):
    out = tmp_path_factory.mktemp("single") / "run"
    train(out, tiny_shards, "--epochs", "3")
    return out


def test_single_process_run_writes_checkpoints_and_metrics(single):
    status = json.loads((single / "status.json").read_text())
    assert status == {"status": "completed", "epoch": 3, "step": 0, "best": status["best"]}
    assert json.loads((single / "world.json").read_text())["world_size"] == 1
    for link in ("last", "best"):
        ckpt = (single / link).resolve()
        assert {"model.pt", "config.yaml", "info.json", "custom_checkpoint_0.pkl"} <= {
            p.name for p in ckpt.iterdir()
        }
    info = json.loads((single / "last" / "info.json").read_text())
    assert info["classes"] == ["nevus", "melanoma", "seborrheic_keratosis"] and info["epoch"] == 3
    metrics = json.loads((single / "metrics.json").read_text())
    assert 0.0 <= metrics["isic2017_score"] <= 1.0 and metrics["epoch"] == 3
    assert [row["lr"] for row in history(single)] == pytest.approx([0.01, 0.005, 0.0025])
    # only the last and best checkpoints are kept
    assert len(list((single / "checkpoints").iterdir())) <= 2


def test_threads_flag_sets_the_process_threads_and_run_json_records_them(tmp_path, tiny_shards, single):
    def threads(run) -> int:
        (*_, last) = json.loads((Path(run) / "run.json").read_text())["segments"]
        return last["environment"]["torch_threads"]

    assert threads(single) == 1  # auto on a CPU: torch's default, here OMP_NUM_THREADS=1 (env())
    res = train(tmp_path / "two", tiny_shards, "--epochs", "1", "--threads", "2")
    assert threads(tmp_path / "two") == 2
    assert "torch threads 2 (config 2)" in res.stdout


def test_swa_saves_the_average_of_the_last_epochs_weights(tmp_path, tiny_shards, single):
    """`single` trained 3 epochs; a 2-epoch run is its first 2 (a per-epoch step schedule): SWA over the
    last 2 epochs of 3 must save their mean, and validate it (its score differs from the last weights')."""
    train(tmp_path / "two", tiny_shards, "--epochs", "2")
    train(tmp_path / "swa", tiny_shards, "--epochs", "3", "--swa-epochs", "2")
    w2, w3, swa = (final_weights(tmp_path / "two"), final_weights(single), final_weights(tmp_path / "swa"))
    for k, v in swa.items():
        if v.is_floating_point():
            assert torch.allclose(v, (w2[k] + w3[k]) / 2, atol=1e-6), k
    assert not all(torch.equal(swa[k], w3[k]) for k in swa if swa[k].is_floating_point())
    first, _, third = history(tmp_path / "swa")
    assert first["val_loss"] == history(tmp_path / "two")[0]["val_loss"]  # before averaging: trained weights
    assert third["val_loss"] != history(single)[2]["val_loss"]  # the average is what was validated


@pytest.mark.ddp
def test_two_process_ddp_agrees_with_single_process(tmp_path, tiny_shards, single):
    out = tmp_path / "ddp"
    train(out, tiny_shards, "--epochs", "3", procs=2)
    world = json.loads((out / "world.json").read_text())
    assert world["world_size"] == 2
    assert len(world["weights_sha256"]) == 2 and len(set(world["weights_sha256"])) == 1
    assert [r["lr"] for r in history(out)] == [r["lr"] for r in history(single)]

    # validation metrics of the 2-rank run equal a single-process evaluation of the same checkpoint
    from lesionkit.augment import build_augment
    from lesionkit.data import eval_loader
    from lesionkit.inference import load_checkpoint
    from lesionkit.tasks import get_task

    model, info, _ = load_checkpoint(out / "best")
    prep = build_augment("none", info["image_size"], info["mean"], info["std"]).eval()
    ys, ps = [], []
    with torch.no_grad():
        for batch in eval_loader(
            [tiny_shards["val"]], image_size=32, batch_size=16, workers=0, rank=0, world_size=1
        ):
            ps.append(model(prep(batch.images)).softmax(1))
            ys.append(batch.labels)
    mine = get_task("isic2017").metrics(
        torch.cat(ys).numpy(), torch.cat(ps).double().numpy(), info["classes"]
    )
    for key in ("auc_nevus", "auc_melanoma", "auc_seborrheic_keratosis", "isic2017_score", "accuracy"):
        assert mine[key] == pytest.approx(info["metrics"][key], abs=1e-6), key


@pytest.mark.slow
def test_validation_tta_scores_as_evaluate_tta_does(tmp_path, tiny_shards, single):
    from lesionkit.cli import run_command

    out = tmp_path / "tta"
    train(out, tiny_shards, "--epochs", "1", "--val-tta", "flips")
    logged = history(out)[0]
    assert (
        run_command(
            "evaluate",
            [
                "--checkpoint",
                str(out / "last"),
                "--data",
                str(tiny_shards["val"]),
                "--tta",
                "flips",
                "--bootstrap",
                "0",
                "--workers",
                "0",
                "--out",
                str(tmp_path / "ev"),
            ],
        )
        == 0
    )
    scored = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in ("auc_melanoma", "auc_seborrheic_keratosis", "isic2017_score"):
        assert logged[key] == pytest.approx(scored[key], abs=1e-6), key
    # the views really were averaged: the same epoch-1 weights (same seed) score differently without them
    assert logged["val_loss"] != pytest.approx(history(single)[0]["val_loss"], abs=1e-9)


@pytest.mark.ddp
def test_early_stopping_stops_every_rank_at_the_same_epoch(tmp_path, tiny_shards):
    out = tmp_path / "early"
    # lr 0: the score never improves after epoch 1, so patience 1 stops after epoch 2 (of 6)
    res = train(out, tiny_shards, "--epochs", "6", "--lr", "0", "--early-stop-patience", "1", procs=2)
    assert "early stopping at epoch 2" in res.stdout
    assert json.loads((out / "status.json").read_text())["epoch"] == 2
    assert len(set(json.loads((out / "world.json").read_text())["weights_sha256"])) == 1


@pytest.mark.ddp
def test_time_limit_ends_every_rank_after_the_same_epoch(tmp_path, tiny_shards):
    out = tmp_path / "timed"
    # 0.001 min is far below two epochs: after epoch 1 one more would pass it, so training ends there (of 4)
    res = train(out, tiny_shards, "--epochs", "4", "--time-limit-min", "0.001", procs=2)
    assert "time limit: stopping after epoch 1 of 4" in res.stdout
    assert json.loads((out / "status.json").read_text()) == pytest.approx(
        {"status": "completed", "epoch": 1, "step": 0, "best": history(out)[0]["isic2017_score"]}
    )
    world = json.loads((out / "world.json").read_text())
    assert world["world_size"] == 2 and len(set(world["weights_sha256"])) == 1
    assert trainer_state(out / "last")["loop"]["seconds"] > 0  # --resume goes on counting from here


@pytest.mark.slow
def test_resume_from_last_reproduces_the_uninterrupted_run(tmp_path, tiny_shards, single):
    out = tmp_path / "resumed"
    train(out, tiny_shards, "--epochs", "2")
    res = train(out, tiny_shards, "--epochs", "3", "--resume")
    assert "resumed from" in res.stdout
    assert_same_weights(final_weights(out), final_weights(single))
    assert [r["epoch"] for r in history(out)] == [1, 2, 3]


@pytest.mark.slow
def test_sigusr1_checkpoints_mid_epoch_and_resume_matches(tmp_path, tiny_shards, single):
    out = tmp_path / "preempted"
    data = ["--train", str(tiny_shards["train"]), "--val", str(tiny_shards["val"]), "--output-dir", str(out)]
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), *TINY, *data, "--epochs", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        cwd=REPO,
    )
    deadline = time.time() + 120
    while not (out / "last").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "preempted" and "stop requested" in text
    train(out, tiny_shards, "--epochs", "3", "--resume")
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    assert [r["epoch"] for r in history(out)] == [1, 2, 3]
    assert_same_weights(final_weights(out), final_weights(single))


@pytest.mark.slow
def test_wandb_offline_run_file_holds_config_and_epoch_metrics(tmp_path, tiny_shards):
    out = tmp_path / "wb"
    res = train(out, tiny_shards, "--epochs", "2", "--wandb", "--run-name", "t")
    assert "wandb sync" in res.stdout
    files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, list(out.rglob("*"))
    config, rows = logged(files[0])
    assert config["model"] == "customnet" and config["epochs"] == 2 and config["image_size"] == 32
    epochs = [r for r in rows if "val/isic2017_score" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0 <= r["val/auc_melanoma"] <= 1 for r in epochs)
    assert not any("WANDB_API_KEY" in str(v) for v in config.values())


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """160 train / 60 val synthetic images at 40 px in 8 + 3 shards (2 ranks x 1 worker fit)."""
    from lesionkit.pack import pack
    from lesionkit.synth.generator import synthesize

    root = tmp_path_factory.mktemp("tiny")
    synthesize(root / "raw", n_train=160, n_val=60, size=40, seed=1)
    out = {}
    for split, name in (("train", "Training"), ("val", "Validation")):
        out[split] = (
            pack(
                images=root / "raw" / f"ISIC-2017_{name}_Data",
                labels=root / "raw" / f"ISIC-2017_{name}_Part3_GroundTruth.csv",
                out=root / split,
                size=40,
                shard_size=20,
                workers=1,
            )
            and root / split
        )
    return out


def test_a_run_gives_the_callers_signal_handlers_back():
    """`train()` also runs in-process (cv, notebooks, tests): its pre-emption handlers, and the ignored
    repeats after a stop, must not outlive it, or later child processes inherit an unkillable SIGTERM."""
    from lesionkit.train import StopRequest

    before = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    stop = StopRequest()
    assert all(signal.getsignal(sig) == stop._handle for sig in StopRequest.SIGNALS)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.requested
    stop.ignore_repeats()
    stop.restore()
    assert {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS} == before


def test_decode_on_the_device_trains_the_same_weights(tmp_path, tiny_shards):
    """`--decode device` (workers read bytes; the batch is decoded where the model runs) changes where the
    work happens, not what is learned: with augmentation on the device in both runs, the same weights."""
    train(tmp_path / "workers", tiny_shards, "--epochs", "1", "--augment-placement", "device")
    res = train(tmp_path / "device", tiny_shards, "--epochs", "1", "--decode", "device")
    assert "augment light on device" in res.stdout
    assert_same_weights(final_weights(tmp_path / "workers"), final_weights(tmp_path / "device"), atol=0)
