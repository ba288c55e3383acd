"""Grouped folds on real data: no lesion or patient on both sides of a fold, exact loader plans when a run
selects folds, `train --fold`, the monitor cases (bad name, loss minimised, ISIC 2019 past epoch 1), `cv`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cpu_ddp, make_shards
from isic_real import pack_2019, pack_2020, records
from sklearn import metrics as skm
from test_train import TINY, env

from lesionkit.checkpoint import trainer_state
from lesionkit.cli import run_command
from lesionkit.compare import compare
from lesionkit.data import eval_loader, train_loader
from lesionkit.manifest import verify
from lesionkit.tasks import ISIC2019_CLASSES

REPO = Path(__file__).resolve().parents[1]
K = 3


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The real 2019 subset split by lesion and the 2020 subset by patient, 3 folds each."""
    root = tmp_path_factory.mktemp("folds")
    (d2019, _), (d2020, _) = pack_2019(root), pack_2020(root)
    assert run_command("split", [str(d2019), "--by", "lesion", "--folds", str(K)]) == 0
    assert run_command("split", [str(d2020), "--by", "patient", "--folds", str(K), "--seed", "1"]) == 0
    return {"2019": d2019, "2020": d2020, "root": root}


def manifest(folder) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


@pytest.mark.parametrize("year, by", [("2019", "lesion"), ("2020", "patient")])
def test_no_group_is_on_both_sides_of_any_fold(split, year, by):
    m = manifest(split[year])
    fold_of, back = m["split"]["fold_of"], records(split[year])
    assert set(fold_of) == set(back) and set(fold_of.values()) == set(range(K))
    for fold in range(K):
        inside = {back[i]["groups"][by] for i, f in fold_of.items() if f == fold} - {None}
        outside = {back[i]["groups"][by] for i, f in fold_of.items() if f != fold} - {None}
        assert inside and not inside & outside
    # the fold counts the loader plans from add up, per shard and in total, and the shards are untouched
    for shard in m["shards"]:
        per_class = Counter()
        for counts in shard["fold_counts"]:
            per_class.update(counts)
        assert {c: per_class[c] for c in m["classes"]} == shard["counts"]
    for fold, counts in enumerate(m["split"]["counts"]):
        assert sum(counts.values()) == sum(f == fold for f in fold_of.values())
    assert verify(split[year]) == []
    assert m["split"]["method"] == "StratifiedGroupKFold" and m["split"]["by"] == by


def test_isic2020_packed_on_diagnosis_gets_the_same_folds_as_on_target(split):
    """Folds stratify on melanoma for isic2020, so both label choices are compared on the same patients."""
    finer, _ = pack_2020(split["root"], name="isic2020-dx", label_column="diagnosis")
    assert manifest(finer)["task"] == "isic2020" and "nevus" in manifest(finer)["classes"]
    assert run_command("split", [str(finer), "--by", "patient", "--folds", str(K), "--seed", "1"]) == 0
    assert manifest(finer)["split"]["fold_of"] == manifest(split["2020"])["split"]["fold_of"]


def test_split_refuses_to_replace_folds_or_group_by_an_absent_id(split, capsys):
    before = (split["2019"] / "manifest.json").read_text()
    assert run_command("split", [str(split["2019"]), "--folds", "4"]) == 2
    assert "already has 3 folds by lesion (seed 0); pass --force" in capsys.readouterr().err
    assert run_command("split", [str(split["2019"]), "--by", "patient", "--force"]) == 2
    assert "no sample has a patient id (group ids in this folder: lesion)" in capsys.readouterr().err
    assert (split["2019"] / "manifest.json").read_text() == before


