"""Optimizer and LR-scheduler factories driven by TrainConfig.

Schedulers here are stepped ONCE PER EPOCH by the trainer, through `step_scheduler`, and are never
passed through `accelerator.prepare`:

- Accelerate's prepared scheduler steps the wrapped scheduler once per process on each call
  (it assumes a per-batch schedule whose length shrinks with the number of processes), so an epoch
  schedule like StepLR(7) would decay `num_processes` times too fast under DDP. Stepped plainly,
  the LR changes at the same epoch whatever the world size.
- ReduceLROnPlateau decides from a metric; every rank must pass it the same, gathered validation
  metric, otherwise ranks would end up with different learning rates.

To have a scheduler saved by `accelerator.save_state`, use `accelerator.register_for_checkpointing`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.optim import lr_scheduler

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "plateau", "cosine")


def _param_groups(params_or_model, weight_decay: float):
    """With a model and weight decay, biases and norm weights (1-D tensors) get no decay, as usual.

    All parameters are included, frozen ones too, so unfreezing later needs no new optimizer.
    """
    if not isinstance(params_or_model, nn.Module):
        return [{"params": list(params_or_model), "weight_decay": weight_decay}]
    params = list(params_or_model.parameters())
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg, params_or_model) -> torch.optim.Optimizer:
    """`cfg.optimizer` in sgd (momentum, no Nesterov) | adam | adamw, with `cfg.lr` and `cfg.weight_decay`."""
    groups = _param_groups(params_or_model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"optimizer={cfg.optimizer!r} is not one of: {', '.join(OPTIMIZERS)}")


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, mode: str = "max"):
    """An epoch-level scheduler for `cfg.scheduler`:

    - none: constant LR.
    - step: StepLR(step_size, gamma); the study's ResNet18 recipe (SGD, 1e-3, x0.1 every 7 epochs).
    - plateau: ReduceLROnPlateau on the monitor (`mode` max for scores, min for losses); the study's
      CustomNet recipe with Adam. Reduces once the metric has not improved for more than
      `plateau_patience` epochs in a row.
    - cosine: linear warmup over `warmup_epochs` (epoch e < W trains at lr*(e+1)/(W+1)), then cosine
      annealing towards 0 at epoch `epochs` (so the last epoch still trains with a small positive LR).
    """
    name = cfg.scheduler
    if name == "none":
        return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if name == "step":
        return lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if name == "plateau":
        return lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
    if name == "cosine":
        warmup = cfg.warmup_epochs
        if not 0 <= warmup < cfg.epochs:
            raise ValueError(f"warmup_epochs must be within 0..epochs-1 ({cfg.epochs - 1}), got {warmup}")
        cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs - warmup, eta_min=0.0)
        if warmup == 0:
            return cosine
        linear = lr_scheduler.LinearLR(
            optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup
        )
        return lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
    raise ValueError(f"scheduler={name!r} is not one of: {', '.join(SCHEDULERS)}")


def step_scheduler(scheduler, metric: float | None = None) -> None:
    """Advance one epoch: ReduceLROnPlateau needs the monitored (gathered) metric, the others not."""
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        if metric is None:
            raise ValueError("the plateau scheduler needs the monitored validation metric")
        scheduler.step(float(metric))
    else:
        scheduler.step()


def build_average(model: nn.Module, ema_decay: float = 0.0, swa: bool = False):
    """The averaged copy of the weights that is validated and saved, or None: an exponential moving average
    (`ema_decay`, updated every step) or SWA's equal average (`swa`, updated at chosen epoch ends). Both
    average the buffers too (BatchNorm running statistics), as timm's ModelEma keeps: averaging the
    parameters alone leaves the copy's statistics at the initial (ImageNet) values under weights that have
    moved on. SWA's paper recomputes them with a pass over the data (`update_bn`) instead; here that would
    be one more pass of the shard stream per update, and the averaged statistics need none."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if ema_decay:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    return AveragedModel(model, use_buffers=True) if swa else None


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear per-step warm-up: batch `step` (from 0) of the first `warmup_steps` trains at
    (step + 1) / warmup_steps of the scheduler's LR (Goyal et al. 2017, for large scaled LRs)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, factor: float):
    """Step at `factor` x every group's LR, then put the scheduler's LR back: the epoch scheduler reads and
    writes `group['lr']` and must never see the warm-up."""
    if factor == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] *= factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr
