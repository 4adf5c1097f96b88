"""The target logit's scalar maths for each margin kind, vectorised over float64 cosines.

Each function takes cosines c = cos(theta) already clamped to [-1, 1] (and optionally
sin(theta) computed more accurately than from c, e.g. as |w^ - c·x^| from the rows, with
which the angle is atan2(sin, c): accurate near theta = 0 and pi, where acos(c) is not) and returns
(phi, dphi/dc, dphi/dtheta): the margin's target function before beta blending, norms and
scale, and its two derivatives.  The formulas, the continuations past the monotone range
and the values at c = +-1: docs/derivatives.md, "The margin family".

dphi/dc = -(dphi/dtheta) / sin(theta) is unbounded near an end c = +-1 where dphi/dtheta
does not vanish (ArcFace at theta = 0): the target is a cone in x there.  It is finite for
every float64 c: exactly at such an end it is 0.  dphi/dtheta is bounded everywhere (at
the ends, its one-sided limit); the engine's gradients use it with the unit tangent.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from ._chebyshev import psi_and_derivative

F64 = npt.NDArray[np.float64]
Parts = tuple[F64, F64, F64]

__all__ = ["arcface_parts", "combined_parts", "cosface_parts", "lsoftmax_parts", "sin_theta"]


def sin_theta(c: F64) -> F64:
    """sin(theta) = sqrt((1 - c)(1 + c)): the factored form keeps its relative accuracy
    near c = +-1, where 1 - c*c would cancel."""
    return np.sqrt((1.0 - c) * (1.0 + c))


def _sin(c: F64, st: F64 | None) -> F64:
    return sin_theta(c) if st is None else st


def lsoftmax_parts(c: F64, m: int, st: F64 | None = None) -> Parts:
    """psi(c) = (-1)^k cos(m theta) - 2k, the kernels' own maths (lsoftmax_core._chebyshev).

    psi' = (-1)^k m U_{m-1}(c) is bounded (|psi'| <= m^2), so dpsi/dtheta = -sin(theta) psi'
    loses nothing."""
    psi, dpsi = psi_and_derivative(c, m)
    return psi, dpsi, -_sin(c, st) * dpsi


def cosface_parts(c: F64, m: float, st: F64 | None = None) -> Parts:
    """phi(c) = c - m: monotone on all of [-1, 1], no continuation."""
    return c - m, np.ones_like(c), -_sin(c, st)


def arcface_parts(c: F64, m: float, st: F64 | None = None) -> Parts:
    """phi = cos(theta + m) for theta <= pi - m, else cos(theta) - m sin(m).

    cos(theta + m) = c cos(m) - sin(theta) sin(m) needs no acos.  Past pi - m (c < -cos m) the
    rule of ArcFace's original code and pytorch-metric-learning: the plain cosine shifted
    down by m sin(m), which is below -1 there, so the target still decreases (it steps down
    by cos(m) + m sin(m) - 1 >= 0 at the threshold for m <= pi/2).
    """
    cm, sm = math.cos(m), math.sin(m)
    st = _sin(c, st)
    arc = c >= -cm  # theta <= pi - m
    phi = np.where(arc, c * cm - st * sm, c - m * sm)
    dtheta = np.where(arc, -(st * cm + c * sm), -st)  # -sin(theta + m), or -sin(theta)
    with np.errstate(divide="ignore", invalid="ignore"):
        # d/dc cos(theta + m) = cos m + sin m * c / sin(theta): unbounded as c -> 1, where
        # the target is a cone in x (theta = 0); there it is taken as 0 (docs: "Ends").
        dc = np.where(st > 0.0, cm + sm * c / np.where(st > 0.0, st, 1.0), 0.0)
    dc = np.where(arc, dc, 1.0)
    return phi, dc, dtheta


def combined_parts(c: F64, m1: float, m2: float, m3: float, st: F64 | None = None) -> Parts:
    """phi = (-1)^k cos(u) - 2k - m3 with u = m1 theta + m2 and k = floor(u/pi).

    On the monotone range u < pi (k = 0) this is InsightFace's cos(m1 theta + m2) - m3;
    beyond it, L-Softmax's extension: continuous, decreasing and C^1 at every u = j pi
    (value and derivative agree from both sides, so which k a rounded u on j pi gets does
    not matter).
    """
    theta = np.arccos(c) if st is None else np.arctan2(st, c)
    u = m1 * theta + m2
    k = np.floor(u / math.pi)
    sign = 1.0 - 2.0 * np.mod(k, 2.0)
    cos_u, sin_u = np.cos(u), np.sin(u)
    phi = sign * cos_u - 2.0 * k - m3
    dtheta = -sign * m1 * sin_u
    st = _sin(c, st)
    with np.errstate(divide="ignore", invalid="ignore"):
        dc = np.where(st > 0.0, -dtheta / np.where(st > 0.0, st, 1.0), 0.0)
    # At theta = 0 and pi, dphi/dc = sign m1 sin(u) / sin(theta) has the finite limit m1^2
    # where sin(u) vanishes there (theta = 0: m2 = 0; theta = pi: m2 = 0 and m1 an integer,
    # decided from the parameters, not from a rounded sin(u)); elsewhere the target is a
    # cone in x at that end and dphi/dc is taken as 0 (docs: "Ends").
    smooth_0 = m2 == 0.0
    smooth_pi = m2 == 0.0 and float(m1).is_integer()
    dc = np.where(c >= 1.0, m1 * m1 if smooth_0 else 0.0, dc)
    dc = np.where(c <= -1.0, m1 * m1 if smooth_pi else 0.0, dc)
    return phi, dc, dtheta