def test_ungrouped_split_stratifies_by_class_and_says_so(split, tmp_path, capsys):
    """ISIC 2017 has no lesion ids: `--by none` folds are stratified by class, and the line says so."""
    data = shutil.copytree(split["2019"], tmp_path / "copy")
    assert run_command("split", [str(data), "--by", "none", "--folds", str(K), "--force"]) == 0
    out = capsys.readouterr().out
    assert f"in {K} folds by none (ungrouped: stratified by class only), seed 0" in out
    counts = manifest(data)["split"]["counts"]
    for label in counts[0]:
        per_fold = [c[label] for c in counts]
        assert max(per_fold) - min(per_fold) <= 1, (label, per_fold)


@pytest.mark.parametrize("world_size", [1, 2])
def test_selected_folds_plan_equal_batches_and_are_read_exactly_once(split, world_size):
    fold_of = manifest(split["2019"])["split"]["fold_of"]
    held_out = {i for i, f in fold_of.items() if f == 1}
    label_of = {k: ISIC2019_CLASSES.index(r["label_name"]) for k, r in records(split["2019"]).items()}
    seen, lengths, evaluated = set(), [], Counter()
    for rank in range(world_size):
        loader = train_loader(
            split["2019"], image_size=32, batch_size=4, workers=2, seed=0, epoch=0, rank=rank,
            world_size=world_size, folds=[0, 2],
        )  # fmt: skip
        batches = list(loader)
        lengths += [len(loader), len(batches)]
        seen |= {k for b in batches for k in b.keys}
        for batch in eval_loader(
            split["2019"], image_size=32, batch_size=5, workers=2, rank=rank, world_size=world_size, folds=[1]
        ):
            evaluated.update(batch.keys)
            assert batch.labels.tolist() == [label_of[k] for k in batch.keys]
    assert len(set(lengths)) == 1
    assert seen == set(fold_of) - held_out  # training sees every training-fold sample, never a held-out one
    assert evaluated == Counter(held_out)  # each held-out sample exactly once


