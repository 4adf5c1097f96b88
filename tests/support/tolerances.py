"""The one per-dtype tolerance table, and the comparison every backend's tests use.

Errors are measured against a scale that follows the maths rather than the values
(which can cancel): a logit x_i·w_j is compared relative to |x_i||w_j|·(1 + m^2), since
|dpsi/dc| <= m^2; a gradient row relative to sum_j |G_ij|·|w_j|·(1 + m^2) (and the
transpose for grad_w).  ``tol`` is then a multiple of the dtype's rounding error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tol:
    forward: float
    grad: float


TOLERANCES: dict[str, Tol] = {
    "float64": Tol(forward=1e-12, grad=1e-11),
    "float32": Tol(forward=2e-6, grad=1e-5),
    "float16": Tol(forward=4e-3, grad=1e-2),
    "bfloat16": Tol(forward=3e-2, grad=6e-2),
}

#: Finite differences (central, float64) against analytic gradients, relative to the scale.
FD_TOL = 1e-6


def _np(a) -> np.ndarray:
    if hasattr(a, "get"):  # cupy
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def _norms(a: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(a * a, axis=1))


def logit_scale(x, w, margin: int) -> np.ndarray:
    return np.outer(_norms(_np(x)), _norms(_np(w))) * (1 + margin**2) + np.finfo(np.float64).tiny


def grad_scales(grad_logits, x, w, margin: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.abs(_np(grad_logits))
    k = 1 + margin**2
    sx = (g @ _norms(_np(w)))[:, None] * k + np.finfo(np.float64).tiny
    sw = (g.T @ _norms(_np(x)))[:, None] * k + np.finfo(np.float64).tiny
    return sx, sw


def _tiny(dtype: str) -> float:
    if dtype == "bfloat16":
        return 1.2e-38
    return float(np.finfo(np.dtype(dtype)).tiny)


def assert_close(actual, expected, scale, tol: float, what: str = "", *, dtype: str = "float64") -> None:
    """max |actual - expected| / scale <= tol, ignoring differences in the subnormal range
    of ``dtype`` (BLAS may flush subnormals to zero; they carry no precision anyway)."""
    a, e = _np(actual), _np(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite values in result"
    err = np.maximum(np.abs(a - e) - 4 * _tiny(dtype), 0.0) / scale
    worst = float(err.max(initial=0.0))
    assert worst <= tol, f"{what}: scaled error {worst:.3g} > {tol:.3g} at {np.unravel_index(err.argmax(), err.shape)}"


def check_forward(actual, x, w, label, *, margin: int, beta: float, dtype: str) -> None:
    from support.reference import forward

    expected = forward(_np(x), _np(w), _np(label).astype(np.int64), margin=margin, beta=beta)
    assert_close(actual, expected, logit_scale(x, w, margin), TOLERANCES[dtype].forward, f"forward {dtype} m={margin}", dtype=dtype)


def check_backward(grads, grad_logits, x, w, label, *, margin: int, beta: float, dtype: str) -> None:
    from support.reference import backward

    lab = _np(label).astype(np.int64)
    ex, ew = backward(_np(grad_logits), _np(x), _np(w), lab, margin=margin, beta=beta)
    sx, sw = grad_scales(grad_logits, x, w, margin)
    tol = TOLERANCES[dtype].grad
    assert_close(grads[0], ex, sx, tol, f"grad_x {dtype} m={margin}", dtype=dtype)
    assert_close(grads[1], ew, sw, tol, f"grad_w {dtype} m={margin}", dtype=dtype)

#: The margin family (tests/core/test_family_*.py): target angles kept this far (radians) from
#: where the maths changes abruptly (a cone at c = +-1, ArcFace's step at pi - m), where a
#: float32 cosine's rounding (about 1e-7, an angle of 3e-4 near c = 1) moves the gradient of
#: a cone by O(rounding / angle^2) or picks the other side of the step.
FAMILY_DELICATE_WIDTH = {"float64": 1e-4, "float32": 0.1}
#: Central finite differences (float64, step 1e-6 of a row's norm) against the family's
#: analytic gradients, relative to the scale of support.family_reference.grad_scales.
FAMILY_FD_TOL = 1e-6
