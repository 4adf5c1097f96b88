"""The per-sample scalar maths of L-Softmax, vectorised over samples with NumPy: psi, its
derivative psi' and the interval index k, for cosines c in [-1, 1] (float64 arrays).

This is the host mirror of ``kernels/lsoftmax_math.cuh``: the CUDA kernels run that
header, the NumPy backend runs this module, and the tests check one against the other
(the header is also compiled for the host).  The formulas and why they need no acos and
no division by cos: docs/derivatives.md ("Forward", "Derivative of psi").
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_MARGIN", "chebyshev_tu", "interval_index", "psi_and_derivative", "thresholds"]

#: Largest margin accepted.  The paper uses m <= 4 and the seed m <= 6; the cost of k
#: and of the recurrences is O(m) per sample, and accuracy is tested up to this value.
MAX_MARGIN = 64

F64 = npt.NDArray[np.float64]


def thresholds(margin: int) -> list[float]:
    """cos(j*pi/m) for j = 1..m-1, decreasing: the boundaries of the k intervals in c."""
    return [math.cos(j * math.pi / margin) for j in range(1, margin)]


def interval_index(c: F64, margin: int) -> npt.NDArray[np.int64]:
    """k = #{j in 1..m-1 : c <= cos(j*pi/m)}, i.e. theta >= j*pi/m, without acos."""
    k = np.zeros(c.shape, dtype=np.int64)
    for t in thresholds(margin):
        k += c <= t
    return k


def chebyshev_tu(c: F64, margin: int) -> tuple[F64, F64]:
    """T_m(c) and U_{m-1}(c) by the three-term recurrences.

    T_{n+1} = 2c T_n - T_{n-1} and U_{n+1} = 2c U_n - U_{n-1} are stable on [-1, 1]
    (errors grow at most like n^2 ulp) and, unlike the binomial expansion of cos(m*theta)
    in powers of cos and sin used by the seed, never divide by cos(theta).
    """
    t_prev, t = np.ones_like(c), c.copy()  # T_0, T_1
    u_prev, u = np.zeros_like(c), np.ones_like(c)  # U_{-1}, U_0
    for _ in range(1, margin):
        t_prev, t = t, 2.0 * c * t - t_prev
        u_prev, u = u, 2.0 * c * u - u_prev
    return t, u


def psi_and_derivative(c: F64, margin: int) -> tuple[F64, F64]:
    """psi(c) and dpsi/dc for cosines c already clamped to [-1, 1]."""
    k = interval_index(c, margin)
    sign = 1.0 - 2.0 * (k & 1)  # (-1)^k
    t, u = chebyshev_tu(c, margin)
    psi = sign * t - 2.0 * k
    dpsi = sign * margin * u
    return psi, dpsi
