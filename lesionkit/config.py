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

from lesionkit.errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"
TTA_MODES = ("none", "flips", "d4")  # test-time views (`lesionkit.inference.tta_views`)


def opt(default, help: str, choices: tuple | None = None, metavar: str | None = None):
    """A config field with its help text (and allowed values, its flag's metavar) for `train --help`."""
    kind = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kind, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass
class TrainConfig:
    # data: folders of shards written by `lesionkit pack`
    train: list[str] = opt(list, "training shard folder(s); none: the synthetic demo shards")
    val: list[str] = opt(list, "validation shard folder(s), scored exactly once per epoch")
    image_size: int = opt(224, "square input size in pixels (pack at this size so the loader never resizes)")
    batch_size: int = opt(32, "batch per process (the global batch is this x processes x grad_accum)")
    workers: int = opt(2, "loader worker processes per training process (each streams whole shards)")
    threads: int = opt(
        0,
        "torch threads of each training process (0: auto, 1 on a GPU whose loader workers need the cores, "
        "torch's default of one per core on a CPU)",
    )
    shuffle_buffer: int = opt(500, "samples in each loader worker's shuffle buffer")
    balanced: bool = opt(False, "draw classes equally often (the stream's WeightedRandomSampler)")
    skip_corrupt: bool = opt(False, "skip (and count) undecodable training samples instead of failing")
    # model
    model: str = opt("customnet", "architecture from the model registry (lesionkit.models.list_models)")
    pretrained: bool = opt(
        False,
        "start from ImageNet weights (torchvision download, or the offline package for efficientnet_lite0)",
    )
    weights: str | None = opt(
        None, "a local state dict to start from (a mismatched classifier head is skipped)"
    )
    channels_last: bool = opt(
        False, "channels_last memory format (faster convolutions on GPUs and recent CPUs)"
    )
    compile: bool = opt(False, "torch.compile the model")
    freeze_epochs: int = opt(0, "train only the classifier head for this many epochs first")
    freeze_blocks: int = opt(
        0, "keep the stem and this many leading feature blocks frozen all run (cheap CPU fine-tuning)"
    )
    # optimisation
    optimizer: str = opt("adam", "optimizer", ("sgd", "adam", "adamw"))
    lr: float = opt(1e-3, "learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(0.0, "weight decay")
    scheduler: str = opt(
        "plateau", "LR schedule, stepped once per epoch", ("none", "step", "plateau", "cosine")
    )
    step_size: int = opt(7, "step scheduler: epochs between LR drops")
    gamma: float = opt(0.1, "step scheduler: LR factor at each drop")
    plateau_patience: int = opt(2, "plateau scheduler: epochs without improvement before the LR drops")
    plateau_factor: float = opt(0.1, "plateau scheduler: LR factor at each drop")
    warmup_epochs: int = opt(0, "cosine scheduler: linear warm-up epochs")
    epochs: int = opt(10, "epochs to train")
    grad_accum: int = opt(1, "gradient accumulation steps")
    clip_grad: float = opt(0.0, "clip the gradient norm to this value (0 = off)")
    max_steps_per_epoch: int = opt(0, "cap an epoch at this many steps (0 = a full pass; smoke runs)")
    # loss
    class_weights: bool = opt(False, "weight the loss by inverse class frequency (from the manifest)")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy")
    mixup_alpha: float = opt(0.0, "Mixup Beta(alpha, alpha) (0 = off)")
    cutmix_alpha: float = opt(0.0, "CutMix Beta(alpha, alpha) (0 = off; with Mixup one of the two per batch)")
    # augmentation
    augment: str = opt("derm", "augmentation preset (lesionkit.augment.PRESETS)")
    augment_overrides: dict = opt(dict, "per-op overrides as YAML, e.g. '{elastic: {p: 0}}'")
    augment_placement: str = opt(
        "auto",
        "where augmentation runs (auto: device on GPUs, loader workers on CPUs)",
        ("auto", "device", "workers"),
    )
    decode: str = opt(
        "workers",
        "where JPEGs are decoded: in the loader workers (CPU), or on the training device in one batched "
        "call (nvJPEG on a GPU; workers then only read bytes; augmentation runs on the device)",
        ("workers", "device"),
    )
    color_constancy: bool = opt(
        False, "Shades-of-Gray colour constancy before normalisation (also at inference)"
    )
    # validation, selection
    monitor: str = opt(
        "",
        "metric that picks the best checkpoint, drives early stopping and the plateau "
        "scheduler (default: the task's score; losses are minimised)",
    )
    val_tta: str = opt("none", "validate on averaged test-time views, as `evaluate --tta` scores", TTA_MODES)
    early_stop_patience: int = opt(0, "stop after this many epochs without a better monitor (0 = off)")
    time_limit_min: float = opt(
        0.0,
        "end training after the first epoch past which one more, at the mean epoch time so far, would pass "
        "this many minutes (0 = off); the epoch count then depends on the machine's speed",
    )
    ema_decay: float = opt(0.0, "keep an exponential moving average of the weights and validate it (0 = off)")
    swa_epochs: int = opt(
        0,
        "stochastic weight averaging: validate and save the equal average of the weights at the end of each "
        "of the last N epochs (0 = off; not with ema_decay; a time limit that ends training first skips it)",
    )
    skip_nonfinite: bool = opt(False, "skip a step whose loss is NaN/inf instead of stopping")
    # run
    output_dir: str = opt(
        "", "run folder: checkpoints, metrics.json, run records, W&B files (none: a new runs/MODEL-TIME)"
    )
    seed: int = opt(0, "seed of every random draw (weights, data order, augmentation)")
    mixed_precision: str = opt(
        "auto",
        "auto: from the accelerate config, else bf16 on GPUs that have it, fp32 on CPUs",
        ("auto", "no", "bf16", "fp16"),
    )
    cpu: bool = opt(False, "train on the CPU even when a GPU is present")
    resume: bool | str = opt(
        False,
        "continue exactly where a run stopped: bare, from OUTPUT_DIR/last; or from a run or checkpoint "
        "folder (a checkpoint that is not its run's last continues in a new run folder)",
    )
    wandb: bool = opt(True, "log to Weights & Biases (online when logged in, else offline)")
    wandb_project: str = opt("lesionkit", "W&B project")
    run_name: str = opt("", "W&B run name")
    collective_timeout_s: int = opt(300, "seconds a rank waits in a collective before the job fails")
    # issue 16: hardware profiles, LR scaling, remote shards, offline weights
    profile: str = opt(
        "auto",
        "hardware profile: the machine-dependent settings (frozen blocks, image size, batch, precision, "
        "channels_last, workers) from the recipe's `profiles` section (auto: gpu on CUDA/MPS, else cpu)",
        ("auto", "cpu", "gpu"),
    )
    lr_scaling: str = opt(
        "none",
        "scale lr with the global batch: linear (x global/lr_batch), sqrt, auto (linear for SGD, sqrt for "
        "Adam/AdamW)",
        ("none", "linear", "sqrt", "auto"),
    )
    lr_batch: int = opt(
        0, "global batch the recipe's lr is tuned for, the reference of lr_scaling (0: batch_size)"
    )
    lr_warmup_epochs: float = opt(
        0.0, "linear LR warm-up applied per optimizer step over this many epochs (0 = off)"
    )
    cache_dir: str = opt("", "keep remote shards in this folder once checked against the manifest's sha256")
    fetch_retries: int = opt(
        5, "retries of a dropped or refused connection to remote shards (backoff doubles)"
    )
    weights_cache: str = opt(
        "",
        "folder filled by `lesionkit weights fetch` (default: $LESIONKIT_WEIGHTS_CACHE); when set, "
        "pretrained weights come only from there, never downloaded",
    )
    # cross-validation (issue 14)
    fold: int = opt(
        -1,
        "train on the other folds of --train's split (`lesionkit split`) and validate on this fold of the "
        "same folders, instead of --val (-1 = off)",
    )
    # issue 15: de-duplication, metadata fusion
    exclude: str = opt(
        "",
        "file of training sample ids to leave out, one a line (`lesionkit dedup TRAIN --against VAL "
        "--exclude-out FILE`); ids match in every --train folder",
    )
    label_maps: list[str] = opt(
        list,
        "one label map per --train folder (shipped name, e.g. isic2019_to_isic2017, or a YAML path; `none` "
        "for a folder already in the validation classes): trains on several releases in one label space",
        metavar="MAP",
    )
    source_weights: list[float] = opt(
        list,
        "one sampling weight per --train folder: each folder supplies that share of the training samples "
        "(e.g. 1 0.5), so a big release does not drown a small one",
        metavar="W",
    )
    metadata: str = opt(
        "",
        "feed patient metadata beside the image, any of age,sex,site (comma-separated; read from the "
        "shards, so pack with the metadata CSV): an MLP's embedding joins the CNN's pooled features "
        "before the classifier; saved with the checkpoint, so evaluate/predict need no flag",
    )
    # issue 18: run folders that never lose work, W&B dashboards
    force: bool = opt(
        False, "start a fresh run in an OUTPUT_DIR that holds an earlier run, replacing its files"
    )
    wandb_group: str = opt("", "W&B group (runs of one experiment side by side)")
    wandb_tags: str = opt("", "W&B tags, comma-separated")
    wandb_log_model: str = opt(
        "none",
        "upload checkpoints as W&B artifacts (aliases best, last; score in the metadata): best = each new "
        "best one, all = every epoch's",
        ("none", "best", "all"),
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig) if f.metadata.get("choices")
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
    raise ConfigError(
        f"unknown recipe {name_or_path!r}: not a file; packaged recipes: {', '.join(list_recipes())}"
    )


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value, typ):
    """Check/convert one value against the dataclass annotation (YAML already gives native types)."""
    origin = typing.get_origin(typ)
    if typ == bool | str:  # a flag that may take a value (`--resume [PATH]`): True, False or a path
        return value if isinstance(value, bool) else str(value)
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
        item = (typing.get_args(typ) or (str,))[0]
        return [_coerce(name, v, item) for v in value]
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
    if not 0 <= cfg.swa_epochs <= cfg.epochs:
        raise ConfigError(f"swa_epochs must be within 0..epochs ({cfg.epochs}), got {cfg.swa_epochs}")
    if cfg.swa_epochs and cfg.ema_decay:
        raise ConfigError("swa_epochs and ema_decay both average the weights: set one of them")
    if cfg.threads < 0:
        raise ConfigError(f"threads must be >= 0 (0 = auto), got {cfg.threads}")
    if cfg.time_limit_min < 0:
        raise ConfigError(f"time_limit_min must be >= 0 (0 = no limit), got {cfg.time_limit_min:g}")
    if cfg.decode == "device" and cfg.augment_placement == "workers":
        raise ConfigError(
            "decode=device leaves no pixels in the loader workers: use augment_placement device"
        )
    if cfg.decode == "device" and cfg.skip_corrupt:
        raise ConfigError("skip_corrupt needs decode=workers (a worker replaces a sample it cannot decode)")
    if cfg.lr_batch < 0 or cfg.lr_warmup_epochs < 0 or cfg.fetch_retries < 0:
        raise ConfigError("lr_batch, lr_warmup_epochs and fetch_retries must be >= 0")
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


def add_config_flags(parser: argparse.ArgumentParser, recipe: bool = True) -> None:
    """One `--flag` per dataclass field (underscores become dashes; booleans get `--no-flag` too), with the
    field's help text, default and choices, plus `--config` and `--print-config` (unless `recipe` is False:
    `lesionkit sweep`, whose recipe is the sweep file's)."""
    if recipe:
        parser.add_argument(
            "--config", help=f"recipe name ({', '.join(list_recipes())}) or YAML path; flags override it"
        )
        parser.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved config (defaults < profile < recipe < flags) as YAML and exit",
        )
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        typ, flag = _field_types()[f.name], "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = (
            "on"
            if default is True
            else "off"
            if default is False
            else (default if default not in ("", [], {}) else "none")
        )
        kw = {"dest": f.name, "default": None, "help": f"{f.metadata['help']} (default: {shown})"}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typ == bool | str:
            parser.add_argument(flag, nargs="?", const=True, metavar="PATH", **kw)
            parser.add_argument(flag.replace("--", "--no-"), action="store_const", const=False, dest=f.name)
        elif typing.get_origin(typ) is list:
            parser.add_argument(flag, nargs="+", metavar=f.metadata.get("metavar") or "DIR", **kw)
        elif typ is dict:
            parser.add_argument(flag, type=yaml.safe_load, metavar="YAML", **kw)
        else:
            parser.add_argument(flag, metavar=None if "choices" in kw else f.name.upper(), **kw)


