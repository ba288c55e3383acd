"""Batch augmentation: presets, each op's switch, colour constancy, hair, mixup/cutmix, seeds, preview."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import make_shards
from PIL import Image

from lesionkit import cli
from lesionkit.augment import (
    OP_PARAMS,
    PRESETS,
    ShadesOfGray,
    build_augment,
    build_mixup,
    choose_placement,
    resize_center,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # no normalization: outputs stay in [0, 1]


def _batch(b=4, h=64, w=64, seed=0) -> torch.Tensor:
    """uint8 images with structure (a blob on a gradient) and texture, so every op has something to change."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    blob = (-(xs**2 + ys**2) * 3).exp()
    base = torch.stack([0.8 - 0.5 * blob, 0.6 - 0.4 * blob + 0.1 * xs, 0.5 - 0.3 * blob + 0.1 * ys])
    img = base.unsqueeze(0) + 0.15 * torch.rand(b, 3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8)


def _only(op: str, p: float, **extra) -> dict:
    return {op: {"p": p}, **extra}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_returns_normalized_float_batches(preset):
    x = _batch(h=48, w=80)  # not square and not the output size
    for mean_std, lo, hi in ((UNIT, 0.0, 1.0), (IMAGENET, -2.2, 2.7)):
        aug = build_augment(preset, 32, *mean_std, seed=1)
        for mode in (aug.train(), aug.eval()):
            y = mode(x)
            assert y.shape == (4, 3, 32, 32) and y.dtype == torch.float32
            assert float(y.min()) >= lo and float(y.max()) <= hi
    y = build_augment(preset, 32, *UNIT, seed=1)(x.float() / 255)  # float input too
    assert y.shape == (4, 3, 32, 32) and 0.0 <= float(y.min()) and float(y.max()) <= 1.0


@pytest.mark.parametrize("op", list(OP_PARAMS))
def test_each_op_changes_the_image_at_p1_and_leaves_it_at_p0(op):
    x = _batch()
    reference = build_augment("none", 64, *UNIT).eval()(x)
    changed = build_augment("none", 64, *UNIT, **_only(op, 1.0))(x, seed=0)
    assert changed.shape == reference.shape
    assert (changed - reference).abs().amax(dim=(1, 2, 3)).min() > 0.01, (
        f"{op} at p=1 left a sample unchanged"
    )
    untouched = build_augment("none", 64, *UNIT, **_only(op, 0.0))(x, seed=0)
    assert torch.equal(untouched, reference)
    # p=0 inside an active pipeline: only the other (exact) op acts
    carrier = "vflip" if op == "hflip" else "hflip"
    flipped = build_augment("none", 64, *UNIT, **_only(op, 0.0, **{carrier: {"p": 1.0}}))(x, seed=0)
    assert torch.equal(flipped, reference.flip(-1 if carrier == "hflip" else -2))


def test_eval_mode_is_deterministic_resize_and_normalize():
    x = _batch(h=48, w=80)
    aug = build_augment("heavy", 32, *IMAGENET).eval()
    a, b = aug(x), aug(x)
    assert torch.equal(a, b)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    expected = (resize_center(x.float() / 255, 32) - mean) / std
    assert torch.allclose(a, expected, atol=1e-5)
    train = aug.train()
    assert not torch.equal(train(x), train(x))  # no seed: a new draw each call


def test_shades_of_gray_removes_a_colour_cast():
    grey = _batch(b=2, seed=3).float().mean(1, keepdim=True) / 255  # achromatic texture
    cast = grey * torch.tensor([1.0, 0.75, 0.5]).view(1, 3, 1, 1)
    means = ShadesOfGray()(cast).mean(dim=(2, 3))
    assert (means.amax(1) - means.amin(1)).max() < 1e-3 * means.mean()
    before = cast.mean(dim=(2, 3))
    assert (before.amax(1) - before.amin(1)).min() > 0.2  # it was cast to begin with
    # the same through the module, in eval mode (no normalization)
    out = build_augment("none", 64, *UNIT, color_constancy=True).eval()((cast * 255).round().to(torch.uint8))
    m = out.mean(dim=(2, 3))
    assert ((m.amax(1) - m.amin(1)) / m.mean(1)).max() < 0.02


def test_hair_draws_thin_dark_strands():
    white = torch.full((4, 3, 64, 64), 255, dtype=torch.uint8)
    y = build_augment("none", 64, *UNIT, hair={"p": 1.0, "max_hairs": 3, "max_width": 2})(white, seed=5)
    assert float(y.max()) == 1.0
    darkened = (y < 0.99).any(1).float().mean(dim=(1, 2))  # fraction of pixels touched, per image
    assert (darkened > 0.002).all() and (darkened < 0.25).all()
    assert float(y.min()) < 0.4  # strands are dark


