"""One typed config for training: a dataclass, loaded from a YAML recipe and overridden by flags.

Precedence: dataclass defaults < recipe YAML (`--config NAME|PATH`) < command-line flags. Unknown
keys and bad values fail before any process group starts, listing the valid choices.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"
TTA_MODES = ("none", "flips", "d4")  # test-time views (`lesionkit.inference.tta_views`)


class ConfigError(ValueError):
    """A bad recipe or flag; the message is meant to be shown to the user as is."""


@dataclass
class TrainConfig:
    # data: folders of shards written by `lesionkit pack`
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    image_size: int = 224
    batch_size: int = 32
    workers: int = 2
    shuffle_buffer: int = 500
    balanced: bool = False  # draw classes equally often (the stream's WeightedRandomSampler)
    skip_corrupt: bool = False  # skip (and count) undecodable training samples instead of failing
    # model
    model: str = "customnet"
    pretrained: bool = False
    weights: str | None = None
    channels_last: bool = False
    compile: bool = False
    freeze_epochs: int = 0  # train only the head for this many epochs first
    freeze_blocks: int = 0  # keep the stem and this many leading feature blocks frozen all run
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "plateau"
    step_size: int = 7
    gamma: float = 0.1
    plateau_patience: int = 2
    plateau_factor: float = 0.1
    warmup_epochs: int = 0
    epochs: int = 10
    grad_accum: int = 1
    clip_grad: float = 0.0  # 0 = off
    max_steps_per_epoch: int = 0  # 0 = a full pass; >0 caps an epoch (smoke runs, benchmarks)
    # loss
    class_weights: bool = False
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # augmentation
    augment: str = "derm"
    augment_overrides: dict = field(default_factory=dict)
    augment_placement: str = "auto"  # auto | device | workers
    color_constancy: bool = False
    # validation, selection
    monitor: str = "isic2017_score"
    val_tta: str = "none"  # none | flips | d4: validate on averaged views, as `evaluate --tta` scores
    early_stop_patience: int = 0  # 0 = off
    ema_decay: float = 0.0  # 0 = off
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/inf instead of stopping
    # run
    output_dir: str = "runs/default"
    seed: int = 0
    mixed_precision: str = "auto"  # auto (from the accelerate config) | no | bf16 | fp16
    cpu: bool = False
    resume: bool = False
    wandb: bool = True
    wandb_project: str = "lesionkit"
    run_name: str = ""
    collective_timeout_s: int = 300

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "optimizer": ("sgd", "adam", "adamw"),
    "scheduler": ("none", "step", "plateau", "cosine"),
    "augment_placement": ("auto", "device", "workers"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "val_tta": TTA_MODES,
}


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A packaged recipe by name (`resnet18`) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    packaged = RECIPES_DIR / f"{name_or_path}.yaml"
    if packaged.exists():
        return packaged
    raise ConfigError(f"unknown recipe {name_or_path!r}: not a file; packaged recipes: {', '.join(list_recipes())}")


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value, typ):
    """Check/convert one value against the dataclass annotation (YAML already gives native types)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
        origin = typing.get_origin(typ)
    if origin is list or typ is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    try:
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {typ.__name__}, got {value!r}") from None


def apply_overrides(cfg: TrainConfig, overrides: dict, source: str) -> TrainConfig:
    types_ = _field_types()
    unknown = sorted(set(overrides) - set(types_))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(types_))}"
        )
    values = {k: _coerce(k, v, types_[k]) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **values)


def validate(cfg: TrainConfig) -> TrainConfig:
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not one of: {', '.join(allowed)}")
    for key in ("image_size", "batch_size", "epochs", "grad_accum"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.image_size < 32 or cfg.image_size > 2048:
        raise ConfigError(f"image_size must be within 32..2048, got {cfg.image_size}")
    if cfg.workers < 0:
        raise ConfigError(f"workers must be >= 0, got {cfg.workers}")
    return cfg


def load_recipe(name_or_path: str) -> dict:
    path = resolve_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of config keys")
    return data


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per dataclass field (underscores become dashes); booleans get `--no-flag` too."""
    parser.add_argument("--config", help=f"recipe name ({', '.join(list_recipes())}) or YAML path")
    for name, typ in _field_types().items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(typ) is list:
            parser.add_argument(flag, dest=name, nargs="+", default=None, metavar="DIR")
        elif typ is dict:
            parser.add_argument(flag, dest=name, type=yaml.safe_load, default=None, metavar="YAML")
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    if args.config:
        cfg = apply_overrides(cfg, load_recipe(args.config), source=str(resolve_recipe(args.config)))
    flags = {k: v for k, v in vars(args).items() if k in _field_types() and v is not None}
    return validate(apply_overrides(cfg, flags, source="command line"))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config(path: str | Path) -> TrainConfig:
    """Read back a config.yaml written by `save_config` (strict: unknown keys fail)."""
    return validate(apply_overrides(TrainConfig(), yaml.safe_load(Path(path).read_text()) or {}, str(path)))
