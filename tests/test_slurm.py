"""The job scripts against a real Slurm scheduler (tests/slurm/cluster.sh: slurmctld + two slurmd here, the
`cluster` fixture of tests/conftest.py, shared with tests/test_sweep.py).

All jobs are submitted together (they share the throwaway cluster like a real queue) and each test then
waits for its own. They train tiny models for 2 epochs on synth + pack shards, on CPU nodes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SLURM_ENDED, scontrol_job, usr1_lands_while_training, wait_until
from tests.wandb_log import logged, run_record

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
LESIONKIT = Path(sys.executable).with_name("lesionkit")
SMOKE = "--image-size 64 --batch-size 4 --workers 0 --max-steps-per-epoch 3 --no-wandb"
TIMEOUT_S = 420


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 train / 12 val synthetic images at 64 px, through the real `lesionkit synth` and `pack`."""
    d = tmp_path_factory.mktemp("shards")
    subprocess.run(
        [
            str(LESIONKIT),
            "synth",
            str(d / "raw"),
            "--n-train",
            "24",
            "--n-val",
            "12",
            "--size",
            "64",
            "--workers",
            "1",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    packs = [
        subprocess.Popen(
            [
                str(LESIONKIT),
                "pack",
                "--images",
                str(d / "raw" / f"ISIC-2017_{split}_Data"),
                "--labels",
                str(d / "raw" / f"ISIC-2017_{split}_Part3_GroundTruth.csv"),
                "--out",
                str(d / out),
                "--size",
                "64",
                "--shard-size",
                "12",
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for split, out in (("Training", "train"), ("Validation", "val"))
    ]
    for p in packs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    return d


def sbatch(env, script, logdir, name, *sbatch_args, **lk):
    """Submit jobs/SCRIPT with LK_* settings; return (job id, log path, output dir)."""
    out = logdir / f"run-{name}"
    job_env = dict(env, LK_OUTPUT=str(out), **{f"LK_{k.upper()}": str(v) for k, v in lk.items()})
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--cpus-per-task=1",
            f"--job-name=lk-{name}",
            f"--output={logdir}/{name}-%j.out",
            *sbatch_args,
            str(ROOT / "jobs" / script),
        ],
        check=False,
        env=job_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    return job, logdir / f"{name}-{job}.out", out


@pytest.fixture(scope="module")
def jobs(cluster, shards, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("jobs")
    data = {"train": shards / "train", "val": shards / "val", "epochs": 2}
    submitted = {
        # the pre-empted run first: its test signals it while it trains; W&B offline (no login: empty netrc)
        "preempt": sbatch(
            dict(cluster, NETRC=os.devnull, WANDB_DATA_DIR=str(logdir / "wandb-data")),
            "customnet.sh",
            logdir,
            "preempt",
            **data,
            extra_args=SMOKE.replace(" --no-wandb", ""),
        ),
        "reference": sbatch(cluster, "customnet.sh", logdir, "reference", **data, extra_args=SMOKE),
        "two_nodes": sbatch(
            cluster, "customnet.sh", logdir, "two-nodes", "--nodes=2", **data, extra_args=SMOKE
        ),
        "resnet": sbatch(  # the recipe's loader workers, capped by the planning at the job's one CPU
            cluster,
            "resnet.sh",
            logdir,
            "resnet",
            **data,
            extra_args=SMOKE.replace("--max-steps-per-epoch 3", "--max-steps-per-epoch 2").replace(
                "--workers 0 ", ""
            )
            + " --no-pretrained",
        ),
        "few_shards": sbatch(  # 2 nodes x 2 processes for the 2 training shards
            cluster,
            "customnet.sh",
            logdir,
            "few-shards",
            "--nodes=2",
            **data,
            procs_per_node=2,
            extra_args=SMOKE,
        ),
        "bad_data": sbatch(
            cluster,
            "customnet.sh",
            logdir,
            "bad-data",
            train=logdir / "no-such-shards",
            val=shards / "val",
            epochs=2,
            extra_args=SMOKE,
        ),
    }
    yield submitted
    for job, _, _ in submitted.values():
        subprocess.run(["scancel", job], check=False, env=cluster, capture_output=True)


def wait_done(env, job, log) -> dict:
    def done():
        info = scontrol_job(env, job)
        return info if info["JobState"] in SLURM_ENDED else None

    info = wait_until(done, f"job {job} to end", TIMEOUT_S)
    info["log"] = log.read_text(errors="replace") if log.exists() else ""
    return info


def read_json(path: Path):
    return json.loads(path.read_text())


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_result(cluster, jobs):
    job, log, out = jobs["preempt"]
    # The header row is printed after the trainer's signal handler is set and just before the first step.
    wait_until(
        lambda: log.exists() and "train_loss" in log.read_text(errors="replace"),
        "training to start",
        TIMEOUT_S,
    )
    with usr1_lands_while_training(cluster, job):
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)

    # Slurm holds a requeued job for ~2 minutes (BeginTime); release it sooner, but not within the second
    # of the requeue (the node would refuse the relaunch: "Job credential revoked").
    def requeued():
        info = scontrol_job(cluster, job)
        assert info["JobState"] not in ("COMPLETED", "FAILED"), f"ended without a requeue:\n{log.read_text()}"
        return info["Restarts"] == "1" and info["JobState"] == "PENDING"

    wait_until(requeued, "the job to requeue itself", TIMEOUT_S)
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, check=True)
    info = wait_done(cluster, job, log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info["log"]
    assert "lesionkit: stop requested; saved" in info["log"]
    assert re.search(r"requeueing job \d+", info["log"])
    assert re.search(r"resumed from \S+/epoch-\d{4}-step-\d+ \(epoch [01], step [1-3]\)", info["log"]), info[
        "log"
    ]
    assert read_json(out / "status.json")["status"] == "completed"
    # both starts wrote into one offline W&B run (same id, steps continuing), uploaded by one command
    segments = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(segments) == 2 and len({run_record(p).run_id for p in segments}) == 1, segments
    steps = [[row["_step"] for row in logged(p)[1] if "_step" in row] for p in segments]
    assert steps[1] and (not steps[0] or max(steps[0]) < min(steps[1])), steps
    assert (
        f"2 segment(s) under {out}/wandb); upload every segment with: wandb sync {out}/wandb" in info["log"]
    )

    ref_job, ref_log, ref_out = jobs["reference"]
    ref = wait_done(cluster, ref_job, ref_log)
    assert (ref["JobState"], ref["Restarts"]) == ("COMPLETED", "0"), ref["log"]
    resumed, uninterrupted = read_json(out / "metrics.json"), read_json(ref_out / "metrics.json")
    assert resumed["epoch"] == uninterrupted["epoch"] == 2
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        if isinstance(value, float):
            assert resumed[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
        else:
            assert resumed[key] == value, key


def test_resnet_job_completes_with_checkpoint_and_metrics(cluster, jobs):
    job, log, out = jobs["resnet"]
    info = wait_done(cluster, job, log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info["log"]
    assert "resnet18 on 1 x cpu" in info["log"]
    assert "config cpu.yaml" in info["log"]
    assert info["log"].count("lesionkit plan: 1 process(es) = 1 node(s) x 1, device cpu, profile cpu") == 1
    assert (
        "lesionkit plan: loader workers 1 per process (capped by 1 CPU(s) (SLURM_CPUS_PER_TASK=1) / "
        "1 process(es) on the node)" in info["log"]
    )
    for link in ("last", "best"):
        assert (out / link / "model.pt").is_file() and (out / link / "info.json").is_file()
    assert read_json(out / "last" / "info.json")["model"] == "resnet18"
    metrics = read_json(out / "metrics.json")
    assert metrics["epoch"] == 2 and 0.0 <= metrics["auc_melanoma"] <= 1.0
    assert read_json(out / "world.json")["world_size"] == 1


def test_two_node_job_trains_one_ddp_group_across_the_nodes(cluster, jobs):
    job, log, out = jobs["two_nodes"]
    info = wait_done(cluster, job, log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info["log"]
    assert info["NodeList"] == "lkn[1-2]" and info["NumNodes"] == "2"
    assert "2 node(s) x 1 process(es)" in info["log"] and "config cpu_ddp.yaml" in info["log"]
    assert "--main_process_ip lkn1 --rdzv_backend c10d" in info["log"]
    assert info["log"].count("lesionkit plan: 2 process(es) = 2 node(s) x 1, device cpu") == 1  # rank 0 only
    assert "lesionkit plan: training shards 2: 1 per rank" in info["log"]
    world = read_json(out / "world.json")
    assert world["world_size"] == 2
    digests = world["weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert read_json(out / "metrics.json")["epoch"] == 2


def test_too_few_shards_for_the_allocation_fail_before_training_naming_the_shard_size(cluster, jobs):
    job, log, out = jobs["few_shards"]
    info = wait_done(cluster, job, log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info["log"]
    assert "2 node(s) x 2 process(es)" in info["log"]
    # 24 samples for 4 processes x 1 worker (--workers 0 loads in the process): 6 per shard
    assert "2 training shard(s) in " in info["log"] and "for 4 processes" in info["log"]
    assert "--shard-size 6 --force` (4 shards for 4 process(es) x 1 loader worker(s))" in info["log"]
    assert "train_loss" not in info["log"] and not (out / "status.json").exists()  # nothing trained


def test_failing_training_fails_the_job_and_says_why(cluster, jobs):
    job, log, _ = jobs["bad_data"]
    info = wait_done(cluster, job, log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info["log"]
    assert "no-such-shards: no manifest.json there" in info["log"]
    assert "training failed with exit code" in info["log"]
    assert info["Restarts"] == "0"


@pytest.fixture(scope="module")
def plan_shards(tmp_path_factory):
    """Enough shards for the largest allocation the launcher tests plan (8 processes)."""
    from tests.conftest import make_shards

    root = tmp_path_factory.mktemp("plan-shards")
    make_shards(root / "train", 160, 16)
    make_shards(root / "val", 16, 2, prefix="VAL_")
    return root


@pytest.mark.parametrize(
    "gpus, nodes, procs, config, nprocs",
    [
        ("0", "1", "", "cpu.yaml", 1),
        ("0", "1", "2", "cpu_ddp.yaml", 2),
        ("0", "2", "", "cpu_ddp.yaml", 2),
        ("1", "1", "", "single_gpu.yaml", 1),
        ("4", "1", "", "multi_gpu.yaml", 4),
        ("4", "2", "", "multi_node.yaml", 8),
    ],
)
def test_launcher_picks_the_accelerate_config_for_the_allocation(
    cluster, plan_shards, gpus, nodes, procs, config, nprocs
):
    """LK_DRY_RUN prints the launch and the trainer's plan without running it: the GPU paths, checked where
    no GPU exists (the plan says a real run here would stop)."""
    env = {k: v for k, v in cluster.items() if not k.startswith(("SLURM_", "LK_"))}
    env.update(
        SLURM_CONF=cluster["SLURM_CONF"],
        LK_TRAIN=str(plan_shards / "train"),
        LK_VAL=str(plan_shards / "val"),
        LK_DRY_RUN="1",
        LK_GPUS_PER_NODE=gpus,
        LK_PROCS_PER_NODE=procs,
        SLURM_NNODES=nodes,
        SLURM_JOB_NODELIST="gpu[07-08]",
        LK_EPOCHS="3",
        LK_EXTRA_ARGS="--batch-size 128 --no-wandb",
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "jobs" / "efficientnet_lite0.sh")],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"config {config}," in proc.stdout
    cmd = proc.stdout.split("node command: ", 1)[1]
    assert f"--num_processes {nprocs} --num_machines {nodes} " in cmd
    assert "--config efficientnet_lite0 " in cmd and "--resume" in cmd and "--epochs 3" in cmd
    assert cmd.splitlines()[0].rstrip().endswith("--batch-size 128 --no-wandb")
    assert (" --cpu " in cmd) == (gpus == "0")
    per_node = nprocs // int(nodes)
    plan = proc.stdout.split("lesionkit plan: ", 1)[1]
    assert plan.startswith(f"{nprocs} process(es) = {nodes} node(s) x {per_node}, device ")
    assert ("device cuda (one per process), profile gpu [LK_GPUS_PER_NODE" in plan) == (gpus != "0")
    assert (
        f"batch 128 per device x {nprocs} process(es) x 1 accumulation = global batch {128 * nprocs}" in plan
    )
    if gpus != "0":  # AdamW: square-root scaling from the 32 the recipe's lr is tuned for; a per-step warm-up
        lr = 0.0005 * (128 * nprocs / 32) ** 0.5
        assert f"lr {lr:.4g} (sqrt scaling (adamw)" in plan and "warm-up per step over 1 epoch(s)" in plan
    assert ("--main_process_ip gpu07 --rdzv_backend c10d" in cmd) == (nodes == "2")
