"""The margin family: the angular margins a layer or loss can put on the target logit.

Five kinds, each an immutable, hashable value (usable as a JAX static argument) that
compares by value and round-trips through ``to_dict()`` / :func:`margin_from_dict`:

========================================  ==========================  ===================
kind                                      target logit f_y            normalises
========================================  ==========================  ===================
``LSoftmax(m=4)``                         |x| |w| psi(c)              nothing
``SphereFace(m=4)``                       |x| psi(c)                  weight rows
``CosFace(m=0.35, s=64.0)``               s (c - m)                   features and weights
``ArcFace(m=0.5, s=64.0)``                s cos(theta + m)            features and weights
``CombinedMargin(m1, m2, m3, s)``         s (cos(m1 theta + m2) - m3) features and weights
========================================  ==========================  ===================

with c = cos(theta) the cosine between the features and the label's weight row, and every
other logit the plain one (x.w_j, |x| c_j, or s c_j).  ``target(c, beta)`` is the bracket
that multiplies the norms or s, blended with the plain cosine by beta >= 0 (annealing):
(beta c + phi(c)) / (1 + beta); ``dtarget_dc`` and ``dtarget_dtheta`` are its exact
derivatives.  An int margin means ``LSoftmax(m=int)``: :func:`margin_of` resolves both.

The formulas, their continuations past the monotone range and the conventions at
c = +-1 and at zero norms: docs/derivatives.md, "The margin family".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from . import _margin_math as mm
from ._chebyshev import MAX_MARGIN
from .checks import check_beta, check_integer, check_margin

__all__ = [
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "LSoftmax",
    "Margin",
    "SphereFace",
    "margin_from_dict",
    "margin_of",
]

F64 = npt.NDArray[np.float64]


def _real(owner: str, name: str, value: object, low: float, high: float, *, open_low: bool, open_high: bool) -> float:
    """``value`` as a finite Python float in the interval, or an error naming ``name``."""
    lo, hi = "(" if open_low else "[", ")" if open_high else "]"
    where = f"{owner}: {name}={value!r} must be a finite real number in {lo}{low:.6g}, {high:.6g}{hi}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}, not {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < low or v > high or (open_low and v == low) or (open_high and v == high):
        raise ValueError(where)
    return v


def _cosines(c: object) -> F64:
    """c as a new float64 array clamped to [-1, 1] (the caller's array is never written)."""
    a = np.asarray(c, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"c={c!r} must hold finite cosines")
    return np.clip(a, -1.0, 1.0)


class Margin:
    """What every margin kind offers (each kind is a frozen dataclass of its parameters).

    ``kind`` names it in ``to_dict()``; ``normalizes_features`` / ``normalizes_weights``
    say which rows the layer divides by their norms; ``scale`` is s for the kinds whose
    logits are s times a cosine and None where the norms scale them.
    """

    kind: ClassVar[str]
    normalizes_features: ClassVar[bool]
    normalizes_weights: ClassVar[bool]

    @property
    def scale(self) -> float | None:
        return None

    def _parts(self, c: F64, st: F64 | None = None) -> mm.Parts:
        """(phi, dphi/dc, dphi/dtheta) at cosines c (clamped), with sin(theta) ``st`` if known."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :func:`margin_from_dict` inverts it."""
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]

    def target(self, c: object, beta: object = 0.0) -> F64:
        """(beta c + phi(c)) / (1 + beta) for cosines c (clamped to [-1, 1]), float64."""
        b = check_beta(beta)
        x = _cosines(c)
        return (b * x + self._parts(x)[0]) / (1.0 + b)

    def dtarget_dc(self, c: object, beta: object = 0.0) -> F64:
        """d target / dc = (beta + phi'(c)) / (1 + beta); finite for every c (at an end
        c = +-1 where the target is a cone in x, phi' there is taken as 0)."""
        b = check_beta(beta)
        return (b + self._parts(_cosines(c))[1]) / (1.0 + b)

    def dtarget_dtheta(self, c: object, beta: object = 0.0) -> F64:
        """d target / dtheta = (-beta sin(theta) + dphi/dtheta) / (1 + beta) at theta = acos(c):
        bounded everywhere, the one-sided limit at theta = 0 and pi."""
        b = check_beta(beta)
        x = _cosines(c)
        return (-b * mm.sin_theta(x) + self._parts(x)[2]) / (1.0 + b)


@dataclass(frozen=True)
class _Multiplicative(Margin):
    """The integer margin m of psi(theta) = (-1)^k cos(m theta) - 2k, in [1, MAX_MARGIN]."""

    m: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "m", check_integer(f"{type(self).__name__}: m", self.m, 1, MAX_MARGIN))

    def _parts(self, c: F64, st: F64 | None = None) -> mm.Parts:
        return mm.lsoftmax_parts(c, self.m, st)


@dataclass(frozen=True)
class LSoftmax(_Multiplicative):
    """L-Softmax (Liu et al. 2016): ``f_y = |x| |w_y| psi(c)``, the others ``x.w_j``.
    ``LSoftmax(m=4)`` is what ``margin=4`` has always meant."""

    kind: ClassVar[str] = "lsoftmax"
    normalizes_features: ClassVar[bool] = False
    normalizes_weights: ClassVar[bool] = False


