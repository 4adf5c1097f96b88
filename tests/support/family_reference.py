"""The dense float64 reference of the margin family's layer and loss, written from
docs/derivatives.md ("The margin family") and sharing no code with lsoftmax_core.

A margin is given as its ``to_dict()`` (``params``); the target bracket h(c) and its
derivatives come from :func:`support.margin_reference.reference` (math.acos, math.cos, the
chain rule in the angle).  The layer here is written in the cosine: every logit is a factor
times a function of one cosine, f_ij = F_i * g_ij(c_ij) with g = identity off the target
and h on it, and its gradient is the chain rule

    df/dx = dF/dx * g(c) + F * g'(c) * (w^ - c x^) / a,     df/dw = F * g'(c) * (x^ - c w^) / b

(the library writes the target's part through the angle and a unit tangent instead).  The
target's h and h' are taken at Kahan's angle between the unit rows (:func:`_bracket`), not
at acos(c), so that they keep full precision next to c = +-1.
Zero-norm rows have unit vector 0 and a normalisation whose derivative is taken as 0.
L-Softmax (``kind == "lsoftmax"``) is :mod:`support.reference` itself.

Sub-centres (``subcenters=k``): w has C*k rows; class j's cosine is the largest of rows
jk..jk+k-1 (np.argmax: the lowest index on a tie) and everything flows through that row.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from support import reference as lsoftmax_reference
from support.margin_reference import phi_parts
from support.margin_reference import reference as bracket

COSINE_KINDS = ("cosface", "arcface", "combined")


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _unit(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(norms, unit rows, 1/norm with 0 for a zero row)."""
    n = np.sqrt(np.sum(a * a, axis=1))
    inv = np.divide(1.0, n, out=np.zeros_like(n), where=n > 0)
    return n, a * inv[:, None], inv


def scale_of(params: dict[str, Any]) -> float | None:
    return float(params["s"]) if params["kind"] in COSINE_KINDS else None


def lipschitz(params: dict[str, Any]) -> float:
    """1 + a bound on |dh/dtheta| (cosine kinds), or 1 + m^2 for the multiplicative kinds
    (|h| <= 2m - 1 and |h'| <= m^2): the factor of the scales below."""
    kind = params["kind"]
    if kind in ("lsoftmax", "sphereface"):
        return 1.0 + params["m"] ** 2
    if kind == "combined":
        return 1.0 + params["m1"]
    return 2.0


def _bracket(params: dict[str, Any], xh: np.ndarray, wh: np.ndarray, beta: float) -> tuple[float, float]:
    """(h, dh/dc) for the unit rows x^ and w^ (0 for a zero row: then c = 0).

    The angle is Kahan's 2 atan2(|x^ - w^|, |x^ + w^|), accurate to rounding at every angle,
    where acos of a rounded cosine is off by sqrt(eps) at the ends: dh/dc ~ 1/sin(theta) near
    a cone would carry that into the gradient.  At an exact end, the ends' convention of
    margin_reference (0 for a cone's margin, L'Hopital's limit otherwise)."""
    if not xh.any() or not wh.any():
        return bracket(params, 0.0, beta)[:2]
    theta = 2.0 * math.atan2(float(np.linalg.norm(xh - wh)), float(np.linalg.norm(xh + wh)))
    if theta in (0.0, math.pi):
        return bracket(params, 1.0 if theta == 0.0 else -1.0, beta)[:2]
    phi, d1, _ = phi_parts(params, theta)
    return (beta * math.cos(theta) + phi) / (1 + beta), (beta - d1 / math.sin(theta)) / (1 + beta)


class _Layer:
    """Cosines, the chosen centre of each class and the per-logit functions for one problem."""

    def __init__(self, x, w, label, params, beta, subcenters):
        self.x, self.w, self.p, self.beta, self.k = _f64(x), _f64(w), params, float(beta), int(subcenters)
        self.label = np.asarray(label, dtype=np.int64)
        n = len(self.x)
        rows = self.w.shape[0]
        assert rows % self.k == 0, "w must have C * subcenters rows"
        self.C = rows // self.k
        self.a, self.xh, self.inva = _unit(self.x)
        self.b, self.wh, self.invb = _unit(self.w)
        allc = np.clip(self.xh @ self.wh.T, -1.0, 1.0).reshape(n, self.C, self.k)
        r = np.argmax(allc, axis=2)  # lowest index on a tie
        self.row = np.arange(self.C)[None, :] * self.k + r  # (N, C) the chosen weight row
        self.c = np.take_along_axis(allc, r[:, :, None], axis=2)[:, :, 0]
        ii = np.arange(n)
        self.ct = self.c[ii, self.label]
        wt = self.wh[self.row[ii, self.label]]
        h = [_bracket(params, xi, wi, self.beta) for xi, wi in zip(self.xh, wt)]
        self.h = np.array([t[0] for t in h])  # h(c_y)
        self.dh = np.array([t[1] for t in h])  # dh/dc at c_y (0 for a cone's margin at an end)
        self.g = self.c.copy()  # g_ij(c_ij)
        self.g[ii, self.label] = self.h
        self.dg = np.ones_like(self.c)
        self.dg[ii, self.label] = self.dh

    def factor(self) -> np.ndarray:
        """(N, 1) F_i: s, or |x_i| for SphereFace."""
        s = scale_of(self.p)
        return np.full((len(self.x), 1), s) if s is not None else self.a[:, None]


