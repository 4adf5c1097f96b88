"""The margin kinds that normalise (SphereFace, CosFace, ArcFace, CombinedMargin): their
layer, and the parts of the fused loss that differ from L-Softmax.

Every kind is the plain layer of normalised rows x' and w' (:func:`normalized`: x' = s·x^
for the cosine kinds, x for SphereFace; w' = w^) whose N target logits are rewritten, so
the GEMMs, the softmax and the chunking are L-Softmax's with margin 1.  What is the kind's
own is O((N + C)·D): the target logits from per-sample float64 statistics
(:func:`target_rows`), and in the backward the chain rule through the normalisations plus
the margin's own terms (:func:`finish_grads`).  The maths: docs/derivatives.md, "The margin
family"; this module follows its formulas, conventions at zero norms included.

Written in array operations only (GEMMs, reductions, element-wise maths), so the same code
runs on NumPy and CuPy arrays (``xp``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .margins import Margin

__all__ = [
    "Targets", "chunk_grads", "chunk_logits", "column_scale", "features", "finish_grads", "layer_add_margin",
    "layer_add_margin_grad", "layer_backward", "layer_forward", "nearest_centre", "normalized", "target_logits",
    "target_rows", "unit_rows", "unit_weight", "weight_norms",
]

#: Rows normalised at a time where a float64 copy is needed (temporaries of about 4 MiB).
_BLOCK_BYTES = 1 << 22


def xp_of(a: Any) -> Any:
    """The array library of ``a`` (NumPy, or CuPy for a CuPy array)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy


def unit_rows(rows: Any, xp: Any) -> tuple[Any, Any]:
    """(unit rows, norms) in float64: each row divided by its largest magnitude first, so
    nothing over- or underflows; a zero row has unit vector 0 and norm 0."""
    r = rows.astype(np.float64)
    if r.shape[1] == 0:
        return r, xp.zeros(r.shape[0])
    amax = xp.abs(r).max(axis=1)
    r /= xp.where(amax > 0.0, amax, 1.0)[:, None]
    rel = xp.sqrt(xp.einsum("ij,ij->i", r, r))
    r /= xp.where(rel > 0.0, rel, 1.0)[:, None]
    with np.errstate(over="ignore"):  # a norm beyond float64 is inf
        return r, amax * rel