@dataclass(frozen=True)
class SphereFace(_Multiplicative):
    """SphereFace / A-Softmax (Liu et al. 2017): L-Softmax on unit weight rows,
    ``f_y = |x| psi(c)``, the others ``|x| c_j``."""

    kind: ClassVar[str] = "sphereface"
    normalizes_features: ClassVar[bool] = False
    normalizes_weights: ClassVar[bool] = True


class _Cosine(Margin):
    """The kinds whose logits are s times cosines of unit features and unit weight rows."""

    s: float
    normalizes_features: ClassVar[bool] = True
    normalizes_weights: ClassVar[bool] = True

    @property
    def scale(self) -> float:
        return self.s

    def _check(self, name: str, low: float, high: float, *, open_low: bool = False, open_high: bool = True) -> None:
        """Replace the parameter ``name`` by its checked float (dataclasses are frozen)."""
        value = _real(type(self).__name__, name, getattr(self, name), low, high, open_low=open_low, open_high=open_high)
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class CosFace(_Cosine):
    """CosFace / AM-Softmax (Wang et al. 2018): f_y = s (c - m), the others s c_j.

    m in (0, 2): at m >= 2 the target s(c - m) <= -s lies below every other logit for every
    angle, so no margin could ever be met.  s > 0.
    """

    m: float = 0.35
    s: float = 64.0
    kind: ClassVar[str] = "cosface"

    def __post_init__(self) -> None:
        self._check("m", 0.0, 2.0, open_low=True)
        self._check("s", 0.0, math.inf, open_low=True)

    def _parts(self, c: F64, st: F64 | None = None) -> mm.Parts:
        return mm.cosface_parts(c, self.m, st)


@dataclass(frozen=True)
class ArcFace(_Cosine):
    """ArcFace (Deng et al. 2019): f_y = s cos(theta + m), m in radians, the others s c_j.

    Past theta = pi - m the target continues as s (cos(theta) - m sin(m)), the rule of
    ArcFace's original code and pytorch-metric-learning.  m in (0, pi/2]: beyond pi/2 that
    rule steps the target up at pi - m (for m > 2.33) and the margin already maps
    orthogonal features onto opposite ones.  s > 0.
    """

    m: float = 0.5
    s: float = 64.0
    kind: ClassVar[str] = "arcface"

    def __post_init__(self) -> None:
        self._check("m", 0.0, math.pi / 2, open_low=True, open_high=False)
        self._check("s", 0.0, math.inf, open_low=True)

    def _parts(self, c: F64, st: F64 | None = None) -> mm.Parts:
        return mm.arcface_parts(c, self.m, st)


@dataclass(frozen=True)
class CombinedMargin(_Cosine):
    """InsightFace's combined margin: f_y = s (cos(m1 theta + m2) - m3), the others s c_j.

    m1 in [1, MAX_MARGIN] (real), m2 in [0, pi) radians, m3 in [0, 2), s > 0.  Past
    m1 theta + m2 = pi the target continues as L-Softmax does, (-1)^k cos(m1 theta + m2)
    - 2k - m3: continuous and decreasing.  (1, 0, 0) is the plain normalised softmax.
    """

    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    s: float = 64.0
    kind: ClassVar[str] = "combined"

    def __post_init__(self) -> None:
        self._check("m1", 1.0, MAX_MARGIN, open_high=False)
        self._check("m2", 0.0, math.pi)
        self._check("m3", 0.0, 2.0)
        self._check("s", 0.0, math.inf, open_low=True)

    def _parts(self, c: F64, st: F64 | None = None) -> mm.Parts:
        return mm.combined_parts(c, self.m1, self.m2, self.m3, st)


_KINDS: dict[str, type[Margin]] = {cls.kind: cls for cls in (LSoftmax, SphereFace, CosFace, ArcFace, CombinedMargin)}


def margin_of(margin: object) -> Margin:
    """The margin object a ``margin=`` argument means: an int m is ``LSoftmax(m=m)`` (checked
    as ``margin``), a margin object is itself; anything else is a TypeError naming ``margin``."""
    if isinstance(margin, tuple(_KINDS.values())):  # not a bare Margin: the engine knows these five
        return margin  # type: ignore[return-value]
    if isinstance(margin, numbers.Integral) and not isinstance(margin, (bool, np.bool_)):
        return LSoftmax(m=check_margin(margin))
    raise TypeError(
        f"margin={margin!r} must be an int in [1, {MAX_MARGIN}] (L-Softmax) or a margin object "
        f"({', '.join(cls.__name__ for cls in _KINDS.values())}), not {type(margin).__name__}"
    )


def margin_from_dict(data: object) -> Margin:
    """Rebuild a margin from its ``to_dict()``: a mapping with a known ``kind`` and only that
    kind's parameters (a missing one takes its default); every value is checked again."""
    if not isinstance(data, Mapping):
        raise TypeError(f"data={data!r} must be a dict from a margin's to_dict(), not {type(data).__name__}")
    if "kind" not in data:
        raise ValueError(f"data={dict(data)!r} has no 'kind'; known kinds: {sorted(_KINDS)}")
    kind = data["kind"]
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown margin kind={kind!r}; known kinds: {sorted(_KINDS)}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in data if k != "kind" and k not in names)
    if unknown:
        raise ValueError(f"unknown parameters {unknown} for margin kind={kind!r}; expected {sorted(names)}")
    return cls(**{k: v for k, v in data.items() if k != "kind"})
