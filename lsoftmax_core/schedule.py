"""Annealing schedules for beta (lambda in the paper) as pure functions of the step.

The paper trains with a large beta first and lowers it, so that the network starts as a
plain softmax and the margin takes over gradually.  Two forms are in use:

* the seed (mx-lsoftmax): ``beta_t = max(beta * scale**t, beta_min)``, applied once per
  training iteration;
* the original Caffe layer (wy1iu/LargeMargin_Softmax_Loss):
  ``lambda_t = max(base * (1 + gamma*t)**(-power), lambda_min)``.

A schedule holds no state: the caller owns the step counter ``t`` and asks for
``schedule(t)`` (or ``schedule.beta(t)``) each iteration, so resuming from a checkpoint
only needs ``t`` and ``schedule.to_dict()``, and nothing changes behind the caller's back
(the seed multiplied beta inside backward; Caffe counted calls to forward).

    sched = ExponentialSchedule(beta=100.0, scale=0.99, beta_min=0.0)
    for t, batch in enumerate(loader):
        logits = lsoftmax_core.forward(x, w, y, margin=4, beta=sched(t))
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, fields
from typing import Any, Union

from .checks import check_beta, check_nonnegative

__all__ = [
    "ConstantSchedule",
    "ExponentialSchedule",
    "InverseSchedule",
    "Schedule",
    "schedule_from_dict",
]


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
    """beta_t = beta for every step."""

    beta_value: float = 0.0
    kind = "constant"

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta_value", check_beta(self.beta_value))

    def beta(self, step: int) -> float:
        _check_step(step)
        return self.beta_value


@dataclass(frozen=True)
class ExponentialSchedule(_Base):
    """The seed's schedule: beta_t = max(beta * scale**t, beta_min)."""

    beta0: float = 100.0
    scale: float = 0.99
    beta_min: float = 0.0
    kind = "exponential"

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta0", check_beta(self.beta0))
        object.__setattr__(self, "scale", check_nonnegative("scale", self.scale))
        object.__setattr__(self, "beta_min", check_beta(self.beta_min))

    def beta(self, step: int) -> float:
        t = _check_step(step)
        # scale**t underflows to 0 for large t, which max() then lifts to beta_min.
        return max(self.beta0 * self.scale**t, self.beta_min)


@dataclass(frozen=True)
class InverseSchedule(_Base):
    """Caffe's schedule: lambda_t = max(base * (1 + gamma*t)**(-power), lambda_min)."""

    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lambda_min: float = 0.0
    kind = "inverse"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", check_beta(self.base))
        object.__setattr__(self, "gamma", check_nonnegative("gamma", self.gamma))
        object.__setattr__(self, "power", check_nonnegative("power", self.power))
        object.__setattr__(self, "lambda_min", check_beta(self.lambda_min))

    def beta(self, step: int) -> float:
        t = _check_step(step)
        return max(self.base * (1.0 + self.gamma * t) ** (-self.power), self.lambda_min)


Schedule = Union[ConstantSchedule, ExponentialSchedule, InverseSchedule]

_KINDS: dict[str, type[Any]] = {
    cls.kind: cls for cls in (ConstantSchedule, ExponentialSchedule, InverseSchedule)
}


def schedule_from_dict(data: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`to_dict`'s output."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"{data=} must be a dict with a 'kind' key")
    kind = data["kind"]
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown schedule {kind=}; known: {sorted(_KINDS)}")
    params = {k: v for k, v in data.items() if k != "kind"}
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"unknown parameters {unknown} for schedule {kind=}; expected {sorted(names)}")
    return cls(**params)  # type: ignore[no-any-return]
