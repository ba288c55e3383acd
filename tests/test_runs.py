"""Runs that never lose work and W&B dashboards people rely on (issue 18): a new folder per run, an earlier
run refused without --resume/--force, `--resume PATH`, the run records; the W&B mode picked from the login,
and what an offline run file holds (config, best summary, model artifacts, predictions table, one run id
with contiguous steps across the segments of a pre-empted run)."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lesionkit import runs
from lesionkit.checkpoint import TRAINER_STATE
from lesionkit.cli import run_command
from lesionkit.config import TrainConfig, add_config_flags, config_from_args, load_config
from lesionkit.errors import UsageError
from lesionkit.reporter import LineProgress
from tests.conftest import cpu_ddp, make_shards
from tests.test_train import REPO, TINY, TRAIN, env, history
from tests.wandb_log import artifacts, logged, records, run_record, summary

WANDB = [a for a in TINY if a != "--no-wandb"]
PROGRESS = re.compile(r"^epoch \d+/\d+: +\d+% \d+/\d+ \[", re.M)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """160 train / 60 val noise images at 40 px, 8 + 3 shards (2 ranks x 1 worker fit)."""
    root = tmp_path_factory.mktemp("run-shards")
    make_shards(root / "train", 160, 8, size=40, seed=1)
    make_shards(root / "val", 60, 3, size=40, seed=2, prefix="VAL_")
    return {"train": root / "train", "val": root / "val"}


def run_env(cwd: Path) -> dict:
    """The trainer's environment: no W&B login (an empty netrc), wandb's staging area under `cwd`."""
    e = env()
    e.pop("WANDB_MODE", None)
    e.update(NETRC=os.devnull, WANDB_DATA_DIR=str(cwd / "wandb-data"))
    return e


def command(shards, *flags, wandb=False, procs=1) -> list[str]:
    launch = [sys.executable, str(TRAIN)] if procs == 1 else cpu_ddp(TRAIN, procs=procs)
    data = ["--train", str(shards["train"]), "--val", str(shards["val"])]
    return [*launch, *(WANDB if wandb else TINY), *data, *map(str, flags)]


def launch(cwd, shards, *flags, wandb=False, procs=1, extra_env=None) -> str:
    """Run the trainer in `cwd` (where a run without --output-dir makes runs/...); its stdout."""
    e = run_env(cwd) | (extra_env or {})
    if procs > 1:
        e["ACCELERATE_USE_CPU"] = "1"
    res = subprocess.run(
        command(shards, *flags, wandb=wandb, procs=procs),
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file's sha256 and every link's target below `root`: what "untouched" means."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fake_checkpoint(folder: Path, epoch: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "info.json").write_text(json.dumps({"model": "customnet", "epoch": epoch}))
    (folder / TRAINER_STATE).write_bytes(os.urandom(64))
    (folder / "model.pt").write_bytes(os.urandom(256))
    return folder


def earlier_run(run: Path) -> Path:
    """The files a finished run leaves: checkpoints, last/best links, metrics, a W&B folder."""
    fake_checkpoint(run / "checkpoints" / "epoch-0001", 1)
    fake_checkpoint(run / "checkpoints" / "epoch-0002", 2)
    (run / "last").symlink_to("checkpoints/epoch-0002")
    (run / "best").symlink_to("checkpoints/epoch-0001")
    (run / "metrics.json").write_text('{"epoch": 2}')
    (run / "wandb" / "offline-run-1-abc").mkdir(parents=True)
    (run / "wandb" / "offline-run-1-abc" / "run-abc.wandb").write_bytes(os.urandom(512))
    return run


# ------------------------------------------------------------------------------------ run folders


def test_a_new_run_into_an_earlier_runs_folder_is_refused_and_leaves_it_untouched(shards, tmp_path, capsys):
    run = earlier_run(tmp_path / "run")
    before = tree_hashes(run)
    rc = run_command("train", [*TINY, "--train", str(shards["train"]), "--val", str(shards["val"]),
                               "--output-dir", str(run)])  # fmt: skip
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("lesionkit train: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"output dir {run} already holds files (best, checkpoints" in lines[0]
    assert "--resume to continue" in lines[0] and "--force to replace" in lines[0]
    assert tree_hashes(run) == before
    assert not torch.distributed.is_initialized()


def test_resume_takes_the_bare_flag_a_run_folder_or_a_checkpoint_folder(tmp_path):
    run = earlier_run(tmp_path / "run")
    last, first = (
        (run / "checkpoints" / "epoch-0002").resolve(),
        (run / "checkpoints" / "epoch-0001").resolve(),
    )
    parser = argparse.ArgumentParser()
    add_config_flags(parser)

    def cfg(*flags) -> TrainConfig:
        return runs.prepare(config_from_args(parser.parse_args([str(f) for f in flags])))

    # bare: OUTPUT_DIR/last; a run folder or its last: that run, continued in place
    assert runs.resume_checkpoint(cfg("--resume", "--output-dir", run)) == last
    for path in (run, run / "last"):
        resolved = cfg("--resume", path)
        assert (
            Path(resolved.output_dir).resolve() == run.resolve() and runs.resume_checkpoint(resolved) == last
        )
    # an earlier checkpoint continues in a new folder (none given: a new runs/MODEL-TIME), never over `last`
    forked = cfg("--resume", run / "best")
    assert forked.output_dir == "" and runs.resume_checkpoint(forked) == first
    assert cfg("--resume", run / "best", "--output-dir", tmp_path / "new").output_dir == str(tmp_path / "new")
    with pytest.raises(UsageError, match="not the last checkpoint of .* would replace the later ones"):
        cfg("--resume", run / "best", "--output-dir", run)
    with pytest.raises(UsageError, match="no such run or checkpoint folder"):
        cfg("--resume", tmp_path / "nowhere")
    with pytest.raises(UsageError, match=r"--resume continues a run: pass its folder"):
        cfg("--resume")
    with pytest.raises(UsageError, match="pass one"):
        cfg("--resume", "--force", "--output-dir", run)
    assert cfg("--no-resume", "--output-dir", tmp_path / "empty").resume is False


def test_cv_asks_for_the_output_dir_it_continues_through(shards, capsys):
    assert run_command("cv", ["--data", str(shards["train"])]) == 2
    assert "cv needs --output-dir OUT (rerun with the same OUT to continue it)" in capsys.readouterr().err


def test_new_run_folders_are_unique_even_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20250102-030405")
    made = [runs.new_run_dir("resnet18", tmp_path) for _ in range(3)]
    assert [p.name for p in made] == ["resnet18-20250102-030405", "resnet18-20250102-030405-2",
                                      "resnet18-20250102-030405-3"]  # fmt: skip
    assert all(p.is_dir() for p in made)


def test_progress_in_a_log_file_is_a_line_every_tenth_of_the_epoch(capsys):
    bar = LineProgress(total=95, initial=0, desc="epoch 1/2")
    for _ in range(95):
        bar.update(1)
        bar.set_postfix(loss="0.5")
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and "\r" not in "".join(lines)
    assert lines[0].startswith("epoch 1/2:  11% 10/95 [") and lines[-1].startswith("epoch 1/2: 100% 95/95 [")
    assert lines[-1].endswith(", loss=0.5]")
    slow = LineProgress(total=1000, initial=0, desc="e", seconds=0.0)  # a slow epoch: a line per minute
    slow.update(1)
    assert capsys.readouterr().out.startswith("e:   0% 1/1000 [")


class Recorder(http.server.ThreadingHTTPServer):
    """A W&B host that answers nothing and records every request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Refuse)
        self.requests: list[str] = []


