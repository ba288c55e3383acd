"""Model registry: every model builds and runs, weights files load (or fail clearly), the offline
EfficientNet-Lite0 ImageNet weights are mapped correctly (it recognises natural photos)."""

import logging
import os
import subprocess
import sys

import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from sklearn.datasets import load_sample_images

from lesionkit.models import (
    create_model,
    freeze_backbone,
    head_parameters,
    input_stats,
    list_models,
    lite0_package_weights,
    lukemelas_to_timm,
    prepare_model,
)

ALL = [
    "alexnet",
    "customnet",
    "customnet_bn",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_lite0",
    "resnet18",
    "resnet34",
    "resnet50",
]


def test_list_models():
    assert list_models() == ALL


@pytest.mark.parametrize("name", ALL)
def test_build_forward_and_freeze(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    head = list(head_parameters(model))
    assert head[-1].shape == (3,)  # the replaced last layer's bias: one per class
    freeze_backbone(model, True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in head}
    assert len(trainable) < len(list(model.parameters()))
    freeze_backbone(model, False)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_backbone_gets_no_gradients():
    model = create_model("resnet18").train()
    freeze_backbone(model, True)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is not None] == ["fc.weight", "fc.bias"]


def test_customnet_any_size_from_64():
    model = create_model("customnet_bn").eval()
    with torch.no_grad():
        for size in (64, 128, 200):
            assert model(torch.randn(1, 3, size, size)).shape == (1, 3)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 10
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in create_model("customnet").modules()) == 0


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*customnet, customnet_bn.*resnet50"):
        create_model("resnet19")
    with pytest.raises(ValueError, match="valid models"):
        input_stats("vgg16")


def test_input_stats():
    assert input_stats("resnet18") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert input_stats("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert input_stats("customnet") == ((0.5,) * 3, (0.5,) * 3)


def test_customnet_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="customnet has no pretrained weights"):
        create_model("customnet", pretrained=True)


def test_weights_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = create_model("customnet_bn")
    model.train()
    model(torch.randn(4, 3, 64, 64))  # move BN running stats away from their init
    path = tmp_path / "model.pt"
    # a DDP-wrapped model's keys carry "module."; they load all the same
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    loaded = create_model("customnet_bn", weights=str(path))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_imagenet_backbone_skips_head(tmp_path, caplog):
    backbone = create_model("resnet18", num_classes=1000)
    assert backbone.fc.out_features == 1000
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(backbone.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="lesionkit.models"):
        model = create_model("resnet18", num_classes=3, weights=path)
    assert "skipped fc.weight, fc.bias" in caplog.text
    assert torch.equal(model.layer4[1].conv2.weight, backbone.layer4[1].conv2.weight)
    assert model.fc.weight.shape == (3, 512)


def test_bad_weights_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="notes.txt: cannot be read as PyTorch weights"):
        create_model("customnet", weights=text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt: cannot be read as PyTorch weights"):
        create_model("customnet", weights=empty)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match="list.pt: not a state dict"):
        create_model("customnet", weights=listing)
    other = tmp_path / "resnet.pt"
    torch.save(create_model("resnet18").state_dict(), other)
    with pytest.raises(ValueError, match=r"resnet.pt: weights do not fit this model: \d+ missing"):
        create_model("customnet", weights=other)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        create_model("customnet", weights=tmp_path / "missing.pt")


@pytest.mark.slow
def test_pretrained_download_without_internet_fails_clearly(tmp_path):
    """No mocks: a fresh process with an empty torch cache and a proxy that refuses connections
    (so the result is the same on machines that do have internet)."""
    env = dict(
        os.environ,
        TORCH_HOME=str(tmp_path),
        https_proxy="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
    )
    code = (
        "from lesionkit.models import create_model\n"
        "try:\n    create_model('resnet18', pretrained=True)\n"
        "except RuntimeError as e:\n    print(e)\n    raise SystemExit(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert "could not download the ImageNet weights for resnet18" in proc.stdout
    assert "No internet here?" in proc.stdout and "--weights PATH" in proc.stdout
    assert "efficientnet_lite0" in proc.stdout


def test_lite0_key_mapping_is_exact():
    import timm

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    package = torch.load(lite0_package_weights(), map_location="cpu", weights_only=True)
    mapped = lukemelas_to_timm(package, timm.create_model("tf_efficientnet_lite0", pretrained=False))
    assert set(mapped) == set(reference) and len(mapped) == len(package) == 296
    assert all(mapped[k].shape == reference[k].shape for k in reference)
    model = create_model("efficientnet_lite0", pretrained=True)  # 3 classes: ImageNet backbone, new head
    assert torch.equal(model.conv_stem.weight, package["_conv_stem.weight"])
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, package["_blocks.15._project_conv.weight"])
    assert model.classifier.weight.shape == (3, 1280)
    # the package file also works as --weights: converted, its 1000-class head skipped
    from_file = create_model("efficientnet_lite0", weights=lite0_package_weights())
    assert torch.equal(from_file.bn2.running_var, package["_bn1.running_var"])


def _top5(model, image, categories):
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)
    x = TF.center_crop(TF.resize(x, 256, antialias=True), 224).float() / 255  # 224 / 0.875 = 256
    x = TF.normalize(x, *input_stats("efficientnet_lite0"))
    with torch.no_grad():
        return [categories[i] for i in model(x[None])[0].topk(5).indices]


def test_lite0_imagenet_weights_recognise_photos():
    model = create_model("efficientnet_lite0", num_classes=1000, pretrained=True).eval()
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    photos = load_sample_images()
    china, flower = (_top5(model, img, categories) for img in photos.images)
    print("china.jpg top-5:", china, "\nflower.jpg top-5:", flower)
    assert china[0] in {"palace", "monastery", "church", "pagoda", "bell cote", "stupa"}
    assert {"palace", "monastery"} <= set(china)
    assert flower[0] in {"daisy", "bee", "pot"}


def test_prepare_model_channels_last_and_wrapped_head():
    model = create_model("customnet").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model = prepare_model(model, channels_last=True)
        assert model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)

    class Wrapper(torch.nn.Module):  # what DDP does: the model under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert [p.shape for p in head_parameters(Wrapper(model))] == [p.shape for p in model.head.parameters()]


@pytest.mark.parametrize("name,blocks", [("customnet", 5), ("resnet18", 4), ("efficientnet_lite0", 7)])
def test_freeze_leading_blocks_freezes_stem_and_first_blocks_only(name, blocks):
    from lesionkit.models import freeze_leading_blocks

    model = create_model(name)
    assert freeze_leading_blocks(model, 2) == blocks - 2
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    head = {f"{model.head_name}.{n}" for n, _ in model.get_submodule(model.head_name).named_parameters()}
    assert not frozen & head
    with pytest.raises(ValueError, match="freeze_blocks must be within"):
        freeze_leading_blocks(create_model(name), blocks)