def logits(x, w, label, params: dict[str, Any], beta: float, subcenters: int = 1) -> np.ndarray:
    """(N, C) float64 logits of the docs' table."""
    if params["kind"] == "lsoftmax":
        assert subcenters == 1
        return lsoftmax_reference.forward(_f64(x), _f64(w), np.asarray(label), margin=params["m"], beta=beta)
    L = _Layer(x, w, label, params, beta, subcenters)
    return L.factor() * L.g


def backward(G, x, w, label, params: dict[str, Any], beta: float, subcenters: int = 1):
    """(grad_x, grad_w) of sum(G * logits(...)) in float64, by the chain rule in c."""
    if params["kind"] == "lsoftmax":
        assert subcenters == 1
        return lsoftmax_reference.backward(_f64(G), _f64(x), _f64(w), np.asarray(label), margin=params["m"], beta=beta)
    L = _Layer(x, w, label, params, beta, subcenters)
    G = _f64(G)
    gx = np.zeros_like(L.x)
    gw = np.zeros_like(L.w)
    F = L.factor()[:, 0]
    for j in range(L.C):
        rows = L.row[:, j]
        wh, invb = L.wh[rows], L.invb[rows]
        c = L.c[:, j][:, None]
        coef = G[:, j] * F * L.dg[:, j]  # G * F * g'(c)
        gx += (coef * L.inva)[:, None] * (wh - c * L.xh)
        np.add.at(gw, rows, (coef * invb)[:, None] * (L.xh - c * wh))
    if L.p["kind"] == "sphereface":
        # dF/dx * g(c) = x^ * g(c): the factor |x|'s own derivative.
        gx += (G * L.g).sum(axis=1)[:, None] * L.xh
        # a = 0: no margin, as if m = 1: df_y/dx = w^_y (the c-form above gave h'(0) w^_y / ... = 0).
        zero = L.a == 0
        gx[zero] = (G[zero][:, :, None] * L.wh[L.row[zero]]).sum(axis=1)
    return gx, gw


def loss_and_grad_logits(x, w, label, params, beta, reduction="mean", ignore_index=-100, subcenters=1, grad_loss=1.0):
    """(loss, dloss/dlogits * grad_loss, labels with ignored rows at 0)."""
    label = np.asarray(label, dtype=np.int64)
    valid = label != ignore_index
    lab = np.where(valid, label, 0)
    f = logits(x, w, lab, params, beta, subcenters)
    m = f.max(axis=1, keepdims=True)
    e = np.exp(f - m)
    lse = m[:, 0] + np.log(e.sum(axis=1))
    ii = np.arange(len(lab))
    per_row = np.where(valid, lse - f[ii, lab], 0.0)
    nv = int(valid.sum())
    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row.sum() / nv if nv else 0.0
    p = e / e.sum(axis=1, keepdims=True)
    p[ii, lab] -= 1.0
    weight = valid * np.asarray(grad_loss, dtype=np.float64)
    if reduction == "mean":
        weight = weight / max(nv, 1)
    return loss, p * weight[:, None], lab


def loss(x, w, label, params, beta, reduction="mean", ignore_index=-100, subcenters=1):
    """The cross-entropy of :func:`logits` (mean/sum/none over the rows not ignored)."""
    return loss_and_grad_logits(x, w, label, params, beta, reduction, ignore_index, subcenters)[0]


def loss_grads(x, w, label, params, beta, reduction="mean", ignore_index=-100, subcenters=1, grad_loss=1.0):
    """(grad_x, grad_w) of grad_loss * loss(...)."""
    _, G, lab = loss_and_grad_logits(x, w, label, params, beta, reduction, ignore_index, subcenters, grad_loss)
    return backward(G, x, w, lab, params, beta, subcenters)


# --- scales: errors are measured relative to what the maths bounds, not to the values ------


