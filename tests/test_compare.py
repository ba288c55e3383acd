"""`lesionkit compare` on small run folders in the trainer's layout (seeded, untrained customnet at 32 px,
24 validation images): rows, values, order, the paired bootstrap, the cache, the files and bad input."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from lesionkit import api, compare
from lesionkit.checkpoint import write_inference_files
from lesionkit.cli import run_command
from lesionkit.config import TrainConfig, to_yaml
from lesionkit.data import eval_loader
from lesionkit.models import create_model, input_stats
from tests.conftest import CLASSES, make_shards

SIZE = 32


def make_run(folder: Path, val: Path, lr: float, seed: int, epoch: int, times, classes=CLASSES) -> Path:
    """A run folder as `lesionkit train` leaves it: config.yaml, run.json, checkpoints/epoch-N with the
    `best` and `last` links, the trainer's loop state (history, global_step) in last/."""
    cfg = TrainConfig(val=[str(val)], image_size=SIZE, lr=lr, seed=seed, batch_size=4, output_dir=str(folder))
    ckpt = folder / "checkpoints" / f"epoch-{epoch:04d}"
    ckpt.mkdir(parents=True)
    torch.manual_seed(seed)
    mean, std = input_stats("customnet")
    info = {"classes": list(classes), "task": "isic2017" if list(classes) == CLASSES else "custom"}
    info |= {"model": "customnet", "image_size": SIZE, "mean": list(mean), "std": list(std)}
    info |= {"epoch": epoch, "monitor": "isic2017_score", "metrics": {}}
    write_inference_files(ckpt, create_model("customnet", len(classes)).state_dict(), cfg, info)
    history = [{"epoch": e + 1, "time_s": t} for e, t in enumerate(times)]
    loop = {"epoch": len(times), "step": 0, "global_step": 5 * len(times), "history": history}
    torch.save({"loop": loop, "scheduler": {}, "ema": None}, ckpt / "custom_checkpoint_0.pkl")
    for link in ("best", "last"):
        os.symlink(Path("checkpoints") / ckpt.name, folder / link)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / "run.json").write_text(json.dumps({"segments": [{"cwd": str(folder), "world_size": 2}]}))
    return folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    make_shards(root / "data" / "val", 24, 2, size=SIZE)
    make_shards(root / "data" / "val2", 24, 2, size=SIZE, seed=1, prefix="OTHER_")
    runs = root / "runs"
    for i, lr in enumerate([0.1, 0.01, 0.001]):
        make_run(runs / f"lr{lr}", root / "data" / "val", lr, seed=i, epoch=i + 1, times=[10.0 * (i + 1)] * 3)
    make_run(runs / "other-val", root / "data" / "val2", 0.1, seed=3, epoch=2, times=[5.0, 7.0])
    (runs / "notes").mkdir()  # not a run: ignored inside a sweep folder
    (runs / "lr0.01" / "eval-test").mkdir()
    (runs / "lr0.01" / "eval-test" / "metrics.json").write_text(json.dumps({"isic2017_score": 0.625}))
    return root


def score_by_hand(run: Path, val: Path) -> tuple[float, np.ndarray]:
    """The run's best checkpoint on its validation shards through the API, scored with sklearn."""
    model = api.load(run / "best")
    reader = eval_loader([str(val)], image_size=SIZE, batch_size=8, workers=0, rank=0, world_size=1)
    _, y, p = model.predict_batches(reader)
    return float(np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in (1, 2)])), p


