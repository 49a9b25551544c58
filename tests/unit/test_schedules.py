"""Learning-rate schedules: warmup then cosine / polynomial (LAMB's) / power-2 polynomial (LARS's)."""

from __future__ import annotations

import math

import pytest
import torch

from plait.optim.schedules import lars_warmup, lr_schedule, warmup_cosine, warmup_poly

pytestmark = pytest.mark.timeout(30)


def _lrs(make, steps: int, lr: float = 2.0) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_poly_warms_up_linearly_then_decays_linearly_to_zero() -> None:
    lrs = _lrs(lambda opt: warmup_poly(opt, warmup=4, total=14), 16)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # after warmup: 2 * (1 - (step - 4) / 10)
    assert lrs[4:15] == pytest.approx([2.0 * (1 - k / 10) for k in range(11)])
    assert lrs[15] == pytest.approx(0.0)  # held at the end


def test_lars_warmup_decays_with_power_two_to_the_end_ratio() -> None:
    lrs = _lrs(lambda opt: lars_warmup(opt, warmup=2, total=12, end_ratio=0.1), 12)
    assert lrs[:2] == pytest.approx([1.0, 2.0])
    expected = [2.0 * (0.1 + 0.9 * (1 - k / 10) ** 2) for k in range(10)]
    assert lrs[2:] == pytest.approx(expected)
    assert lrs[7] < 2.0 * (0.1 + 0.9 * 0.5)  # below the linear decay halfway: the power-2 shape


def test_poly_power_and_no_warmup() -> None:
    lrs = _lrs(lambda opt: warmup_poly(opt, warmup=0, total=4, power=3.0), 5, lr=1.0)
    assert lrs == pytest.approx([1.0, 0.75**3, 0.5**3, 0.25**3, 0.0])


def test_lr_schedule_selects_by_name() -> None:
    def by_name(name):
        return _lrs(lambda opt: lr_schedule(opt, name=name, warmup=3, total=20, min_ratio=0.0), 20)

    assert by_name("poly") == pytest.approx(_lrs(lambda opt: warmup_poly(opt, warmup=3, total=20), 20))
    assert by_name("lars") == pytest.approx(_lrs(lambda opt: lars_warmup(opt, warmup=3, total=20), 20))
    cosine = _lrs(lambda opt: warmup_cosine(opt, warmup=3, total=20, min_ratio=0.0), 20)
    assert by_name("cosine") == pytest.approx(cosine)
    assert cosine[3 + 8] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 8 / 17)))
    with pytest.raises(ValueError, match="choose one of cosine, poly, lars"):
        lr_schedule(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), name="step", warmup=0, total=5, min_ratio=0
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup": 1, "total": 0}, "total >= 1"),
        ({"warmup": -1, "total": 5}, "warmup >= 0"),
        ({"warmup": 1, "total": 5, "power": 0.0}, "power=0.0 must be positive"),
        ({"warmup": 1, "total": 5, "end_ratio": 1.5}, r"must lie in \[0, 1\]"),
    ],
)
def test_bad_schedules_say_what_is_wrong(kwargs, match) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        warmup_poly(optimizer, **kwargs)


def test_train_config_takes_a_schedule_name() -> None:
    from plait.config import LR_SCHEDULES, TrainConfig
    from plait.optim.schedules import SCHEDULES

    assert LR_SCHEDULES == SCHEDULES
    assert TrainConfig(schedule="lars").schedule == "lars"
    with pytest.raises(ValueError, match="schedule='step': choose one of cosine, poly, lars"):
        TrainConfig(schedule="step")
