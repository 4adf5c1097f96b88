"""Hypothesis strategies for L-Softmax problems, shared by every backend's tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

MARGINS = st.integers(min_value=1, max_value=16)
BETAS = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1e4, allow_nan=False))


@st.composite
def problems(draw, *, dtype=np.float64, max_n=9, max_c=7, max_d=6, min_norm=0.0):
    """(x, w, label, margin, beta): random shapes, values and row scales.

    Row scales spread over several orders of magnitude so that norms are not all ~1;
    ``min_norm`` keeps rows away from zero where a test needs differentiability.
    """
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    d = draw(st.integers(1, max_d))
    elems = st.floats(-1.0, 1.0, allow_nan=False, width=32)
    x = draw(hnp.arrays(np.float64, (n, d), elements=elems))
    w = draw(hnp.arrays(np.float64, (c, d), elements=elems))
    xs = draw(hnp.arrays(np.float64, (n, 1), elements=st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3])))
    ws = draw(hnp.arrays(np.float64, (c, 1), elements=st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3])))
    x, w = x * xs, w * ws
    if min_norm > 0.0:
        # Push short rows out along a fixed direction so every norm is >= min_norm.
        for a in (x, w):
            short = np.linalg.norm(a, axis=1) < min_norm
            a[short] += min_norm * 2.0
    label = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    return x.astype(dtype), w.astype(dtype), label, draw(MARGINS), draw(BETAS)
