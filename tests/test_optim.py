"""Optimizer/scheduler factories: the study's recipes give the LR they should at each epoch."""

import dataclasses
import itertools
import math

import pytest
import torch

from lesionkit.config import TrainConfig
from lesionkit.optim import build_optimizer, build_scheduler, step_scheduler


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(3)
    )


def _setup(mode="max", **overrides):
    cfg = dataclasses.replace(TrainConfig(), **overrides)
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(cfg, model)
    return opt, build_scheduler(cfg, opt, mode)


def _lrs(opt, sched, epochs, metrics=None):
    """LR used in each epoch, stepping once per epoch as the trainer does."""
    out = []
    for epoch in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        step_scheduler(sched, None if metrics is None else metrics[epoch])
    return out


def test_sgd_recipe():
    cfg = dataclasses.replace(TrainConfig(), optimizer="sgd", lr=1e-3, momentum=0.9)
    opt = build_optimizer(cfg, torch.nn.Linear(4, 3).parameters())
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        1e-3,
        0.9,
        False,
        0.0,
    )


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_weight_decay_spares_biases_and_norms(name, cls):
    model = _model()
    model(torch.randn(1, 3, 5, 5))  # materialise the lazy layer
    for p in model[1].parameters():
        p.requires_grad_(False)  # frozen parameters stay in the optimizer for later unfreezing
    opt = build_optimizer(
        dataclasses.replace(TrainConfig(), optimizer=name, lr=3e-4, weight_decay=0.05), model
    )
    assert isinstance(opt, cls)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4} and {p.ndim for p in no_decay["params"]} == {1}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters())) == 6


def test_step_lr_study_recipe():
    opt, sched = _setup(optimizer="sgd", lr=1e-3, scheduler="step", step_size=7, gamma=0.1)
    lrs = _lrs(opt, sched, 15)
    assert lrs[:7] == [1e-3] * 7
    assert lrs[7:14] == pytest.approx([1e-4] * 7)
    assert lrs[14] == pytest.approx(1e-5)


def test_plateau_reduces_after_patience_epochs_without_improvement():
    opt, sched = _setup(
        optimizer="adam", lr=1e-3, scheduler="plateau", plateau_patience=2, plateau_factor=0.1
    )
    # best at epoch 1; epochs 2, 3 are tolerated (patience 2); the 3rd flat epoch (4) reduces the LR
    lrs = _lrs(opt, sched, 7, metrics=[0.5, 0.6, 0.6, 0.59, 0.6, 0.7, 0.7])
    assert lrs == pytest.approx([1e-3] * 5 + [1e-4] * 2)


def test_plateau_minimises_losses_and_needs_a_metric():
    opt, sched = _setup(scheduler="plateau", plateau_patience=0, mode="min")
    assert _lrs(opt, sched, 3, metrics=[1.0, 0.5, 0.7]) == pytest.approx([1e-3, 1e-3, 1e-3])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # the rise to 0.7 reduced it
    with pytest.raises(ValueError, match="needs the monitored validation metric"):
        step_scheduler(sched)


def test_cosine_with_warmup():
    opt, sched = _setup(optimizer="adamw", lr=1e-3, scheduler="cosine", warmup_epochs=2, epochs=10)
    lrs = _lrs(opt, sched, 10)
    expected = [1e-3 / 3, 2e-3 / 3] + [0.5e-3 * (1 + math.cos(math.pi * e / 8)) for e in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert lrs[2] == pytest.approx(1e-3) and lrs[-1] > 0
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))


def test_cosine_without_warmup_and_constant():
    opt, sched = _setup(scheduler="cosine", warmup_epochs=0, epochs=4)
    assert _lrs(opt, sched, 4) == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    opt, sched = _setup(scheduler="none", lr=0.01)
    assert _lrs(opt, sched, 3) == [0.01] * 3


def test_scheduler_state_resumes_exactly():
    """What a resume does: restore optimizer and scheduler state, continue stepping."""
    opt, sched = _setup(scheduler="cosine", warmup_epochs=3, epochs=12)
    full = _lrs(opt, sched, 12)
    opt, sched = _setup(scheduler="cosine", warmup_epochs=3, epochs=12)
    _lrs(opt, sched, 5)
    opt2, sched2 = _setup(scheduler="cosine", warmup_epochs=3, epochs=12)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert _lrs(opt2, sched2, 7) == pytest.approx(full[5:], rel=1e-9)


def test_bad_choices():
    with pytest.raises(ValueError, match="optimizer='rmsprop' is not one of: sgd, adam, adamw"):
        _setup(optimizer="rmsprop")
    with pytest.raises(ValueError, match="scheduler='poly' is not one of: none, step, plateau, cosine"):
        _setup(scheduler="poly")
    with pytest.raises(ValueError, match="warmup_epochs must be within 0..epochs-1"):
        _setup(scheduler="cosine", warmup_epochs=5, epochs=5)


def test_ema_follows_batchnorm_statistics_not_only_weights():
    """The EMA copy is what is validated and saved: its BatchNorm running statistics must move with the
    trained model's (they stayed at their initial values when only parameters were averaged)."""
    from lesionkit.optim import build_average

    model = _model().eval()
    model(torch.zeros(2, 3, 5, 5))  # materialise the lazy layer (eval: the statistics stay at 0 and 1)
    ema = build_average(model, ema_decay=0.75)
    ema.update_parameters(model)  # the first update copies
    for _ in range(2):
        model[1].running_mean.fill_(1.0)  # the statistics a training epoch would have moved
        model[1].running_var.fill_(3.0)
        ema.update_parameters(model)
    # two EMA steps from (0, 1) towards (1, 3): 1 - 0.75^2 of the way
    assert torch.allclose(ema.module[1].running_mean, torch.full((4,), 1 - 0.75**2))
    assert torch.allclose(ema.module[1].running_var, torch.full((4,), 1 + 2 * (1 - 0.75**2)))
    assert build_average(model, ema_decay=0.0) is None


def test_swa_is_the_equal_average_of_weights_and_batchnorm_statistics():
    from lesionkit.optim import build_average

    model = _model().eval()
    model(torch.zeros(2, 3, 5, 5))
    swa = build_average(model, swa=True)
    for mean in (1.0, 2.0, 6.0):  # three epoch ends
        model[1].running_mean.fill_(mean)
        with torch.no_grad():
            model[1].weight.fill_(mean * 10)
        swa.update_parameters(model)
    assert int(swa.n_averaged) == 3
    assert torch.allclose(swa.module[1].running_mean, torch.full((4,), 3.0))  # (1 + 2 + 6) / 3
    assert torch.allclose(swa.module[1].weight, torch.full((4,), 30.0))