def flags_given(args: argparse.Namespace) -> dict:
    """The config flags given on the command line (those left at None were not)."""
    return {k: v for k, v in vars(args).items() if k in _field_types() and v is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """defaults < hardware profile < recipe < the recipe's section for the profile < flags
    (`lesionkit.profiles`); the profile follows the device this process trains on unless given."""
    from lesionkit import devices, profiles

    recipe = load_recipe(args.config) if args.config else {}
    flags = flags_given(args)
    cfg = TrainConfig()
    profile = flags.get("profile", recipe.get("profile", cfg.profile))
    if profile not in CHOICES["profile"]:
        raise ConfigError(f"profile={profile!r} is not one of: {', '.join(CHOICES['profile'])}")
    if profile == "auto":
        force_cpu = _coerce("cpu", flags.get("cpu", recipe.get("cpu", False)), bool)
        # a dry run plans for GPUs this host may lack (a login node); a run needs them usable
        device, _ = devices.select(force_cpu, strict=not getattr(args, "dry_run", False))
        profile = profiles.for_device(device)
    source = str(resolve_recipe(args.config)) if args.config else "defaults"
    for where, values in profiles.layers(recipe, profile, source):
        cfg = apply_overrides(cfg, values, source=where)
    cfg = apply_overrides(cfg, flags, source="command line")
    return validate(dataclasses.replace(cfg, profile=profile))


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def load_config(path: str | Path) -> TrainConfig:
    """Read back a config.yaml written with a checkpoint (`to_yaml`) (strict: unknown keys fail)."""
    return validate(apply_overrides(TrainConfig(), yaml.safe_load(Path(path).read_text()) or {}, str(path)))