class Refuse(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        self.send_error(500)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_wandb_goes_online_when_logged_in_through_netrc_without_contacting_the_server(tmp_path, recorder):
    host = f"127.0.0.1:{recorder.server_address[1]}"
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB") and k != "NETRC"}
    base.update(HOME=str(home), WANDB_BASE_URL=f"http://{host}")

    def mode(**extra) -> str:
        code = "from lesionkit.tracking import setup_wandb_env; print(setup_wandb_env())"
        out = subprocess.run([sys.executable, "-c", code], env=base | extra, capture_output=True, text=True,
                             check=True, timeout=60, cwd=REPO)  # fmt: skip
        return out.stdout.strip()

    assert mode() == "offline"  # not logged in
    (home / ".netrc").write_text(f"machine {host}\n  login user\n  password {'0' * 40}\n")
    (home / ".netrc").chmod(0o600)
    assert mode() == "online"  # `wandb login` wrote the key into ~/.netrc
    assert mode(WANDB_MODE="offline") == "offline"  # an explicit mode wins
    (home / ".netrc").unlink()
    assert mode(WANDB_API_KEY="0" * 40) == "online"
    assert recorder.requests == []


@pytest.fixture
def recorder():
    server = Recorder()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def wb_run(shards, tmp_path_factory):
    """A 3-epoch run with W&B offline and every checkpoint uploaded, started without --output-dir."""
    cwd = tmp_path_factory.mktemp("wb")
    out = launch(cwd, shards, "--epochs", "3", "--wandb-log-model", "all", "--wandb-group", "g",
                 "--wandb-tags", "a, b", wandb=True)  # fmt: skip
    (run,) = (cwd / "runs").iterdir()
    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    return {"cwd": cwd, "run": run, "stdout": out, "file": path}


@pytest.mark.slow
def test_a_run_without_output_dir_gets_a_new_folder_with_its_records(wb_run):
    run, out = wb_run["run"], wb_run["stdout"]
    assert re.fullmatch(r"customnet-\d{8}-\d{6}", run.name)
    assert {"checkpoints", "last", "best", "metrics.json", "run.json", "config.yaml", "wandb"} <= set(
        runs.contents(run)
    )
    (segment,) = json.loads((run / "run.json").read_text())["segments"]
    assert "--wandb-log-model all" in segment["command"] and segment["from_epoch"] == 0
    assert segment["environment"]["packages"]["torch"] == torch.__version__
    assert segment["environment"]["device"] == "cpu" and segment["world_size"] == 1
    assert segment["git_commit"] == (runs.git_commit() or {}).get("commit")
    assert segment["wandb"]["mode"] == "offline"
    cfg = load_config(run / "config.yaml")
    assert cfg.output_dir == str(Path("runs") / run.name) and cfg.epochs == 3 and cfg.wandb_log_model == "all"
    # the log of a non-interactive run: a progress line every 10 %, no carriage returns, no "None" run
    assert "\r" not in out and "W&B run: None" not in out
    assert len(PROGRESS.findall(out)) == 3 * 10
    header = out.index("  epoch train_loss")
    assert out.index(f"W&B run (offline) in runs/{run.name}/wandb/offline-run-") < header
    assert f"upload every segment with: wandb sync runs/{run.name}/wandb" in out


@pytest.mark.slow
def test_wandb_run_file_holds_run_facts_best_summary_artifacts_and_predictions(wb_run, shards):
    run, path = wb_run["run"], wb_run["file"]
    config, rows = logged(path)
    assert (config["world_size"], config["batch_size_per_device"], config["global_batch_size"]) == (1, 16, 16)
    assert config["lesionkit_version"] == "0.1.0" and config["slurm_job_id"] is None
    assert config["git_commit"] == (runs.git_commit() or {}).get("commit")
    assert [(d["name"], d["samples"]) for d in config["data"]["train"] + config["data"]["val"]] == [
        ("train", 160),
        ("val", 60),
    ]
    record = run_record(path)
    assert (record.display_name, record.run_group, list(record.tags)) == (run.name, "g", ["a", "b"])

    # summary: the best epoch's validation metrics (W&B's own summary of the monitor, in its direction)
    best = json.loads((run / "best" / "info.json").read_text())
    last = json.loads((run / "last" / "info.json").read_text())
    summ = summary(path)
    assert summ["best/epoch"] == best["epoch"]
    for key in ("isic2017_score", "auc_melanoma", "loss", "accuracy"):
        assert summ[f"val/{key}"] == pytest.approx(best["metrics"][key]), key
    assert summ["best/isic2017_score"] == {"max": pytest.approx(best["metrics"]["isic2017_score"])}
    metric_defs = {r.metric.name: r.metric for r in records(path) if r.WhichOneof("record_type") == "metric"}
    assert metric_defs["best/isic2017_score"].summary.max and metric_defs["val/auc_melanoma"].summary.none
    assert (best["epoch"], last["epoch"]) == (1, 3)  # this seed's run peaks at epoch 1: not the last one
    assert summ["val/isic2017_score"] != pytest.approx(last["metrics"]["isic2017_score"])

    # one model artifact version per epoch; `best`/`last` aliases, the score in the metadata
    models = [a for a in artifacts(path) if a["type"] == "model"]
    assert [a["metadata"]["epoch"] for a in models] == [1, 2, 3]
    assert all(a["name"] == f"model-{record.run_id}" and "last" in a["aliases"] for a in models)
    (best_art,) = [a for a in models if "best" in a["aliases"] and a["metadata"]["epoch"] == best["epoch"]]
    assert best_art["metadata"]["score"] == pytest.approx(best["metrics"]["isic2017_score"])
    assert set(best_art["files"]) == {"model.pt", "config.yaml", "info.json", "MODEL_CARD.md", "card.json"}
    card = Path(best_art["files"]["MODEL_CARD.md"]).read_text()
    assert f"checkpoint: epoch {best['epoch']}," in card and "**Not a medical device**" in card
    staged = Path(best_art["files"]["model.pt"]).read_bytes()
    assert staged == (run / "best" / "model.pt").read_bytes()

    # the predictions table, logged at each new best epoch: every validation image, misclassified first
    tables = [r for r in rows if "val/predictions/path" in r]
    assert tables[-1]["_step"] == best["epoch"] * 10 and tables[0]["_step"] == 10
    table = json.loads((path.parent / "files" / tables[-1]["val/predictions/path"]).read_text())
    assert table["columns"] == ["id", "image", "true", "predicted", "correct", "p_nevus", "p_melanoma",
                                "p_seborrheic_keratosis"]  # fmt: skip
    correct = [row[4] for row in table["data"]]
    assert len(correct) == 60 and correct == sorted(correct) and not correct[0]
    assert {row[0] for row in table["data"]} == {f"VAL_{i:07d}" for i in range(60)}
    for row in table["data"]:
        assert sum(row[5:]) == pytest.approx(1, abs=1e-3) and row[4] == (row[2] == row[3])
    images = [a for a in artifacts(path) if "valpredictions" in a["name"]][-1]
    assert sum(name.endswith(".png") for name in images["files"]) == 60
    # the class distribution once
    assert sum("data/class_distribution_table/_type" in r for r in rows) == 1


@pytest.mark.slow
def test_preempted_offline_run_resumed_by_path_is_one_wandb_run_with_contiguous_steps(shards, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        command(shards, "--epochs", "2", "--batch-size", "8", "--output-dir", run, wandb=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=run_env(tmp_path),
        cwd=tmp_path,
    )
    deadline = time.time() + 300
    while not (run / "last").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)  # pre-empted in epoch 2, as by Slurm's warning before a requeue
    text, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and "stop requested" in text, text[-3000:]
    out = launch(tmp_path, shards, "--epochs", "2", "--batch-size", "8", "--resume", run, wandb=True)
    assert "resumed from" in out and [r["epoch"] for r in history(run)] == [1, 2]

    segments = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(segments) == 2
    ids = {run_record(p).run_id for p in segments}
    assert len(ids) == 1
    steps = [[r["_step"] for r in logged(p)[1] if "train/loss" in r] for p in segments]
    assert steps[0] and steps[1] and max(steps[0]) < min(steps[1])
    assert steps[0] + steps[1] == list(range(10, 41, 10))  # 20 steps an epoch, a loss every 10 steps
    epochs = [[r["epoch"] for r in logged(p)[1] if "val/isic2017_score" in r] for p in segments]
    assert epochs == [[1], [2]]
    assert [sum("data/class_distribution_table/_type" in r for r in logged(p)[1]) for p in segments] == [1, 0]
    assert "best/epoch" in summary(segments[1])
    assert (
        f"(offline, 2 segment(s) under {run}/wandb); upload every segment with: wandb sync {run}/wandb" in out
    )
    first_seg, second = json.loads((run / "run.json").read_text())["segments"]
    assert (
        second["from_epoch"] == 1
        and second["from_step"] > 0
        and second["wandb"]["id"] == first_seg["wandb"]["id"]
    )


@pytest.mark.slow
def test_resume_from_an_earlier_checkpoint_continues_in_a_new_folder(wb_run, shards, tmp_path):
    """A checkpoint that is not its run's last (here a copy kept elsewhere): a new run folder and W&B run,
    the earlier run untouched."""
    source = wb_run["run"]
    before = tree_hashes(source)
    kept = tmp_path / "kept"
    shutil.copytree((source / "best").resolve(), kept)
    epoch = json.loads((kept / "info.json").read_text())["epoch"]
    out = launch(tmp_path, shards, "--epochs", epoch + 1, "--resume", kept, wandb=True)
    (run,) = (tmp_path / "runs").iterdir()
    assert f"resumed from {kept.resolve()} (epoch {epoch}, step 0)" in out
    assert [r["epoch"] for r in history(run)] == list(range(1, epoch + 2))
    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    assert run_record(path).run_id != run_record(wb_run["file"]).run_id
    assert tree_hashes(source) == before


@pytest.mark.slow
def test_force_replaces_the_earlier_runs_files_only_and_disabled_wandb_says_nothing(shards, tmp_path):
    run = earlier_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    off = {"WANDB_MODE": "disabled"}  # W&B switched off by its own setting: nothing said about it
    flags = ["--epochs", "1", "--max-steps-per-epoch", "2", "--output-dir", run, "--force"]
    out = launch(tmp_path, shards, *flags, wandb=True, extra_env=off)
    assert f"--force: removed {run}/checkpoints of the earlier run" in out
    assert "W&B" not in out and json.loads((run / "run.json").read_text())["segments"][0]["wandb"] is None
    assert (run / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001"]
    assert not (run / "wandb").exists() and json.loads((run / "metrics.json").read_text())["epoch"] == 1


@pytest.mark.ddp
def test_ranks_of_a_ddp_run_without_output_dir_share_one_new_folder(shards, tmp_path):
    launch(tmp_path, shards, "--epochs", "1", "--max-steps-per-epoch", "2", procs=2)
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "world.json").read_text())["world_size"] == 2
    assert json.loads((run / "run.json").read_text())["segments"][0]["world_size"] == 2


@pytest.mark.slow
def test_logged_in_but_the_server_does_not_answer_the_run_goes_offline(shards, tmp_path, recorder):
    """A compute node without internet where the user's shared home holds a W&B login."""
    host = f"http://127.0.0.1:{recorder.server_address[1]}"
    login = {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": host, "WANDB_INIT_TIMEOUT": "3"}
    out = launch(tmp_path, shards, "--epochs", "1", "--max-steps-per-epoch", "2", wandb=True, extra_env=login)
    assert "W&B server did not answer" in out and "logging offline" in out and recorder.requests
    (run,) = (tmp_path / "runs").iterdir()
    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    assert [r["epoch"] for r in logged(path)[1] if "val/isic2017_score" in r] == [1]
    assert f"wandb sync runs/{run.name}/wandb" in out