def _blocks(c: int, d: int) -> range:
    return range(0, c, max(1, _BLOCK_BYTES // max(1, 8 * d)))


def unit_weight(w: Any, xp: Any) -> tuple[Any, Any]:
    """(w^ in w's dtype, |w_j| float64): w times 1/|w_j| in its own dtype where the norms are
    safely in range (one pass, no float64 copy), else float64 unit rows block by block."""
    norms = weight_norms(w, xp)
    inv = _safe_inverse(norms, w.dtype)
    if inv is not None:
        return w * inv.astype(w.dtype)[:, None], norms
    out = xp.empty_like(w)
    step = _blocks(w.shape[0], w.shape[1]).step
    for j0 in range(0, w.shape[0], step):
        out[j0 : j0 + step] = unit_rows(w[j0 : j0 + step], xp)[0]
    return out, norms


def _safe_inverse(norms: Any, dtype: Any) -> Any:
    """1/|w_j| (float64; 0 for a zero row) when every non-zero norm and its inverse lie well
    inside ``dtype``'s normal range, else None."""
    xp = xp_of(norms)
    fmax, ftiny = float(np.finfo(dtype).max), float(np.finfo(dtype).tiny)
    pos = norms[norms > 0.0]
    if pos.size and not (float(pos.max()) <= fmax * 1e-6 and float(pos.min()) >= ftiny * 1e6):
        return None
    with np.errstate(divide="ignore"):
        return xp.where(norms > 0.0, 1.0 / xp.where(norms > 0.0, norms, 1.0), 0.0)


#: Squared row norms inside these ranges were summed free of under- and overflow in the
#: input dtype (the common case: one einsum, no float64 copy).
_SAFE_SQ = {np.dtype(np.float16): (1e-2, 1e3), np.dtype(np.float32): (1e-30, 1e36),
            np.dtype(np.float64): (1e-280, 1e280)}  # fmt: skip


def weight_norms(w: Any, xp: Any) -> Any:
    """|w_j| in float64: the squares summed in w's dtype where every row's sum is safely in
    range, else row blocks scaled in float64 (:func:`unit_rows`)."""
    lo, hi = _SAFE_SQ.get(np.dtype(w.dtype), (np.inf, -np.inf))
    if w.shape[0] and w.shape[1]:
        sq = xp.einsum("ij,ij->i", w, w).astype(np.float64)
        if float(sq.min()) >= lo and float(sq.max()) <= hi:
            return xp.sqrt(sq)
    norms = xp.empty(w.shape[0])
    step = _blocks(w.shape[0], w.shape[1]).step
    for j0 in range(0, w.shape[0], step):
        norms[j0 : j0 + step] = unit_rows(w[j0 : j0 + step], xp)[1]
    return norms


def features(x: Any, kind: Margin) -> Any:
    """x' = s·x^ (cosine kinds; a new array) or x itself."""
    if not kind.normalizes_features:
        return x
    u, _ = unit_rows(x, xp_of(x))
    u *= kind.scale
    return u.astype(x.dtype)


def normalized(x: Any, w: Any, kind: Margin) -> tuple[Any, Any]:
    """(x', w'): :func:`features`, and w' = w^ (a new array) or w itself."""
    return features(x, kind), unit_weight(w, xp_of(w))[0] if kind.normalizes_weights else w


def column_scale(xn: Any, w: Any) -> tuple[Any, Any]:
    """(1/|w_j| in w's dtype, 0 for a zero row; or None, |w_j| float64).  None unless the
    logits x'·w_j and their scaling by 1/|w_j| stay in the dtype's normal range for every row;
    a fused loss then multiplies each chunk's columns by it instead of holding a normalised
    copy of w."""
    xp = xp_of(w)
    b = weight_norms(w, xp)
    inv = _safe_inverse(b, w.dtype)  # 1/|w_j| itself in range
    a = xp.sqrt(xp.einsum("ij,ij->i", xn, xn).astype(np.float64)) if xn.shape[0] else xp.zeros(1)
    fmax, ftiny = float(np.finfo(w.dtype).max), float(np.finfo(w.dtype).tiny)
    big = float((b.max() if b.size else 0.0) * (a.max() if a.size else 0.0))
    pos_b, pos_a = b[b > 0.0], a[a > 0.0]
    small = float(pos_b.min() * pos_a.min()) if pos_b.size and pos_a.size else 1.0
    if inv is None or not (big <= fmax * 1e-6 and small >= ftiny * 1e12):  # and the logits x'·w_j
        return None, b
    return inv.astype(w.dtype), b


def nearest_centre(x: Any, w: Any, label: Any, sub: int) -> tuple[Any, Any]:
    """For each row of x, which of its label's ``sub`` centres (rows label·sub + r of w) has
    the largest cosine, the lowest r on a tie: (the rows of w, r)."""
    xp = xp_of(x)
    cand = (label[:, None] * sub + xp.arange(sub)).ravel()
    wu, _ = unit_rows(w.take(cand, axis=0), xp)
    xu, _ = unit_rows(x, xp)
    cos = xp.einsum("ikd,id->ik", wu.reshape(x.shape[0], sub, w.shape[1]), xu)
    r = cos.argmax(axis=1)
    return label * sub + r, r


def chunk_logits(k: Any, z: Any, r0: int, k0: int) -> tuple[Any, Any]:
    """The logits a fused loss's softmax takes, from its GEMM's chunk ``z`` (rows r0.., w's
    rows k0..), for a loss ops' call state ``k`` (``colscale``, ``sub``, ``owned``, ``lab``,
    ``subidx``): columns scaled by 1/|w_j| in place (``colscale``, or None), and with ``sub``
    centres per class each class's largest one (a new (rows, classes) array) and which
    centre that is, the target class's being the statistics' own (``subidx``), so that its
    plain and margin gradients reach one row.  (z, None) without sub-centres (L-Softmax:
    z untouched)."""
    colscale, sub, owned, lab, subidx = k.colscale, k.sub, k.owned, k.lab, k.subidx
    if colscale is None and sub == 1:
        return z, None
    xp = xp_of(z)
    if colscale is not None:
        z *= colscale[k0 : k0 + z.shape[1]]
    if sub == 1:
        return z, None
    zk = z.reshape(z.shape[0], -1, sub)
    idx = zk.argmax(axis=2)  # the lowest centre on a tie
    rows = slice(r0, r0 + z.shape[0])
    c0 = k0 // sub
    lab_r = lab[rows]
    hit = xp.flatnonzero(owned[rows] & (lab_r >= c0) & (lab_r < c0 + idx.shape[1]))
    idx[hit, lab_r[hit] - c0] = subidx[rows][hit]
    r, c = xp.arange(idx.shape[0])[:, None], xp.arange(idx.shape[1])[None, :]
    return xp.ascontiguousarray(zk[r, c, idx]), idx


def chunk_grads(k: Any, z: Any, zr: Any, idx: Any, k0: int) -> None:
    """G of :func:`chunk_logits`' logits back into the GEMM's chunk ``z``: with sub-centres
    each class's entry to its chosen centre and 0 to the others; then the columns scaled by
    1/|w_j| again, so that the GEMMs with w give G·w^ and Gᵀ·x'/|w_j|."""
    colscale, sub = k.colscale, k.sub
    if colscale is None and idx is None:
        return
    xp = xp_of(z)
    if idx is not None:
        zk = z.reshape(z.shape[0], -1, sub)
        zk[...] = 0
        r, c = xp.arange(idx.shape[0])[:, None], xp.arange(idx.shape[1])[None, :]
        zk[r, c, idx] = zr
    if colscale is not None:
        z *= colscale[k0 : k0 + z.shape[1]]


class Targets(NamedTuple):
    """Per-sample float64 statistics of the target: norms a = |x|, b = |w_y|, cosine c,
    bracket h(c) and dh/dtheta (beta blended), unit rows x^ and w^_y."""

    a: Any
    b: Any
    c: Any
    h: Any
    dh: Any
    xu: Any
    wu: Any


def target_rows(x: Any, wy: Any, kind: Margin, beta: float) -> Targets:
    """The statistics of the rows of x and of their label's weight rows ``wy``.  sin(theta)
    is |w^ - c·x^|, computed from the rows: near theta = 0 and pi it keeps the relative
    accuracy that sqrt((1 - c)(1 + c)) of a rounded c loses (and with it the angle
    atan2(sin, c) and every derivative in theta)."""
    xp = xp_of(x)
    xu, a = unit_rows(x, xp)
    wu, b = unit_rows(wy, xp)
    c = xp.clip(xp.einsum("ij,ij->i", xu, wu), -1.0, 1.0)
    v = wu - c[:, None] * xu
    # A zero row has cosine 0 (theta = pi/2), whose sine the rows cannot give.
    sin = xp.where((a > 0.0) & (b > 0.0), xp.minimum(xp.sqrt(xp.einsum("ij,ij->i", v, v)), 1.0), 1.0)
    phi, _, dphi = kind._parts(c, sin)  # the kind's target function and d/dtheta (_margin_math)
    h = (beta * c + phi) / (1.0 + beta)
    dh = (-beta * sin + dphi) / (1.0 + beta)
    return Targets(a, b, c, h, dh, xu, wu)


def target_logits(t: Targets, kind: Margin) -> Any:
    """f_y = s·h(c) (cosine kinds) or |x|·h(c) (SphereFace; 0 for a zero x), float64."""
    if kind.normalizes_features:
        return kind.scale * t.h
    xp = xp_of(t.a)
    with np.errstate(over="ignore", invalid="ignore"):  # a·h beyond float64: inf, its true value
        return xp.where(t.a > 0.0, t.a * t.h, 0.0)


def _tangent(v: Any, xp: Any) -> Any:
    """v / |v| row by row, 0 for a zero row (float64)."""
    n = xp.sqrt(xp.einsum("ij,ij->i", v, v))
    return v / xp.where(n > 0.0, n, 1.0)[:, None]


def _times(coef: Any, v: Any, xp: Any) -> Any:
    """coef[:, None]·v with 0 wherever v is 0 (an infinite coefficient of a vanishing
    term is no NaN)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return xp.where(v == 0.0, 0.0, coef[:, None] * v)


def margin_terms(t: Targets, g: Any, kind: Margin) -> tuple[Any, Any]:
    """(q, r) float64: what the margin adds to grad_x[i] and to grad_w[y_i] beyond the plain
    normalised layer, for the target entries g of the upstream gradient (docs/derivatives.md,
    "Gradients through the normalisations")."""
    xp = xp_of(g)
    c = t.c[:, None]
    vx = t.wu - c * t.xu  # w^ - c·x^ = sin(theta)·t_x
    vw = t.xu - c * t.wu
    both = (t.a > 0.0) & (t.b > 0.0)
    q = -t.dh[:, None] * _tangent(vx, xp) - vx
    r = -t.dh[:, None] * _tangent(vw, xp) - vw
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if kind.normalizes_features:
            cq = xp.where(both, kind.scale * g / xp.where(both, t.a, 1.0), 0.0)
            cr = xp.where(both, kind.scale * g / xp.where(both, t.b, 1.0), 0.0)
            return _times(cq, q, xp), _times(cr, r, xp)
        # SphereFace: f_y = a·h(c); its plain part a·c = x·w^_y is the GEMMs'.
        q += (t.h - t.c)[:, None] * t.xu
        cq = xp.where(t.a > 0.0, g, 0.0)  # a = 0: no margin, df_y/dx = w^_y (the plain part)
        cr = xp.where(both, g * (t.a / xp.where(both, t.b, 1.0)), 0.0)
        return _times(cq, q, xp), _times(cr, r, xp)


def _add_rows(grad_w: Any, label: Any, rows: Any) -> None:
    """grad_w[label[i]] += rows[i] (rows in grad_w's dtype; repeated labels summed)."""
    if isinstance(grad_w, np.ndarray):
        from ._class_sums import add_per_class

        add_per_class(grad_w, label, rows)
    else:
        import cupyx

        cupyx.scatter_add(grad_w, label, rows)


def project_features(grad_x: Any, x: Any, kind: Margin) -> None:
    """grad_x holds dL/dx' (x' = s·x^): make it dL/dx = (s/a)·(P - (P·x^)·x^), in place, row
    block by row block; 0 for a zero row."""
    if not kind.normalizes_features:
        return
    xp = xp_of(x)
    step = max(1, _TERM_BYTES // max(1, 8 * x.shape[1]))
    for i0 in range(0, x.shape[0], step):
        blk = slice(i0, i0 + step)
        xu, a = unit_rows(x[blk], xp)
        p = grad_x[blk].astype(np.float64)
        p -= xp.einsum("ij,ij->i", p, xu)[:, None] * xu
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            scale = xp.where(a > 0.0, kind.scale / xp.where(a > 0.0, a, 1.0), 0.0)
        grad_x[blk] = _times(scale, p, xp)


#: Rows of grad_w projected at a time in w's dtype (a core's L2 cache of both).
_PROJECT_BYTES = 1 << 20


def project_weights(grad_w: Any, w: Any, *, divided: bool, norms: Any = None) -> None:
    """grad_w holds u = dL/dw' (w' = w^), or with ``divided`` dL/dw' / |w_j| (a fused loss
    that scaled the columns): make it dL/dw = a·(u - (u·w^)·w^) with a = 1/|w_j| or 1, i.e.
    a·u - a·(u·w_j)/|w_j|²·w_j, in place; 0 for a zero row.  ``norms``: |w_j| if known.

    Row blocks in w's dtype, the dot products summed there (as accurate as the GEMMs that made
    u); a block whose coefficients leave the dtype's range is redone in float64 with unit rows."""
    xp = xp_of(w)
    b = weight_norms(w, xp) if norms is None else norms
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = xp.where(b > 0.0, 1.0 / xp.where(b > 0.0, b, 1.0), 0.0)
    a = inv if not divided else xp.where(b > 0.0, 1.0, 0.0)
    fmax = float(np.finfo(w.dtype).max)
    step = max(1, _PROJECT_BYTES // max(1, w.shape[1] * w.itemsize))
    for j0 in range(0, w.shape[0], step):
        blk = slice(j0, j0 + step)
        u, wb = grad_w[blk], w[blk]
        with np.errstate(over="ignore", invalid="ignore"):
            coef = xp.einsum("ij,ij->i", u, wb).astype(np.float64) * (a[blk] * inv[blk] * inv[blk])
            scale = a[blk]
            if bool(xp.all(xp.abs(coef) <= fmax)) and bool(xp.all(scale <= fmax)):
                if not divided:
                    u *= scale.astype(u.dtype)[:, None]
                u -= coef.astype(u.dtype)[:, None] * wb
                continue
        # float64 with unit rows: (u - (u·w^)·w^)·a
        wu, _ = unit_rows(wb, xp)
        v = u.astype(np.float64)
        v -= xp.einsum("ij,ij->i", v, wu)[:, None] * wu
        grad_w[blk] = _times(a[blk], v, xp)


#: Rows of the margin's own terms at a time (their float64 temporaries: a few N×D blocks).
_TERM_BYTES = 1 << 20


def finish_grads(
    grad_x: Any, grad_w: Any, g: Any, x: Any, w: Any, label: Any, kind: Margin, beta: float, *, divided: bool,
    rows: Any = None, norms: Any = None,
) -> None:  # fmt: skip
    """The plain normalised layer's gradients (dL/dx', dL/dw') in place into the kind's
    dL/dx, dL/dw: the projections, then the margin's terms of the rows ``rows`` (all rows
    when None; ``g`` and ``label`` are of those rows, ``label`` their rows of w), block by
    block so that their float64 temporaries stay small."""
    xp = xp_of(x)
    project_features(grad_x, x, kind)
    if kind.normalizes_weights:
        project_weights(grad_w, w, divided=divided, norms=norms)
    n = g.shape[0]
    step = max(1, _TERM_BYTES // max(1, 8 * x.shape[1]))
    for i0 in range(0, n, step):
        blk = slice(i0, min(n, i0 + step))
        idx = xp.arange(blk.start, blk.stop) if rows is None else rows[blk]
        t = target_rows(x[idx], w.take(label[blk], axis=0), kind, beta)
        q, r = margin_terms(t, g[blk], kind)
        grad_x[idx] += q.astype(grad_x.dtype)
        _add_rows(grad_w, label[blk], r.astype(grad_w.dtype))


# ---------------------------------------------------------------- the layer


def layer_forward(x: Any, w: Any, label: Any, p: Any, out: Any = None) -> Any:
    """The kind's logits: the plain layer of x' and w with its columns scaled by 1/|w_j|
    (:func:`column_scale`; a normalised copy of w where the norms are extreme), then the N
    target logits."""
    kind = p.family
    xp = xp_of(x)
    xn = features(x, kind)
    scale, _ = column_scale(xn, w)
    if scale is None:
        logits = xp.matmul(xn, unit_weight(w, xp)[0].T, out=out)
    else:
        logits = xp.matmul(xn, w.T, out=out)
        logits *= scale
    return layer_add_margin(logits, x, w, label, p)


def layer_add_margin(logits: Any, x: Any, w: Any, label: Any, p: Any) -> Any:
    """Rewrite the target logits of the plain layer of the normalised rows, in place."""
    if p.n == 0:
        return logits
    xp = xp_of(x)
    t = target_rows(x, w.take(label, axis=0), p.family, p.beta)
    logits[xp.arange(p.n), label] = target_logits(t, p.family).astype(logits.dtype)
    return logits


def layer_backward(grad_logits: Any, x: Any, w: Any, label: Any, p: Any, out: Any = None) -> tuple[Any, Any]:
    """G·w' and Gᵀ·x', as G~ = G·diag(1/|w_j|) times w and x' (no normalised copy of w where
    the norms allow), then :func:`finish_grads`."""
    xp = xp_of(x)
    xn = features(x, p.family)
    scale, norms = column_scale(xn, w)
    gx_out, gw_out = (None, None) if out is None else out
    if scale is None:
        wn = unit_weight(w, xp)[0]
        grad_x = xp.matmul(grad_logits, wn, out=gx_out)
        grad_w = xp.matmul(grad_logits.T, xn, out=gw_out)
    else:
        gs = grad_logits * scale  # a new array: the caller's G is never written
        grad_x = xp.matmul(gs, w, out=gx_out)
        grad_w = xp.matmul(gs.T, xn, out=gw_out)
        del gs
    _layer_finish(grad_x, grad_w, grad_logits, x, w, label, p, divided=scale is not None, norms=norms)
    return grad_x, grad_w


def layer_add_margin_grad(grad_x: Any, grad_w: Any, grad_logits: Any, x: Any, w: Any, label: Any, p: Any) -> tuple[Any, Any]:
    """grad_x = G·w', grad_w = Gᵀ·x' (the plain layer of the normalised rows) into the
    kind's gradients, in place."""
    _layer_finish(grad_x, grad_w, grad_logits, x, w, label, p, divided=False, norms=None)
    return grad_x, grad_w


def _layer_finish(
    grad_x: Any, grad_w: Any, grad_logits: Any, x: Any, w: Any, label: Any, p: Any, *, divided: bool, norms: Any
) -> None:  # fmt: skip
    xp = xp_of(x)
    rows = xp.arange(p.n)
    g = grad_logits[rows, label].astype(np.float64)
    finish_grads(grad_x, grad_w, g, x, w, label, p.family, p.beta, divided=divided, norms=norms)
