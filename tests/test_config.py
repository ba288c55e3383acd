"""`lesionkit train` configuration, in-process: flags, recipes, monitors and data checks fail with one line
and exit 2 before any process group starts; --help and --print-config come from the config dataclass."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from lesionkit.cli import run_command
from lesionkit.config import RECIPES_DIR, TrainConfig
from tests.conftest import make_shards
from tests.test_train import TINY


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg-shards")
    make_shards(root / "train", 12, 2, size=32)
    make_shards(root / "val", 6, 1, size=32, prefix="VAL_")
    return root


def train(shards, tmp_path, *flags, train_dir=None, val_dir=None) -> list[str]:
    return [
        *TINY,
        "--train",
        str(train_dir or shards / "train"),
        "--val",
        str(val_dir or shards / "val"),
        "--output-dir",
        str(tmp_path / "run"),
        *map(str, flags),
    ]


def one_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("lesionkit train: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not torch.distributed.is_initialized()  # failed before any process group
    return lines[0]


CASES = {
    "unknown model": (["--model", "resnet9000"], ["resnet9000", "customnet", "resnet18"]),
    "batch size 0": (["--batch-size", "0"], ["batch_size must be >= 1, got 0"]),
    "image size 8": (["--image-size", "8"], ["image_size must be within 32..2048, got 8"]),
    "unknown recipe": (["--config", "resnet19"], ["resnet19", "packaged recipes:", "resnet18"]),
    "unknown monitor": (
        ["--monitor", "isic2071_score"],
        ["monitor 'isic2071_score'", "valid monitors:", "isic2017_score", "auc_melanoma", "loss"],
    ),
    "negative time limit": (
        ["--time-limit-min", "-5"],
        ["time_limit_min must be >= 0 (0 = no limit), got -5"],
    ),
    "swa longer than training": (
        ["--epochs", "3", "--swa-epochs", "4"],
        ["swa_epochs must be within 0..epochs (3), got 4"],
    ),
    "swa and ema": (
        ["--swa-epochs", "2", "--ema-decay", "0.99"],
        ["swa_epochs and ema_decay both average the weights: set one of them"],
    ),
    "negative threads": (["--threads", "-1"], ["threads must be >= 0 (0 = auto), got -1"]),
    "bad augment op": (["--augment-overrides", "{hairs: {p: 1}}"], ["unknown augmentation op 'hairs'"]),
    "device decode, worker augmentation": (
        ["--decode", "device", "--augment-placement", "workers"],
        ["decode=device leaves no pixels in the loader workers: use augment_placement device"],
    ),
    "device decode, skip corrupt": (
        ["--decode", "device", "--skip-corrupt"],
        ["skip_corrupt needs decode=workers"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_flag_is_one_line_listing_choices(shards, tmp_path, capsys, case):
    flags, needles = CASES[case]
    one_error(capsys, run_command("train", train(shards, tmp_path, *flags)), *needles)
    assert not (tmp_path / "run").exists()


def test_a_choice_outside_the_list_is_refused_by_the_parser(shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_command("train", train(shards, tmp_path, "--optimizer", "lamb"))
    assert (
        exc.value.code == 2
        and "invalid choice: 'lamb' (choose from 'sgd', 'adam', 'adamw')" in capsys.readouterr().err
    )


def test_recipe_typo_names_the_key_and_lists_valid_keys(shards, tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model: customnet\nlearning_rate: 0.1\n")
    one_error(
        capsys,
        run_command("train", train(shards, tmp_path, "--config", recipe)),
        str(recipe),
        "unknown key(s) learning_rate",
        "valid keys:",
        " lr,",
    )


def test_missing_shard_folder_and_class_mismatch(shards, tmp_path, capsys):
    rc = run_command("train", train(shards, tmp_path, train_dir=tmp_path / "nowhere"))
    one_error(capsys, rc, f"--train {tmp_path / 'nowhere'}", "manifest.json")
    make_shards(tmp_path / "two", 4, 1, classes=["nevus", "melanoma"])
    rc = run_command("train", train(shards, tmp_path, val_dir=tmp_path / "two"))
    one_error(capsys, rc, "class sets differ", "'seborrheic_keratosis'", "['nevus', 'melanoma']")


def test_resume_into_another_model_or_class_set(shards, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "epoch-0001"
    ckpt.mkdir(parents=True)
    (ckpt / "info.json").write_text(
        json.dumps({"model": "customnet", "classes": ["nevus", "melanoma", "seborrheic_keratosis"]})
    )
    (tmp_path / "run" / "last").symlink_to("checkpoints/epoch-0001")
    rc = run_command("train", train(shards, tmp_path, "--resume", "--model", "resnet18"))
    one_error(capsys, rc, "--resume", "customnet checkpoint, not resnet18", "--model customnet")
    make_shards(tmp_path / "two", 4, 2, classes=["nevus", "melanoma"])
    rc = run_command(
        "train", train(shards, tmp_path, "--resume", train_dir=tmp_path / "two", val_dir=tmp_path / "two")
    )
    one_error(capsys, rc, "--resume", "'seborrheic_keratosis'", "['nevus', 'melanoma']")


def test_print_config_resolves_defaults_profile_recipe_and_flags(capsys):
    from lesionkit.profiles import GENERIC

    recipe = yaml.safe_load((RECIPES_DIR / "customnet.yaml").read_text())
    sections = recipe.pop("profiles")
    defaults = dataclasses.asdict(TrainConfig())
    assert run_command("train", ["--config", "customnet", "--lr", "0.002", "--cpu", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == {
        **defaults,
        **GENERIC["cpu"],
        **recipe,
        **sections["cpu"],
        "lr": 0.002,
        "cpu": True,
        "profile": "cpu",
    }
    assert printed["image_size"] == 128  # the CPU profile of the recipe

    flags = ["--config", "customnet", "--profile", "gpu", "--batch-size", "96", "--print-config"]
    assert run_command("train", flags) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == {
        **defaults,
        **GENERIC["gpu"],
        **recipe,
        **sections["gpu"],
        "batch_size": 96,
        "profile": "gpu",
    }
    assert printed["image_size"] == 224 and printed["lr_scaling"] == "auto" and printed["workers"] == 8


def test_help_lists_every_field_with_its_help_default_and_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        run_command("train", ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exc.value.code == 0
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "(default: 0.001)" in text and "{sgd,adam,adamw}" in text and "(default: customnet)" in text
    assert "--no-class-weights" in text and "--print-config" in text
