"""The float64 reference every backend is tested against.

Written differently from the library on purpose: theta = arccos(c), k = floor(m*theta/pi)
and psi = (-1)^k cos(m*theta) - 2k (paper eq. 6) evaluated with cos, and dpsi/dc from
dpsi/dtheta = (-1)^(k+1) m sin(m*theta) divided by dc/dtheta = -sin(theta), with its limit
m^2 where sin(theta) -> 0.  The library uses threshold tests and Chebyshev recurrences.
"""

from __future__ import annotations

import numpy as np


def _stats(x: np.ndarray, w: np.ndarray, label: np.ndarray, margin: int):
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    wy = w[label]
    a = np.sqrt(np.sum(x * x, axis=1)) if x.shape[1] else np.zeros(len(x))
    b = np.sqrt(np.sum(wy * wy, axis=1)) if x.shape[1] else np.zeros(len(x))
    ok = (a > 0) & (b > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(ok, np.sum(x * wy, axis=1) / np.where(ok, a * b, 1.0), 0.0)
    theta = np.arccos(np.clip(c, -1.0, 1.0))
    k = np.minimum(np.floor(margin * theta / np.pi), margin - 1)
    sign = np.where(k % 2 == 0, 1.0, -1.0)
    psi = sign * np.cos(margin * theta) - 2.0 * k
    s = np.sin(theta)
    with np.errstate(invalid="ignore", divide="ignore"):
        dpsi = np.where(s > 1e-7, sign * margin * np.sin(margin * theta) / np.where(s > 0, s, 1.0), margin**2)
    # Zero-norm rows have no angle: plain linear, as for margin 1 (psi = c = 0, psi' = 1).
    psi = np.where(ok, psi, 0.0)
    dpsi = np.where(ok, dpsi, 1.0)
    return x, w, wy, a, b, c, psi, dpsi, ok


def forward(x, w, label, *, margin: int, beta: float) -> np.ndarray:
    """(N, C) float64 logits."""
    x, w, wy, a, b, c, psi, _, _ = _stats(x, w, label, margin)
    logits = x @ w.T
    n = np.arange(len(x))
    logits[n, label] = (beta * np.sum(x * wy, axis=1) + a * b * psi) / (1.0 + beta)
    return logits


def backward(grad_logits, x, w, label, *, margin: int, beta: float):
    """(grad_x, grad_w) in float64, from the closed-form derivatives of the docs."""
    x, w, wy, a, b, c, psi, dpsi, ok = _stats(x, w, label, margin)
    g_all = np.asarray(grad_logits, dtype=np.float64)
    n = np.arange(len(x))
    g = g_all[n, label]
    plain = g_all.copy()
    plain[n, label] = 0.0
    grad_x = plain @ w
    grad_w = plain.T @ x
    coef = (beta + dpsi) / (1.0 + beta)
    with np.errstate(invalid="ignore", divide="ignore"):
        rx = np.where(ok, b / np.where(ok, a, 1.0), 0.0) * (psi - c * dpsi) / (1.0 + beta)
        rw = np.where(ok, a / np.where(ok, b, 1.0), 0.0) * (psi - c * dpsi) / (1.0 + beta)
    grad_x += g[:, None] * (coef[:, None] * wy + rx[:, None] * x)
    np.add.at(grad_w, label, g[:, None] * (coef[:, None] * x + rw[:, None] * wy))
    return grad_x, grad_w
