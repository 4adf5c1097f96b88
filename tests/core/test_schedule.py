"""beta schedules: pure functions of the step, known values, dict round trips."""

from __future__ import annotations

import json

import pytest

import lsoftmax_core as lsm
from lsoftmax_core import (
    ConstantSchedule,
    ExponentialSchedule,
    InverseSchedule,
    Schedule,
    schedule_from_dict,
)
from lsoftmax_core.schedule import check_schedule


def test_exponential_known_values() -> None:
    s = ExponentialSchedule(beta0=100.0, scale=0.99, beta_min=5.0)
    assert s(0) == 100.0
    assert s(1) == pytest.approx(99.0)
    assert s(100) == pytest.approx(100.0 * 0.99**100)  # 36.60...
    assert s(100) == pytest.approx(36.6032341, rel=1e-7)
    assert s(1000) == 5.0  # clamped at beta_min
    assert s(10**9) == 5.0  # scale**t underflows to 0: still beta_min, no error


def test_inverse_known_values() -> None:
    # Caffe: lambda = base * (1 + gamma * iter)^(-power), then max with lambda_min (our beta_min).
    s = InverseSchedule(base=1000.0, gamma=0.12, power=1.0, beta_min=3.0)
    assert s(0) == 1000.0
    assert s(100) == pytest.approx(1000.0 / 13.0)
    assert s(10**6) == 3.0
    s2 = InverseSchedule(base=1000.0, gamma=0.5, power=2.0, beta_min=0.0)
    assert s2(2) == pytest.approx(250.0)


def test_schedules_are_pure_functions_of_the_step() -> None:
    s = ExponentialSchedule(beta0=10.0, scale=0.5, beta_min=0.0)
    assert [s(3), s(3), s(0)] == [1.25, 1.25, 10.0]
    assert ConstantSchedule(2.5)(123) == 2.5


@pytest.mark.parametrize(
    "s",
    [ConstantSchedule(1.5), ExponentialSchedule(100.0, 0.99, 0.0), InverseSchedule(1000.0, 0.12, 1.0, 5.0)],
)
def test_dict_round_trip_through_json(s) -> None:
    d = json.loads(json.dumps(s.to_dict()))
    back = schedule_from_dict(d)
    assert back == s and type(back) is type(s)
    assert [back(t) for t in (0, 7, 500)] == [s(t) for t in (0, 7, 500)]


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: ExponentialSchedule(beta0=-1.0), r"beta0=-1.0"),
        (lambda: ExponentialSchedule(beta0=1.0, scale=1.5), r"scale=1.5 must lie in \[0, 1\]"),
        (lambda: InverseSchedule(beta_min=float("inf")), r"beta_min=inf"),
        (lambda: ConstantSchedule(-2.0), r"beta_value=-2.0"),
        (lambda: ExponentialSchedule(scale=float("nan")), r"scale=nan"),
        (lambda: InverseSchedule(power=-2.0), r"power=-2.0"),
        (lambda: schedule_from_dict({"kind": "cosine"}), r"unknown schedule kind='cosine'"),
        (lambda: schedule_from_dict({"kind": "constant", "beta": 1}), r"unknown parameters \['beta'\]"),
        (lambda: schedule_from_dict({"beta_value": 1}), r"must be a dict with a 'kind' key"),
        (lambda: ExponentialSchedule()(-1), r"step=-1 must be an integer >= 0"),
    ],
)
def test_bad_schedules(make, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()


def test_step_type_errors() -> None:
    with pytest.raises(TypeError, match=r"step=1.5"):
        ExponentialSchedule()(1.5)
    with pytest.raises(TypeError, match=r"step=True"):
        ExponentialSchedule()(True)


def test_every_built_in_names_its_floor_beta_min() -> None:
    for cls in (ExponentialSchedule, InverseSchedule):
        assert cls(beta_min=4.0)(10**6) == 4.0


def test_an_inverse_schedule_saved_with_the_old_floor_name_still_loads() -> None:
    old = {"kind": "inverse", "base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 3.0}
    assert schedule_from_dict(old) == InverseSchedule(1000.0, 0.12, 1.0, beta_min=3.0)


def test_scale_one_and_zero_are_the_edges_of_decay() -> None:
    assert ExponentialSchedule(beta0=7.0, scale=1.0)(10**9) == 7.0
    assert ExponentialSchedule(beta0=7.0, scale=0.0, beta_min=1.0)(1) == 1.0
    assert ExponentialSchedule(beta0=7.0, scale=0.0)(0) == 7.0


class Cosine:
    """A schedule of a user's own: the protocol, no base class."""

    def __init__(self, beta0: float, steps: int) -> None:
        self.beta0, self.steps = beta0, steps

    def beta(self, step: int) -> float:
        import math

        return 0.5 * self.beta0 * (1.0 + math.cos(math.pi * min(step, self.steps) / self.steps))

    __call__ = beta

    def to_dict(self) -> dict[str, object]:
        return {"kind": "cosine", "beta0": self.beta0, "steps": self.steps}


def test_a_users_own_schedule_meets_the_protocol() -> None:
    mine = Cosine(10.0, 100)
    assert isinstance(mine, Schedule)
    assert check_schedule(mine) is mine
    assert lsm.forward(*_tiny(), margin=2, beta=mine(50)).shape == (2, 3)
    for builtin in (ConstantSchedule(1.0), ExponentialSchedule(), InverseSchedule()):
        assert isinstance(builtin, Schedule)


@pytest.mark.parametrize("bad", [0.5, lambda t: 1.0, "exponential", None])
def test_an_object_without_the_protocol_is_refused_naming_schedule(bad) -> None:
    with pytest.raises(TypeError, match=r"schedule=.* must have beta\(step\), __call__\(step\) and to_dict\(\)"):
        check_schedule(bad)


def _tiny():
    import numpy as np

    return np.ones((2, 2)), np.eye(3, 2), np.array([0, 2])