def train_argv(tmp_path, data, *flags) -> list[str]:
    return [*TINY, "--train", str(data), "--output-dir", str(tmp_path / "run"), *map(str, flags)]


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--fold", "3"], ["has folds 0..2 (`lesionkit split`), not [3]"]),
        (["--fold", "0", "--val", "VAL"], ["--fold 0 validates on fold 0 of --train: drop --val"]),
        (["--fold", "0", "--monitor", "isic2017_score"], ["valid monitors:", "balanced_accuracy", "auc_MEL"]),
    ],
)
def test_fold_and_monitor_mistakes_exit_2_before_training(split, tmp_path, capsys, flags, needles):
    flags = [str(split["2019"]) if f == "VAL" else f for f in flags]
    assert run_command("train", train_argv(tmp_path, split["2019"], *flags)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(n in err for n in needles), err
    assert not (tmp_path / "run").exists()


def test_fold_without_a_split_names_the_split_command(tmp_path, capsys):
    make_shards(tmp_path / "plain", 12, 2)
    assert run_command("train", train_argv(tmp_path, tmp_path / "plain", "--fold", "0")) == 2
    assert f"has no folds: assign them with `lesionkit split {tmp_path / 'plain'}" in capsys.readouterr().err


def train_fold(tmp_path, data, *flags):
    cmd = [sys.executable, str(REPO / "lesionkit" / "train.py"), *train_argv(tmp_path, data, *flags)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env(), cwd=REPO, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp_path / "run"


@pytest.mark.slow
def test_isic2019_trains_past_epoch_1_on_a_lesion_fold_with_its_default_monitor(split, tmp_path):
    run = train_fold(tmp_path, split["2019"], "--fold", "2", "--epochs", "2", "--max-steps-per-epoch", "3")
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["monitor"] == "balanced_accuracy"
    assert metrics["n"] == sum(manifest(split["2019"])["split"]["counts"][2].values())  # validated on fold 2
    # the model card counts what the run trained and validated on, not the whole folder
    held_out, m = manifest(split["2019"])["split"]["counts"][2], manifest(split["2019"])
    facts = json.loads((run / "best" / "card.json").read_text())["training"]
    (train,), (val,) = facts["train"], facts["val"]
    assert val["counts"] == held_out and val["num_samples"] == metrics["n"]
    assert train["counts"] == {c: n - held_out[c] for c, n in m["counts"].items()}
    assert train["num_samples"] == m["num_samples"] - metrics["n"]


@pytest.mark.ddp
def test_two_process_fold_run_validates_every_held_out_sample_once(split, tmp_path):
    cmd = cpu_ddp(REPO / "lesionkit" / "train.py", procs=2)
    flags = train_argv(tmp_path, split["2019"], "--fold", "1", "--epochs", "1", "--max-steps-per-epoch", "2")
    e = {**env(), "ACCELERATE_USE_CPU": "1"}
    res = subprocess.run(
        cmd + flags, capture_output=True, text=True, timeout=400, env=e, cwd=REPO, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "world.json").read_text())["world_size"] == 2
    held_out = manifest(split["2019"])["split"]["counts"][1]
    metrics = json.loads((run / "metrics.json").read_text())  # gathered by id: a duplicate would have failed
    assert metrics["n"] == sum(held_out.values()) and all(metrics[f"n_{c}"] == n for c, n in held_out.items())


@pytest.mark.slow
def test_monitor_loss_keeps_the_lowest_loss_as_best(split, tmp_path):
    run = train_fold(
        tmp_path, split["2020"], "--fold", "0", "--epochs", "4", "--max-steps-per-epoch", "3",
        "--monitor", "loss", "--scheduler", "plateau", "--lr", "0.05",
    )  # fmt: skip
    history = trainer_state(run / "last")["loop"]["history"]
    losses = [row["val_loss"] for row in history]
    best = json.loads((run / "best" / "info.json").read_text())
    assert best["monitor"] == "loss" and best["metrics"]["loss"] == min(losses)
    assert best["epoch"] == 1 + losses.index(min(losses))
    assert json.loads((run / "status.json").read_text())["best"] == min(losses)
    assert trainer_state(run / "last")["scheduler"]["mode"] == "min"  # the plateau scheduler minimises too


@pytest.mark.slow
def test_cv_trains_each_fold_scores_out_of_fold_and_continues(split, tmp_path, capsys):
    out = tmp_path / "cv"
    argv = ["--data", str(split["2019"]), "--output-dir", str(out), "--folds", "0", "1", "--bootstrap", "300"]
    argv += ["--holdout", str(split["2019"])]  # the fold models' mean on a split (here: all of the images)
    tiny = [*TINY, "--epochs", "1", "--max-steps-per-epoch", "2"]
    assert run_command("cv", [*argv, *tiny]) == 0
    summary = json.loads((out / "cv.json").read_text())
    held = pd.read_csv(out / "eval-isic2019" / "predictions.csv")
    assert summary["holdout"]["n"] == len(held) == len(manifest(split["2019"])["split"]["fold_of"])
    assert summary["holdout"]["members"] == [str((out / f"fold-{f}" / "last").resolve()) for f in (0, 1)]
    assert summary["holdout"]["score"] == pytest.approx(
        skm.balanced_accuracy_score(held["label"], held[list(ISIC2019_CLASSES)].to_numpy().argmax(1))
    )
    oof = pd.read_csv(out / "oof_predictions.csv")
    fold_of = manifest(split["2019"])["split"]["fold_of"]
    assert Counter(oof["image_id"]) == Counter(i for i, f in fold_of.items() if f in (0, 1))
    assert all(fold_of[i] == f for i, f in zip(oof["image_id"], oof["fold"]))
    y, p = oof["label"].to_numpy(), oof[list(ISIC2019_CLASSES)].to_numpy()
    assert summary["score_name"] == "balanced_accuracy"
    assert summary["score"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))
    lo, hi = summary["score_ci"]
    assert lo <= summary["score"] <= hi and [f["fold"] for f in summary["folds"]] == [0, 1]
    printed = capsys.readouterr().out
    assert f"out-of-fold balanced_accuracy {summary['score']:.4f}" in printed
    # and the task's other headline metrics, pooled the same way (MEL is class 0)
    assert f"auc_melanoma {skm.roc_auc_score(y == 0, p[:, 0]):.4f}" in printed.split("out-of-fold")[-1]
    assert f"lesionkit cv: holdout balanced_accuracy {summary['holdout']['score']:.4f}" in printed

    trained = {f: (out / f"fold-{f}" / "last").resolve() for f in (0, 1)}
    assert run_command("cv", [*argv, *tiny]) == 0  # a rerun continues: nothing is trained or scored again
    assert "fold 0: train" not in (printed := capsys.readouterr().out) and "holdout: the mean" not in printed
    assert {f: (out / f"fold-{f}" / "last").resolve() for f in (0, 1)} == trained
    assert run_command("cv", [*argv, *tiny, "--lr", "0.5"]) == 2
    assert "holds a cross-validation run with another config (differs in lr)" in capsys.readouterr().err

    # `compare` takes CV folders: one row each, scored on the pooled out-of-fold predictions and paired image
    # by image; a planted CV whose predictions always miss the true class is the clear loser
    worse = tmp_path / "cv-worse"
    shutil.copytree(out, worse, symlinks=True)
    planted = oof.copy()
    planted[list(ISIC2019_CLASSES)] = np.eye(len(ISIC2019_CLASSES))[(y + 1) % len(ISIC2019_CLASSES)]
    planted.to_csv(worse / "oof_predictions.csv", index=False)
    table = compare([out, worse], out=tmp_path, bootstrap=300)[0]
    assert list(table["run"]) == ["cv", "cv-worse"] and list(table["val_n"]) == [len(oof)] * 2
    assert table["val"][0] == pytest.approx(summary["score"]) and table["val"][1] == 0.0
    assert table["vs_best"][1] == "paired" and table["diff"][1] == pytest.approx(summary["score"])
    assert table["p"][1] < 0.01 and table["best_epoch"][0] == "-"
    assert table["eval-isic2019 balanced_accuracy"][0] == pytest.approx(summary["holdout"]["score"])

    # --rescore: the same fold models scored again with flip TTA into a new folder, nothing trained; compare
    # pairs the two image by image
    flips = tmp_path / "cv-flips"
    again = [a if a != str(out) else str(flips) for a in argv] + [*tiny, "--val-tta", "flips"]
    assert run_command("cv", [*again, "--rescore", str(out)]) == 0
    assert "train:" not in (printed := capsys.readouterr().out) and "fold 1: score" in printed
    rescored = json.loads((flips / "cv.json").read_text())
    assert rescored["models"] == str(out) and not list(flips.glob("fold-*/status.json"))
    assert [f["checkpoint"] for f in rescored["folds"]] == [str(trained[f]) for f in (0, 1)]
    assert {
        json.loads((flips / f"fold-{f}" / "oof" / "metrics.json").read_text())["tta"] for f in (0, 1)
    } == {"flips"}
    assert rescored["holdout"]["members"] == summary["holdout"]["members"]
    flipped = pd.read_csv(flips / "oof_predictions.csv")
    assert list(flipped["image_id"]) == list(oof["image_id"]) and list(flipped["label"]) == list(oof["label"])
    assert not np.allclose(flipped[list(ISIC2019_CLASSES)], oof[list(ISIC2019_CLASSES)])
    table = compare([out, flips], out=tmp_path / "cmp-flips", bootstrap=300)[0]
    assert set(table["run"]) == {"cv", "cv-flips"} and "paired" in set(table["vs_best"])
    assert sorted(table["val_tta"]) == ["flips", "none"]
    # the two CVs as an ensemble of recipes (`ensemble --oof`): the mean of their out-of-fold predictions
    assert run_command("ensemble", ["--oof", str(out), str(flips), "--out", str(tmp_path / "ens-oof")]) == 0
    both = pd.read_csv(tmp_path / "ens-oof" / "predictions.csv", dtype={"image_id": str})
    mean = (oof[list(ISIC2019_CLASSES)].to_numpy() + flipped[list(ISIC2019_CLASSES)].to_numpy()) / 2
    assert list(both["image_id"]) == list(oof["image_id"].astype(str))
    assert np.abs(both[list(ISIC2019_CLASSES)].to_numpy() - mean).max() < 1e-9
    ens = json.loads((tmp_path / "ens-oof" / "metrics.json").read_text())
    assert ens["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, mean.argmax(1)))
    assert [f["fold"] for f in ens["folds"]] == [0, 1] and len(ens["vs_members"]) == 2
    # refusals, each before any scoring: another training config, a rescoring into a training CV (or the
    # reverse), a config whose validation steered training
    for flags, needle in [
        ([*again, "--rescore", str(out), "--lr", "0.5"], "trained with another config (differs in lr)"),
        ([*argv, *tiny, "--val-tta", "flips", "--rescore", str(out)], "trained its own folds"),
        ([*again[:-2]], "holds a rescored CV"),
        ([*again, "--rescore", str(out), "--select", "best"], "validation steers this config"),
    ]:
        assert run_command("cv", flags) == 2, flags
        assert needle in capsys.readouterr().err
    assert json.loads((flips / "cv.json").read_text()) == rescored

    # CVs of different folds of one split (`--folds`) pair on the images both scored: here fold 0's
    one = tmp_path / "cv-flips-fold0"
    argv0 = ["--data", str(split["2019"]), "--output-dir", str(one), "--folds", "0", "--bootstrap", "0"]
    assert run_command("cv", [*argv0, *tiny, "--val-tta", "flips", "--rescore", str(out)]) == 0
    table = compare([out, one], out=tmp_path / "cmp-fold0", bootstrap=300)[0]
    n0 = sum(f == 0 for f in fold_of.values())
    assert table.set_index("run")["val_n"].to_dict() == {"cv": len(oof), "cv-flips-fold0": n0}
    assert table["vs_best"][1] == f"paired on the {n0} images both scored"
    fold0 = {
        r: pd.read_csv(d / "oof_predictions.csv").query("fold == 0")
        for r, d in [("cv", out), (one.name, one)]
    }
    bacc = {
        r: skm.balanced_accuracy_score(df["label"], df[list(ISIC2019_CLASSES)].to_numpy().argmax(1))
        for r, df in fold0.items()
    }
    assert table["diff"][1] == pytest.approx(bacc[table["run"][0]] - bacc[table["run"][1]])
    assert f"(on the {n0} images both scored)" in (tmp_path / "cmp-fold0" / "compare.md").read_text()
    # pairing follows the folds, not the folder's name: the same split of the same images packed again
    # elsewhere (e.g. at another size) pairs; a CV whose images were held out by other folds does not
    moved = tmp_path / "cv-moved-fold0"
    shutil.copytree(one, moved, symlinks=True)
    config = (moved / "cv-config.yaml").read_text()
    assert str(split["2019"]) in config
    (moved / "cv-config.yaml").write_text(config.replace(str(split["2019"]), str(tmp_path / "repacked")))
    table = compare([out, moved], out=tmp_path / "cmp-moved", bootstrap=300)[0]
    assert table["vs_best"][1] == f"paired on the {n0} images both scored"
    shuffled = pd.read_csv(moved / "oof_predictions.csv")
    shuffled["fold"] = 1
    shuffled.to_csv(moved / "oof_predictions.csv", index=False)
    table = compare([out, moved], out=tmp_path / "cmp-moved", bootstrap=300)[0]
    assert table["vs_best"][1] == "not paired: the CVs' folds differ" and table["diff"].isna()[1]