def test_compare_lists_every_run_sorted_with_its_values(sweep, tmp_path, capsys):
    runs = sweep / "runs"
    assert (
        run_command("compare", [str(runs), "--out", str(tmp_path), "--bootstrap", "200", "--workers", "0"])
        == 0
    )
    table = pd.read_csv(tmp_path / "compare.csv")
    assert sorted(table["run"]) == ["lr0.001", "lr0.01", "lr0.1", "other-val"]
    assert table["val"].is_monotonic_decreasing  # isic2017_score: higher is better, best first
    n_params = sum(p.numel() for p in create_model("customnet", 3).parameters())
    for row in table.to_dict("records"):
        run = runs / row["run"]
        val = sweep / "data" / ("val2" if row["run"] == "other-val" else "val")
        expected, _ = score_by_hand(run, val)
        assert row["val"] == pytest.approx(expected, abs=1e-9)
        assert row["val_ci_low"] <= row["val"] <= row["val_ci_high"] and row["val_n"] == 24
        epoch = {"lr0.1": 1, "lr0.01": 2, "lr0.001": 3, "other-val": 2}[row["run"]]
        times = [5.0, 7.0] if row["run"] == "other-val" else [10.0 * epoch] * 3
        assert row["best_epoch"] == epoch
        assert row["train_time_s"] == pytest.approx(sum(times))
        assert row["images_per_s"] == pytest.approx(5 * len(times) * 4 * 2 / sum(times))
        assert row["params"] == n_params
        assert (run / "best" / compare.VAL_PREDICTIONS).is_file()
    assert {"lr", "seed"} <= set(table.columns) and "output_dir" not in table.columns
    assert table.set_index("run").loc["lr0.01", "eval-test isic2017_score"] == 0.625
    assert table.set_index("run").loc["lr0.1", "lr"] == 0.1
    # the paired bootstrap: the best against each run validated on the same images, else why not
    best, rest = table.iloc[0], table.iloc[1:]
    assert best["vs_best"] == "best"
    for row in rest.to_dict("records"):
        if row["run"] == "other-val" or best["run"] == "other-val":
            assert row["vs_best"] == "not paired: validated on other images" and np.isnan(row["p"])
        else:
            assert row["vs_best"] == "paired" and 0 <= row["p"] <= 1
            assert row["diff"] == pytest.approx(best["val"] - row["val"])
            assert row["diff_ci_low"] <= row["diff"] <= row["diff_ci_high"]
    md = (tmp_path / "compare.md").read_text()
    assert md in capsys.readouterr().out
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 1 + 4
    assert md.splitlines()[2].startswith(f"| {best['run']} |")
    with Image.open(tmp_path / "compare.png") as im:
        assert im.format == "PNG"
        im.verify()


def test_cached_predictions_are_reused_and_runs_expand(sweep, tmp_path):
    runs = sweep / "runs"
    picked = [str(runs / "lr0.1"), str(runs / "lr0.01")]
    first, _, _, _ = compare.compare(picked, tmp_path / "a", bootstrap=0, workers=0)
    cache = runs / "lr0.1" / "best" / compare.VAL_PREDICTIONS
    before = cache.read_bytes()
    moved = runs / "lr0.1" / "best" / "model.pt"
    shutil.move(moved, tmp_path / "model.pt")  # scoring again would fail: the cache must be read
    try:
        again, out, over, monitor = compare.compare(picked, None, bootstrap=0, workers=0)
    finally:
        shutil.move(tmp_path / "model.pt", moved)
    assert out == runs and over == ["lr", "seed"]
    assert monitor.name == "isic2017_score" and monitor.mode == "max"
    assert again["val"].tolist() == first["val"].tolist() and cache.read_bytes() == before
    assert again["vs_best"].tolist()[1] == "no bootstrap (--bootstrap 0)"
    for name in compare.OUTPUTS:
        assert (runs / name).is_file()
        (runs / name).unlink()


@pytest.mark.parametrize("case", ["empty", "not_a_run", "classes", "no_best", "monitor"])
def test_bad_input_is_one_line_and_exit_2(sweep, tmp_path, case, capsys):
    runs, argv = sweep / "runs", []
    if case == "empty":
        (tmp_path / "empty").mkdir()
        argv, expect = [str(tmp_path / "empty")], f"{tmp_path / 'empty'}: not a run folder"
    elif case == "not_a_run":
        argv, expect = [str(runs / "lr0.1"), str(runs / "notes")], f"{runs / 'notes'}: not a run folder"
    elif case == "classes":
        odd = make_run(tmp_path / "binary", sweep / "data" / "val", 0.1, 0, 1, [1.0], classes=["a", "b"])
        argv, expect = [str(runs / "lr0.1"), str(odd)], f"{odd} is a custom run on classes ['a', 'b']"
    elif case == "no_best":
        bare = shutil.copytree(runs / "lr0.1", tmp_path / "bare", symlinks=True)
        (bare / "best").unlink()
        argv, expect = [str(bare)], f"{bare}: no best checkpoint yet"
    else:
        argv, expect = [str(runs / "lr0.1"), "--monitor", "f1"], "monitor 'f1' is not a metric"
    assert run_command("compare", [*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lesionkit compare: error:") and expect in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
