"""The float64 reference for the margin family's target function, one cosine at a time.

Written from the papers' formulas in the angle, with math.acos and math.cos, and sharing
no code with lsoftmax_core: it takes a margin's to_dict().  The library works in c (no acos
for L-Softmax and ArcFace, Chebyshev recurrences, threshold tests on c); here
theta = acos(c), the interval k comes from floor(), and the derivative in c is the chain
rule dphi/dc = dphi/dtheta / (dc/dtheta) = -dphi/dtheta / sin(theta).  At the ends
theta = 0, pi, where sin(theta) = 0, it is L'Hopital's limit -+ d2phi/dtheta2 when
dphi/dtheta vanishes there, and the documented 0 of a cone otherwise.

phi(theta) per kind (docs/derivatives.md, "The margin family"):
  lsoftmax, sphereface  (-1)^k cos(m theta) - 2k,      k = floor(m theta / pi) (<= m - 1)
  cosface               cos(theta) - m
  arcface               cos(theta + m) if theta <= pi - m, else cos(theta) - m sin(m)
  combined              (-1)^k cos(u) - 2k - m3,       u = m1 theta + m2, k = floor(u / pi)
"""

from __future__ import annotations

import math
from typing import Any

#: |dphi/dtheta| at an end below this is a vanishing derivative (no cone).
_FLAT = 1e-9


def _lsoftmax(theta: float, m: int, at: float) -> tuple[float, float, float]:
    k = min(math.floor(m * at / math.pi), m - 1)
    sg = -1.0 if k % 2 else 1.0
    return sg * math.cos(m * theta) - 2 * k, -sg * m * math.sin(m * theta), -sg * m * m * math.cos(m * theta)


def _combined(theta: float, m1: float, m2: float, m3: float, at: float) -> tuple[float, float, float]:
    u = m1 * theta + m2
    k = math.floor((m1 * at + m2) / math.pi)
    sg = -1.0 if k % 2 else 1.0
    return sg * math.cos(u) - 2 * k - m3, -sg * m1 * math.sin(u), -sg * m1 * m1 * math.cos(u)


def phi_parts(params: dict[str, Any], theta: float, at: float | None = None) -> tuple[float, float, float]:
    """(phi, dphi/dtheta, d2phi/dtheta2) at the angle theta in [0, pi], on the piece of the
    piecewise forms that holds the angle ``at`` (default theta)."""
    at = theta if at is None else at
    kind = params["kind"]
    if kind in ("lsoftmax", "sphereface"):
        return _lsoftmax(theta, params["m"], at)
    if kind == "cosface":
        return math.cos(theta) - params["m"], -math.sin(theta), -math.cos(theta)
    if kind == "arcface":
        m = params["m"]
        if at <= math.pi - m:
            return math.cos(theta + m), -math.sin(theta + m), -math.cos(theta + m)
        return math.cos(theta) - m * math.sin(m), -math.sin(theta), -math.cos(theta)
    if kind == "combined":
        return _combined(theta, params["m1"], params["m2"], params["m3"], at)
    raise ValueError(f"unknown kind {kind!r}")


def reference(params: dict[str, Any], c: float, beta: float) -> tuple[float, float, float]:
    """(target, dtarget/dc, dtarget/dtheta) for one cosine c in [-1, 1] and beta >= 0."""
    c = min(max(c, -1.0), 1.0)
    theta = math.acos(c)
    s = math.sin(theta)
    if c in (1.0, -1.0):
        # An end: the piece of the angles just inside it; derivatives one-sided.
        phi, d1, d2 = phi_parts(params, theta, at=1e-9 if c == 1.0 else math.pi - 1e-9)
        if abs(d1) > _FLAT:
            dc, d1 = 0.0, d1  # a cone in x at this end
        else:
            dc, d1 = (-d2 if c == 1.0 else d2), 0.0  # L'Hopital: -d1/sin(theta) -> -d2/cos(theta)
    else:
        phi, d1, _ = phi_parts(params, theta)
        dc = -d1 / s
    return (beta * c + phi) / (1 + beta), (beta + dc) / (1 + beta), (-beta * s + d1) / (1 + beta)
