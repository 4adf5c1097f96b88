"""The float64 reference of the fused cross-entropy (log-softmax cross-entropy over the
reference logits of :mod:`support.reference`), and the problems its tests share."""

from __future__ import annotations

import numpy as np

from support import reference

IGNORE = -100
CHUNKINGS = [("rows", 1), ("rows", 7), ("rows", 10_000), ("classes", 1), ("classes", 7), ("classes", 10_000)]


def ref_loss(x, w, label, *, margin, beta, reduction="mean", ignore_index=IGNORE):
    """float64 loss from the acos-based reference logits."""
    valid = label != ignore_index
    lab = np.where(valid, label, 0)
    f = reference.forward(x, w, lab, margin=margin, beta=beta)
    m = f.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(f - m).sum(axis=1))
    per_row = np.where(valid, lse - f[np.arange(len(lab)), lab], 0.0)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / valid.sum() if reduction == "mean" and valid.any() else (0.0 if reduction == "mean" else total)


def ref_grad_logits(grad_loss, x, w, label, *, margin, beta, reduction="mean", ignore_index=IGNORE):
    """float64 d(loss)/d(logits) times the upstream gradient (0 on ignored rows), and the
    labels with ignored rows pointed at class 0, as the reference backward reads them."""
    valid = label != ignore_index
    lab = np.where(valid, label, 0)
    f = reference.forward(x, w, lab, margin=margin, beta=beta)
    e = np.exp(f - f.max(axis=1, keepdims=True))
    g = e / e.sum(axis=1, keepdims=True)
    g[np.arange(len(lab)), lab] -= 1.0
    weight = valid * np.asarray(grad_loss, dtype=float)  # a scalar for "mean"/"sum", (N,) for "none"
    if reduction == "mean":
        weight = weight / max(int(valid.sum()), 1)
    return g * weight[:, None], lab


def ref_grads(grad_loss, x, w, label, *, margin, beta, reduction="mean", ignore_index=IGNORE):
    g, lab = ref_grad_logits(grad_loss, x, w, label, margin=margin, beta=beta, reduction=reduction,
                             ignore_index=ignore_index)  # fmt: skip
    return reference.backward(g, x, w, lab, margin=margin, beta=beta)


def problem(rng, n, c, d, scale=1.0, ignored=0.2):
    x = rng.standard_normal((n, d)) * scale
    w = rng.standard_normal((c, d))
    label = rng.integers(0, c, n)
    label[rng.random(n) < ignored] = IGNORE
    return x, w, label


def assert_rel(actual, expected, rtol, what=""):
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    err = float(np.abs(actual - expected).max(initial=0.0)) / scale
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"
