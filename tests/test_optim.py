"""Loss weights, balanced sampler, optimiser groups and learning-rate schedules."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from stages.lib import optim
from stages.lib.params import TrainParams

UPDATES = 10  # per epoch
# these tests step schedules without optimiser steps, which torch's OneCycleLR warns about
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")


def test_class_weights_are_inverse_frequency():
    weights = optim.class_weights(np.array([0, 0, 0, 1]), 2)
    assert torch.allclose(weights, torch.tensor([4 / 6, 2.0]))


def test_pos_weight_is_negatives_over_positives():
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]], np.float32)
    assert torch.allclose(optim.pos_weights(targets), torch.tensor([1.0, 3.0, 1.0]))


def test_loss_matches_the_task():
    params = TrainParams(label_smoothing=0.1)
    single = optim.build_loss(params, np.array([0, 1, 1]), 2)
    multi = optim.build_loss(params, np.eye(3, dtype=np.float32), 3)
    assert isinstance(single, nn.CrossEntropyLoss) and single.label_smoothing == 0.1
    assert isinstance(multi, nn.BCEWithLogitsLoss) and multi.pos_weight.tolist() == [2, 2, 2]
    plain = optim.build_loss(TrainParams(class_weights="none"), np.array([0, 1, 1]), 2)
    assert plain.weight is None


def test_balanced_sampler_draws_classes_equally_and_is_seeded():
    targets = np.array([0] * 90 + [1] * 10)
    draws = []
    for _ in range(2):
        sampler = optim.build_sampler(targets, torch.Generator().manual_seed(3), 4000)
        draws.append(list(sampler))
    assert draws[0] == draws[1]
    share = (targets[draws[0]] == 1).mean()
    assert 0.45 < share < 0.55  # 10% of the images, half of the draws


def test_multilabel_sample_weight_follows_the_rarest_label():
    targets = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [0, 0]], np.float32)
    weights = optim.sample_weights(targets)
    assert weights[3] == pytest.approx(1.0)  # label 1 occurs once
    assert weights[0] == pytest.approx(0.25) and weights[4] == pytest.approx(1.0)


def tiny_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    return model


def test_param_groups_split_head_body_and_decay():
    model = tiny_model()
    groups = optim.param_groups(model, 0.05, {"3.weight", "3.bias"}, body_lr_scale=0.1)
    by_key = {(g["lr_scale"], g["weight_decay"]): len(g["params"]) for g in groups}
    # body: conv weight decayed; conv bias + BN weight/bias not; head: weight / bias
    assert by_key == {(0.1, 0.05): 1, (0.1, 0.0): 3, (1.0, 0.05): 1, (1.0, 0.0): 1}


@pytest.mark.parametrize(("nesterov", "expected"), [(True, True), (False, False)])
def test_sgd_nesterov_is_a_choice(nesterov, expected):
    params = TrainParams(optimizer="sgd", nesterov=nesterov, momentum=0.8)
    opt = optim.build_optimizer(tiny_model(), params, set())
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] is expected and opt.defaults["momentum"] == 0.8


def lrs(scheduler: str, scores: list[float] | None = None, **kw) -> list[float]:
    """Learning rate at the end of each epoch (last update)."""
    params = TrainParams(scheduler=scheduler, lr=0.1, epochs=6, **kw)
    opt = optim.build_optimizer(tiny_model(), params, {"3.weight", "3.bias"})
    sched = optim.LRSchedule(opt, params, UPDATES)
    out = []
    for epoch in range(params.epochs):
        for step in range(1, UPDATES + 1):
            sched.step_update(epoch * UPDATES + step)
        out.append(opt.param_groups[-1]["lr"])
        sched.step_epoch(scores[epoch] if scores else 0.0)
    return out


def test_step_and_exponential_decay_by_gamma():
    step = lrs("step", warmup_epochs=0, step_size=2, gamma=0.5)
    assert step == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])
    expo = lrs("exponential", warmup_epochs=0, gamma=0.5)
    assert expo == pytest.approx([0.05 * 0.5**e for e in range(6)])


def test_cosine_warms_up_then_decays():
    params = TrainParams(scheduler="cosine", lr=0.1, epochs=6, warmup_epochs=1)
    opt = optim.build_optimizer(tiny_model(), params, set())
    sched = optim.LRSchedule(opt, params, UPDATES)
    sched.step_update(1)
    first = opt.param_groups[0]["lr"]
    values = lrs("cosine", warmup_epochs=1)
    assert first < 0.02 and 0.09 < values[0] < 0.1  # warm-up ends at lr, then cosine
    assert all(a > b for a, b in itertools.pairwise(values)) and values[-1] < 1e-3


def test_plateau_decays_when_the_monitor_stalls():
    values = lrs("plateau", scores=[0.5, 0.6, 0.6, 0.6, 0.6, 0.6], warmup_epochs=0)
    values = [round(v, 6) for v in values]
    assert values == [0.1, 0.1, 0.1, 0.1, 0.1, 0.05]  # patience 2: decays after the 3rd stall


def test_onecycle_rises_over_warmup_then_anneals():
    values = lrs("onecycle", warmup_epochs=2)
    assert values[1] == pytest.approx(0.1, rel=0.02)  # peak at the end of warm-up
    assert values[0] < values[1] and values[-1] < 1e-3


def test_body_learns_at_the_unfreeze_factor():
    params = TrainParams(scheduler="none", lr=0.1, warmup_epochs=0)
    opt = optim.build_optimizer(tiny_model(), params, {"3.weight", "3.bias"}, 0.1)
    optim.LRSchedule(opt, params, UPDATES).step_update(1)
    assert {round(g["lr"], 6) for g in opt.param_groups if g["lr_scale"] == 0.1} == {0.01}
    assert {round(g["lr"], 6) for g in opt.param_groups if g["lr_scale"] == 1.0} == {0.1}


@pytest.mark.parametrize("scheduler", ["plateau", "onecycle"])
def test_schedule_state_survives_a_weights_only_round_trip(scheduler):
    params = TrainParams(scheduler=scheduler, lr=0.1, epochs=4, warmup_epochs=1)
    opt = optim.build_optimizer(tiny_model(), params, set())
    sched = optim.LRSchedule(opt, params, UPDATES)
    for step in range(1, 16):
        sched.step_update(step)
    sched.step_epoch(0.3)
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt2 = optim.build_optimizer(tiny_model(), params, set())
    other = optim.LRSchedule(opt2, params, UPDATES)
    other.load_state_dict(state)
    for step in range(16, 30):
        sched.step_update(step)
        other.step_update(step)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    assert other.state_dict()["best"] == (0.3 if scheduler == "plateau" else -np.inf)