def test_same_seed_same_output_and_global_rng_untouched():
    x = _batch()
    aug = build_augment("derm", 64, *IMAGENET)
    torch.manual_seed(123)
    a = aug(x, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(a, aug(x, seed=7))
    assert torch.equal(torch.rand(3), after)  # fork_rng: the caller's stream is not consumed
    assert not torch.equal(a, aug(x, seed=8))
    # a module built with a seed repeats its whole sequence of batches
    first, second = build_augment("derm", 64, *IMAGENET, seed=3), build_augment("derm", 64, *IMAGENET, seed=3)
    seq1, seq2 = [first(x) for _ in range(2)], [second(x) for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(seq1, seq2)) and not torch.equal(seq1[0], seq1[1])


def test_module_pickles_for_loader_workers():
    x = _batch()
    aug = build_augment("derm", 64, *IMAGENET, color_constancy=True, seed=0)
    clone = pickle.loads(pickle.dumps(aug))
    assert torch.equal(aug(x, seed=4), clone(x, seed=4))
    assert choose_placement("cuda", "derm") == "device"
    assert choose_placement("cpu", "derm") == "workers"
    assert choose_placement("cpu", "none") == "device"


def test_bad_presets_ops_and_params_are_named():
    with pytest.raises(ValueError, match=r"unknown augmentation preset 'medium'.*derm"):
        build_augment("medium", 32, *UNIT)
    with pytest.raises(ValueError, match=r"unknown augmentation op 'elastik'; valid ops: crop, .*elastic"):
        build_augment("derm", 32, *UNIT, elastik={"p": 0.0})
    with pytest.raises(ValueError, match=r"'elastic': unknown parameter\(s\) sigma; valid: p, alpha, grid"):
        build_augment("derm", 32, *UNIT, elastic={"sigma": 3})
    with pytest.raises(ValueError, match=r"'noise': p must be in \[0, 1\]"):
        build_augment("derm", 32, *UNIT, noise={"p": 1.5})
    with pytest.raises(TypeError, match=r"'hflip': expected a mapping"):
        build_augment("derm", 32, *UNIT, hflip=0.5)
    with pytest.raises(ValueError, match=r"expects a batch \[B,3,H,W\]"):
        build_augment("derm", 32, *UNIT)(torch.zeros(3, 32, 32))


def test_mixup_soft_targets_and_loss():
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(0)
    mixed, soft = build_mixup(3, mixup_alpha=0.4)(images, labels)
    lam = float(soft[0, labels[0]])  # torchvision pairs each sample with its batch neighbour (roll by 1)
    partner = labels.roll(1)
    assert 0.0 <= lam <= 1.0 and torch.allclose(soft.sum(1), torch.ones(6))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
    logits = torch.randn(6, 3)
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, partner)
    assert torch.allclose(F.cross_entropy(logits, soft), expected, atol=1e-6)  # what the trainer computes
    torch.manual_seed(0)
    again, _ = build_mixup(3, mixup_alpha=0.4)(images, labels)
    assert torch.equal(again, mixed)  # seeded per step by the trainer: reproducible
    with pytest.raises(ValueError, match=">= 0"):
        build_mixup(3, mixup_alpha=-1)


def test_cutmix_box_matches_lambda_and_one_of_two_is_chosen():
    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    mixed, soft = build_mixup(3, cutmix_alpha=1.0)(images, labels)
    lam = float(soft[0, labels[0]])
    assert torch.allclose(soft.sum(1), torch.ones(8))
    pasted = (mixed != images).any(1).float().mean(dim=(1, 2))
    assert torch.allclose(pasted, torch.full_like(pasted, 1 - lam))
    both = build_mixup(3, mixup_alpha=0.2, cutmix_alpha=1.0)
    kinds = set()
    for _ in range(20):
        out, _ = both(images, labels)
        kinds.add("cutmix" if bool(((out - images).abs() < 1e-7).any()) else "mixup")
    assert kinds == {"mixup", "cutmix"}
    assert build_mixup(3) is None


def test_preview_aug_writes_a_png_grid(tmp_path, capsys):
    make_shards(tmp_path / "shards", 6, 2, size=40)
    out = tmp_path / "grid" / "preview.png"
    rc = cli.main(
        [
            "preview-aug",
            "--data",
            str(tmp_path / "shards"),
            "--preset",
            "derm",
            "--out",
            str(out),
            "--n",
            "2",
            "--rows",
            "3",
            "--image-size",
            "32",
            "--set",
            "hair.p=1",
        ]
    )
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (
            3 * (32 + 4) + 4,
            3 * (32 + 26 + 4) + 4,
        )  # 3x3 cells + titles
    assert [p.name for p in out.parent.iterdir()] == ["preview.png"]  # no temp file left
    assert cli.main(["preview-aug", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert re.search(r"lesionkit preview-aug: error: .*not found", capsys.readouterr().err)
    assert (
        cli.main(["preview-aug", "--data", str(tmp_path / "shards"), "--out", str(out), "--set", "hairs.p=1"])
        == 2
    )
    assert "unknown augmentation op 'hairs'" in capsys.readouterr().err


def test_bench_aug_reports_presets_beside_a_step_and_both_placements(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    rc = cli.main(
        [
            "bench",
            "aug",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--repeats",
            "1",
            "--presets",
            "none",
            "derm",
            "--placement-batches",
            "1",
            "--workers",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    aug, placement = (json.loads(line) for line in out.read_text().splitlines())
    assert aug["bench"] == "aug" and list(aug["cases"]) == [
        "none",
        "derm",
        "derm, stock kornia",
        "resnet18 step",
    ]
    assert all(row["ms_per_batch"] > 0 for row in aug["cases"].values())
    assert aug["cases"]["resnet18 step"]["share_of_step"] == 1.0
    assert placement["bench"] == "aug-placement" and set(placement["cases"]) == {
        "step only",
        "device",
        "workers",
    }
    assert placement["params"]["faster"] in ("device", "workers")
    assert placement["params"]["choose_placement"] == "workers"
    assert "% of a step" in capsys.readouterr().out
