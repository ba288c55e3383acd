"""Hardware profiles: recipes describe the model and its training; a profile sets the machine-dependent part
(frozen blocks, image size, batch per device, precision, channels_last, loader workers, LR scaling).

Precedence, lowest first: the config's defaults < the generic profile below < the recipe's own keys < the
recipe's `profiles: {cpu: {...}, gpu: {...}}` section for the chosen profile < command-line flags. The
profile is `gpu` when this process trains on CUDA or MPS, else `cpu` (`--profile` overrides).

The LR rule (`lr_scaling`): a recipe's `lr` is tuned for a global batch `lr_batch`; a run with global batch
G = batch_size x processes x grad_accum trains at lr x G / lr_batch (`linear`, Goyal et al. 2017, for SGD)
or lr x sqrt(G / lr_batch) (`sqrt`, for Adam/AdamW, Malladi et al. 2022); `auto` picks by optimizer. The
gpu profile uses `auto` and warms the LR up linearly per optimizer step over the first epoch
(`lr_warmup_epochs`), which large scaled LRs need; the cpu profile keeps the recipe's LR as it is.
"""

from __future__ import annotations

import math

from lesionkit.errors import ConfigError

PROFILES = ("cpu", "gpu")
MACHINE_KEYS = frozenset(
    {
        "freeze_blocks",
        "image_size",
        "batch_size",
        "mixed_precision",
        "channels_last",
        "workers",
        "lr_scaling",
        "lr_warmup_epochs",
        "augment_placement",
        "time_limit_min",
    }
)
GENERIC = {
    "cpu": {"mixed_precision": "no"},  # CPUs without AMX run bf16 ~7x slower than fp32 (`bench step`)
    "gpu": {
        "workers": 8,
        "channels_last": True,
        "mixed_precision": "auto",  # the accelerate config's, else bf16 where the GPU has it
        "freeze_blocks": 0,
        "lr_scaling": "auto",
        "lr_warmup_epochs": 1.0,
    },
}


def for_device(device: str) -> str:
    return "cpu" if device == "cpu" else "gpu"


def layers(recipe: dict, profile: str, source: str) -> list[tuple[str, dict]]:
    """(source, values) to apply in order below the flags: the generic profile, the recipe's own keys, the
    recipe's section for `profile` (only machine-dependent keys may appear there)."""
    sections = recipe.get("profiles") or {}
    if not isinstance(sections, dict) or set(sections) - set(PROFILES):
        raise ConfigError(f"{source}: `profiles` maps {' and '.join(PROFILES)} to settings, got {sections!r}")
    for name, values in sections.items():
        if not isinstance(values, dict) or set(values) - MACHINE_KEYS:
            bad = sorted(set(values) - MACHINE_KEYS) if isinstance(values, dict) else values
            raise ConfigError(
                f"{source}: profiles.{name} may set only {', '.join(sorted(MACHINE_KEYS))}; not {bad}"
            )
    own = {k: v for k, v in recipe.items() if k != "profiles"}
    return [
        (f"profile {profile}", GENERIC[profile]),
        (source, own),
        (f"{source} (profiles.{profile})", sections.get(profile) or {}),
    ]


def lr_rule(cfg, global_batch: int) -> tuple[float, str]:
    """(factor the recipe's lr is multiplied by, the rule in words) for a global batch."""
    rule = cfg.lr_scaling
    if rule == "auto":
        rule = "linear" if cfg.optimizer == "sgd" else "sqrt"
    reference = cfg.lr_batch or cfg.batch_size
    if rule == "none" or global_batch == reference:
        return 1.0, "as the recipe's" if rule == "none" else f"{rule} scaling, global batch = lr_batch"
    ratio = global_batch / reference
    factor = ratio if rule == "linear" else math.sqrt(ratio)
    shown = f"{global_batch}/{reference}" if rule == "linear" else f"sqrt({global_batch}/{reference})"
    return factor, f"{rule} scaling ({cfg.optimizer}): recipe lr {cfg.lr:g} x {shown}"