def logit_scale(x, w, params, subcenters: int = 1) -> np.ndarray:
    """(N, 1) or (N, C): s * L (cosine kinds), |x_i| * L (SphereFace), |x||w| * L (L-Softmax)."""
    L = lipschitz(params)
    s = scale_of(params)
    x = _f64(x)
    a = np.sqrt(np.sum(x * x, axis=1))[:, None]
    tiny = np.finfo(np.float64).tiny
    if s is not None:
        return np.full_like(a, s * L)
    if params["kind"] == "sphereface":
        return a * L + tiny
    b = np.sqrt(np.sum(_f64(w) ** 2, axis=1))[None, :]
    return a * b * L + tiny


def grad_scales(G, x, w, params, subcenters: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1) and (C*k, 1) scales of grad_x and grad_w rows: sum_j |G_ij| times each logit's
    derivative bound (a zero row is measured as if its norm were 1)."""
    G = np.abs(_f64(G))
    x, w = _f64(x), _f64(w)
    L = lipschitz(params)
    a = np.sqrt(np.sum(x * x, axis=1))
    b = np.sqrt(np.sum(w * w, axis=1))
    a1, b1 = np.where(a > 0, a, 1.0), np.where(b > 0, b, 1.0)
    gw_rows = np.repeat(G, subcenters, axis=1)  # (N, C*k): a class's |G| for each of its rows
    tiny = np.finfo(np.float64).tiny
    s = scale_of(params)
    if s is not None:
        sx = G.sum(axis=1) * s * L / a1
        sw = gw_rows.sum(axis=0) * s * L / b1
    elif params["kind"] == "sphereface":
        sx = G.sum(axis=1) * L
        sw = (gw_rows * a[:, None]).sum(axis=0) * L / b1
    else:
        sx = (G * b[None, :]).sum(axis=1) * L
        sw = (G * a[:, None]).sum(axis=0) * L
    return sx[:, None] + tiny, sw[:, None] + tiny


# --- problems -------------------------------------------------------------------------------


def delicate_angles(params: dict[str, Any]) -> list[float]:
    """Target angles where a float32 cosine cannot tell which side it is on and the maths
    changes abruptly: an end with a cone (ArcFace and the combined form with m2 > 0 at 0;
    the combined form at pi when dphi/dtheta does not vanish there) and ArcFace's step at
    pi - m."""
    kind = params["kind"]
    if kind == "arcface":
        return [0.0, math.pi - params["m"]]
    if kind == "combined":
        out = [0.0] if params["m2"] > 0 else []
        u = params["m1"] * math.pi + params["m2"]
        if abs(math.sin(u)) > 1e-9:
            out.append(math.pi)
        return out
    return []


def target_angles(x, w, label, subcenters: int = 1) -> np.ndarray:
    """The target's angle per row (the chosen centre's), in float64."""
    _, xh, _ = _unit(_f64(x))
    _, wh, _ = _unit(_f64(w))
    n = len(xh)
    c = np.clip(xh @ wh.T, -1, 1).reshape(n, -1, subcenters).max(axis=2)
    return np.arccos(c[np.arange(n), np.asarray(label)])


def delicate_rows(x, w, label, params, subcenters: int = 1, width: float = 1e-3, ends: bool = False) -> np.ndarray:
    """Rows whose target angle lies within ``width`` of a delicate angle (or of 0 and pi
    with ``ends``)."""
    t = target_angles(x, w, label, subcenters)
    out = np.zeros(len(t), dtype=bool)
    for d in [*delicate_angles(params), *((0.0, math.pi) if ends else ())]:
        out |= np.abs(t - d) < width
    return out


def problem(rng, n: int, c: int, d: int, params: dict[str, Any], *, subcenters: int = 1, width: float = 2e-2,
            x_scale: float = 1.0):
    """(x, w, label) float64 whose target angles spread over [0, pi] (every piece of every
    kind) but keep ``width`` away from the delicate angles; norms spread over 0.5..3."""
    assert d >= 2
    w = rng.standard_normal((c * subcenters, d)) * rng.uniform(0.5, 3.0, (c * subcenters, 1))
    label = rng.integers(0, c, n)
    bad = [*delicate_angles(params), 0.0, math.pi]
    x = np.empty((n, d))
    for i in range(n):
        while True:
            t = rng.uniform(0.0, math.pi)
            if all(abs(t - b) > width for b in bad):
                break
        u = w[label[i] * subcenters] / np.linalg.norm(w[label[i] * subcenters])
        v = rng.standard_normal(d)
        v -= (v @ u) * u
        v /= np.linalg.norm(v)
        x[i] = (math.cos(t) * u + math.sin(t) * v) * rng.uniform(0.5, 3.0) * x_scale
    return x, w, label
