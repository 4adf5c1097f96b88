"""Annealing schedules for beta (lambda in the paper) as pure functions of the step.

A schedule is any object with ``beta(step)``, ``__call__(step)`` (the same value) and
``to_dict()`` (the :class:`Schedule` protocol).  It holds no state: the caller owns the
step counter and asks for ``schedule(t)`` each iteration, so resuming from a checkpoint
needs only ``t`` and ``schedule.to_dict()``.  Three are built in, each with the floor
``beta_min``: :class:`ConstantSchedule`, :class:`ExponentialSchedule` (the seed's) and
:class:`InverseSchedule` (the Caffe layer's); :func:`schedule_from_dict` rebuilds them.
Why beta is annealed and what it does to the target logit: docs/derivatives.md.

>>> import lsoftmax_core as lsm
>>> sched = lsm.ExponentialSchedule(beta0=100.0, scale=0.99, beta_min=5.0)
>>> [round(sched(t), 4) for t in (0, 1, 1000)]
[100.0, 99.0, 5.0]
>>> lsm.schedule_from_dict(sched.to_dict()) == sched
True
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, runtime_checkable

from .checks import check_nonnegative

__all__ = [
    "ConstantSchedule",
    "ExponentialSchedule",
    "InverseSchedule",
    "Schedule",
    "check_schedule",
    "schedule_from_dict",
]


@runtime_checkable
class Schedule(Protocol):
    """What drives beta: ``beta(step)`` and ``schedule(step)`` give beta >= 0 at a step >= 0,
    ``to_dict()`` a JSON-serialisable description (saved in checkpoints)."""

    def beta(self, step: int) -> float: ...

    def __call__(self, step: int) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


def check_schedule(schedule: object) -> Schedule:
    """``schedule`` if it has the :class:`Schedule` methods, else a TypeError naming it."""
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"schedule={schedule!r} must have beta(step), __call__(step) and to_dict() "
            "(lsoftmax_core.Schedule), like lsoftmax_core.ExponentialSchedule"
        )
    return schedule


def _check_step(step: object) -> int:
    if isinstance(step, bool):
        raise TypeError(f"{step=} must be an integer >= 0")
    try:
        t = operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{step=} must be an integer >= 0") from None
    if t < 0:
        raise ValueError(f"{step=} must be an integer >= 0")
    return t


class _Base:
    """The built-ins: frozen dataclasses whose fields are their to_dict() parameters."""

    kind: str

    def beta(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.beta(step)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :func:`schedule_from_dict` inverts it."""
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class ConstantSchedule(_Base):
    """beta_t = beta_value for every step."""

    beta_value: float = 0.0
    kind = "constant"

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta_value", check_nonnegative("beta_value", self.beta_value))

    def beta(self, step: int) -> float:
        _check_step(step)
        return self.beta_value


@dataclass(frozen=True)
class ExponentialSchedule(_Base):
    """The seed's schedule: beta_t = max(beta0 * scale**t, beta_min), scale in [0, 1].

    An annealing schedule only decays: a scale above 1 is refused here (it would grow
    beta without bound and overflow a float within a few thousand steps).
    """

    beta0: float = 100.0
    scale: float = 0.99
    beta_min: float = 0.0
    kind = "exponential"

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta0", check_nonnegative("beta0", self.beta0))
        scale = check_nonnegative("scale", self.scale)
        if scale > 1.0:
            raise ValueError(f"scale={self.scale!r} must lie in [0, 1] (beta decays: beta0 * scale**t)")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "beta_min", check_nonnegative("beta_min", self.beta_min))

    def beta(self, step: int) -> float:
        t = _check_step(step)
        # scale <= 1: scale**t never overflows; it underflows to 0 for large t, which
        # max() then lifts to beta_min.
        return max(self.beta0 * self.scale**t, self.beta_min)


@dataclass(frozen=True)
class InverseSchedule(_Base):
    """The Caffe layer's schedule: beta_t = max(base * (1 + gamma*t)**(-power), beta_min)
    (Caffe calls beta lambda and the floor lambda_min)."""

    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    beta_min: float = 0.0
    kind = "inverse"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", check_nonnegative("base", self.base))
        object.__setattr__(self, "gamma", check_nonnegative("gamma", self.gamma))
        object.__setattr__(self, "power", check_nonnegative("power", self.power))
        object.__setattr__(self, "beta_min", check_nonnegative("beta_min", self.beta_min))

    def beta(self, step: int) -> float:
        t = _check_step(step)
        # (1 + gamma*t)**(-power) lies in (0, 1]: no overflow for any step.
        return max(self.base * (1.0 + self.gamma * t) ** (-self.power), self.beta_min)


#: Parameter names of earlier releases, still accepted by schedule_from_dict.
_RENAMED = {"inverse": {"lambda_min": "beta_min"}}

_KINDS: dict[str, type[Any]] = {
    cls.kind: cls for cls in (ConstantSchedule, ExponentialSchedule, InverseSchedule)
}


def schedule_from_dict(data: dict[str, Any]) -> Schedule:
    """Rebuild a built-in schedule from its ``to_dict()`` (a schedule of your own is rebuilt
    by your own code: its kind is unknown here)."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"{data=} must be a dict with a 'kind' key")
    kind = data["kind"]
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown schedule {kind=}; known: {sorted(_KINDS)}")
    renamed = _RENAMED.get(kind, {})
    params = {renamed.get(k, k): v for k, v in data.items() if k != "kind"}
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"unknown parameters {unknown} for schedule {kind=}; expected {sorted(names)}")
    return cls(**params)  # type: ignore[no-any-return]
