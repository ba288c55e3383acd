"""`lesionkit sweep`: the grid's expansion, run names, validation before anything runs, the plan in the sweep
folder; `--local` of two tiny runs and its resume; a 4-run Slurm job array with one task pre-empted and
requeued, then `lesionkit compare` on the sweep folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lesionkit import sweep as S
from lesionkit.cli import run_command
from tests.conftest import SLURM_ENDED, make_shards, scontrol_job, usr1_lands_while_training, wait_until

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


GRID = {
    "name": "g",
    "base": "customnet",
    "set": {"image_size": 64, "epochs": 3},
    "grid": {
        "model": [
            {"name": "scratch", "model": "customnet"},
            {"name": "r18", "model": "resnet18", "pretrained": True},
        ],
        "seed": [0, 1],
    },
    "runs": [
        {"name": "lite0", "model": "efficientnet_lite0", "pretrained": True},
        {"lr": 0.01, "balanced": True, "class_weights": False, "augment_overrides": {"hair": {"p": 0}}},
    ],
}


def test_grid_is_the_cartesian_product_then_the_listed_runs_with_readable_names(tmp_path):
    sweep = S.expand(write(tmp_path / "g.yaml", GRID), flags={"epochs": 1, "seed": 7})
    names = [r.name for r in sweep.runs]
    assert names == [
        "scratch-seed0",
        "scratch-seed1",
        "r18-seed0",
        "r18-seed1",
        "lite0",
        "lr0.01-balanced-no_class_weights-augment_overrides" + S.token("x", {"hair": {"p": 0}})[1:],
    ]
    assert [r.index for r in sweep.runs] == list(range(6)) and sweep.name == "g"
    assert sweep.runs[2].overrides == {"model": "resnet18", "pretrained": True, "seed": 0}
    assert [r.needs_weights for r in sweep.runs] == [False, False, True, True, False, False]
    r18 = sweep.runs[3].recipe
    # base recipe < set < the run's overrides < the sweep-wide flags; W&B: the sweep's group, override tags
    assert (r18["model"], r18["optimizer"], r18["lr"], r18["image_size"]) == ("resnet18", "adam", 0.0005, 64)
    assert (r18["epochs"], r18["seed"]) == (1, 7)
    assert r18["wandb_group"] == "g" and r18["run_name"] == "r18-seed1"
    assert r18["wandb_tags"] == "model=resnet18,pretrained=True,seed=1"
    # keys the sweep sets win over the base's profiles sections too; the others stay there
    assert r18["profiles"]["cpu"] == {
        "batch_size": 32,
        "workers": 2,
        "channels_last": True,
        "time_limit_min": 10,
    }
    assert sweep.runs[5].recipe["augment_overrides"] == {"hair": {"p": 0}}
    # deterministic: the same file gives the same plan
    again = S.expand(tmp_path / "g.yaml", flags={"epochs": 1, "seed": 7})
    assert again.to_json() == sweep.to_json()


def test_shipped_sweeps_expand(tmp_path):
    study = S.expand(ROOT / "sweeps" / "study.yaml", flags={"train": [str(tmp_path)]})
    assert len(study.runs) == 5 * 2 * 2 * 2 and len({r.name for r in study.runs}) == 40
    assert study.runs[0].name == "customnet-sgd_step-class_weights-light"
    assert study.runs[-1].name == "resnet18-adam_plateau-sampler-derm_mixup"
    assert sum(r.needs_weights for r in study.runs) == 32
    assert {r.recipe["model"] for r in study.runs if not r.needs_weights} == {"customnet"}
    assert all(
        r.recipe["train"] == [str(tmp_path)] and r.recipe["wandb_group"] == "study" for r in study.runs
    )
    tiny = S.expand(ROOT / "sweeps" / "tiny.yaml")
    assert [r.name for r in tiny.runs] == ["sgd-seed0", "sgd-seed1", "adam-seed0", "adam-seed1"]


@pytest.mark.parametrize(
    "spec, says",
    [
        ({"grid": {"optimizer": ["sgd", "rmsprop"]}}, "run rmsprop: optimizer='rmsprop' is not one of"),
        ({"grid": {"optimzer": ["sgd"]}}, "grid.optimzer: not a config key (did you mean optimizer?)"),
        ({"runs": [{"lr": 0.1}, {"lrr": 0.1}]}, "run lrr0.1: unknown key(s) lrr;"),
        ({"runs": [{"epochs": "many"}]}, "epochs: expected int, got 'many'"),
        ({"grid": {"image_size": [16]}}, "run image_size16: image_size must be within 32..2048"),
        ({"grid": {"seed": [1, 1]}}, "runs 0 and 1 are both named 'seed1'"),
        ({"grid": {"seed": []}}, "grid.seed: expected a non-empty list"),
        ({"grids": {"seed": [1]}}, "unknown sweep key(s) grids"),
        ({"base": "nosuch", "runs": [{"seed": 1}]}, "unknown recipe 'nosuch'"),
        ({"name": "x"}, "a sweep needs a `grid`, a `runs` list, or both"),
        ({"runs": [{"seed": 1}]}, "run seed1 has no training data: pass --train DIR"),
    ],
)
def test_a_bad_key_or_value_is_one_line_exit_2_before_anything_is_written(tmp_path, capsys, spec, says):
    out = tmp_path / "out"
    path = write(tmp_path / "bad.yaml", spec)
    assert run_command("sweep", [str(path), "--local", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not out.exists()


def test_dry_run_lists_without_writing_and_the_plan_gives_each_task_its_run(tmp_path, capsys):
    path, out = write(tmp_path / "g.yaml", GRID), tmp_path / "sweep"
    assert run_command("sweep", [str(path), "--out", str(out), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^2 +r18-seed0 +- +yes +model=resnet18 pretrained=True seed=0$", listing, re.M), listing
    assert "6 runs in " in listing and "2 run(s) start from pretrained torchvision weights" in listing
    assert not out.exists()

    sweep = S.expand(path)
    S.write_plan(sweep, out)
    assert json.loads((out / S.PLAN).read_text())["runs"][3]["name"] == "r18-seed1"
    assert yaml.safe_load((out / "recipes" / "r18-seed1.yaml").read_text()) == sweep.runs[3].recipe
    env = dict(line.split("=", 1) for line in S.task_env(out, 3).splitlines())
    assert env["LK_SWEEP_RUN"] == "r18-seed1" and env["LK_SWEEP_FINISHED"] == "0"
    assert env["LK_RECIPE"] == str((out / "recipes" / "r18-seed1.yaml").absolute())
    assert env["LK_OUTPUT"] == str((out / "r18-seed1").absolute()) and "LK_TRAIN" not in env
    (out / "r18-seed1").mkdir()
    (out / "r18-seed1" / "status.json").write_text(json.dumps({"status": "completed"}))
    assert "LK_SWEEP_FINISHED=1" in S.task_env(out, 3)
    assert run_command("sweep", [str(out), "--task", "6"]) == 2
    assert "--task 6: the sweep in" in capsys.readouterr().err
    # the same plan again is fine; another plan into the same folder is refused
    S.write_plan(S.expand(path), out)
    with pytest.raises(S.UsageError, match="holds another sweep's plan"):
        S.write_plan(S.expand(path, flags={"epochs": 2}), out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep-shards")
    make_shards(d / "train", 24, 2, size=64)
    make_shards(d / "val", 12, 1, size=64, prefix="VAL_", seed=1)
    return d


def test_local_trains_each_run_and_a_rerun_skips_the_finished_ones(tmp_path, shards, capsys):
    spec = {
        "name": "two",
        "base": "customnet",
        "set": {"image_size": 32, "batch_size": 4, "workers": 0, "epochs": 1, "max_steps_per_epoch": 2},
        "runs": [{"name": "a", "seed": 0}, {"name": "b", "seed": 1, "optimizer": "sgd"}],
    }
    path, out = write(tmp_path / "two.yaml", spec), tmp_path / "two"
    argv = [str(path), "--local", "--out", str(out), "--train", str(shards / "train")]
    argv += ["--val", str(shards / "val"), "--no-wandb", "--cpu", "--profile", "cpu"]
    assert run_command("sweep", argv) == 0
    assert "2 runs finished in" in capsys.readouterr().out
    stamps = {}
    for name, optimizer in (("a", "adam"), ("b", "sgd")):
        assert json.loads((out / name / "status.json").read_text())["status"] == "completed"
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        assert (cfg["optimizer"], cfg["image_size"], cfg["run_name"], cfg["wandb_group"]) == (
            optimizer,
            32,
            name,
            "two",
        )
        stamps[name] = (out / name / "status.json").stat().st_mtime_ns
    assert run_command("sweep", argv) == 0
    printed = capsys.readouterr().out
    assert "[1/2] a: finished, skipped" in printed and "[2/2] b: finished, skipped" in printed
    assert {n: (out / n / "status.json").stat().st_mtime_ns for n in stamps} == stamps
    assert run_command("sweep", [str(out)]) == 0  # the folder's plan: a listing with each run's status
    assert re.search(r"^1 +b +completed ", capsys.readouterr().out, re.M)


# ------------------------------------------------------------------------------------ Slurm


@pytest.mark.slurm
@pytest.mark.timeout(1200)  # the cluster's start, 4 tasks 2 at a time, the requeue
def test_a_job_array_runs_the_sweep_with_a_preempted_task_requeued_then_compare(cluster, shards, tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "lesionkit.cli", "sweep", str(ROOT / "sweeps" / "tiny.yaml"), "--slurm"]
    cmd += ["--out", str(out), "--throttle", "2", "--sbatch=--cpus-per-task=1"]
    cmd += ["--train", str(shards / "train"), "--val", str(shards / "val"), "--image-size", "64"]
    cmd += ["--epochs", "2", "--max-steps-per-epoch", "3"]
    proc = subprocess.run(cmd, env=cluster, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    array = re.search(r"job array (\d+)", proc.stdout).group(1)
    assert "--array=0,1,2,3%2 --job-name=lk-sweep-tiny" in proc.stdout
    tasks = [f"{array}_{i}" for i in range(4)]
    logs = [out / "logs" / f"lk-sweep-tiny-{array}_{i}.out" for i in range(4)]

    # pre-empt task 0 once it trains (the header row comes just before the first step), as Slurm would
    first = logs[0]
    wait_until(
        lambda: first.exists() and "train_loss" in first.read_text(errors="replace"), "task 0 to train"
    )
    # scancel signals an array task's batch shell at once, but while tasks of the array wait (%2) it then
    # retries ("Job is in transitional state") for 95 s and exits 228 (Slurm 22.05): the requeue below checks
    # the signal; scancel is stopped then, before the release, so that no retry signals the restarted task
    with usr1_lands_while_training(cluster, tasks[0]):
        scancel = subprocess.Popen(
            ["scancel", "--signal=USR1", "--batch", tasks[0]],
            env=cluster,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def requeued():
        info = scontrol_job(cluster, tasks[0])
        assert info["JobState"] not in SLURM_ENDED, f"ended without a requeue:\n{first.read_text()}"
        return info["Restarts"] == "1" and info["JobState"] == "PENDING"

    try:
        wait_until(requeued, "task 0 to requeue itself")
    finally:
        scancel.kill()
        scancel.wait(timeout=30)
    time.sleep(3)  # release the ~2 min hold, but not within the second of the requeue (test_slurm.py)
    subprocess.run(["scontrol", "update", f"JobId={tasks[0]}", "StartTime=now"], env=cluster, check=True)

    def ended(task):
        info = scontrol_job(cluster, task)
        return info if info["JobState"] in SLURM_ENDED else None

    infos = [wait_until(lambda t=t: ended(t), f"task {t} to end") for t in tasks]
    text = [log.read_text(errors="replace") if log.exists() else "" for log in logs]
    for info, log in zip(infos, text):
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert [i["Restarts"] for i in infos] == ["1", "0", "0", "0"]
    assert "sweep task 0: run sgd-seed0" in text[0] and re.search(r"requeueing job \d+", text[0])
    assert re.search(r"resumed from \S+/epoch-\d{4}-step-\d+", text[0]), text[0]
    for run in S.read_plan(out).runs:
        assert S.finished(out / run.name), run.name

    # a resubmission has nothing left to do
    again = subprocess.run(cmd, env=cluster, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and "are finished; nothing submitted" in again.stdout, again.stderr

    assert run_command("compare", [str(out), "--bootstrap", "0", "--workers", "0"]) == 0
    table = pd.read_csv(out / "compare.csv")
    assert sorted(table["run"]) == ["adam-seed0", "adam-seed1", "sgd-seed0", "sgd-seed1"]
    assert "wandb_tags" not in table.columns  # a label of the overrides, not one of them
    for row in table.to_dict("records"):
        optimizer, seed = row["run"].split("-seed")
        assert (row["optimizer"], row["seed"]) == (optimizer, int(seed))
        info = json.loads((out / row["run"] / "best" / "info.json").read_text())
        assert row["best_epoch"] == info["epoch"]
        assert row["val"] == pytest.approx(info["metrics"][info["monitor"]], abs=1e-6)
