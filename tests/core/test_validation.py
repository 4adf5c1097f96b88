"""Bad input gets a ValueError/TypeError that names the argument and the bad value."""

from __future__ import annotations

import re

import numpy as np
import pytest

import lsoftmax_core as lsm

X = np.ones((3, 4))
W = np.ones((5, 4))
Y = np.array([0, 1, 4])
G = np.ones((3, 5))


def _both(x=X, w=W, y=Y, g=G, **kw):
    kw.setdefault("margin", 2)
    kw.setdefault("beta", 0.0)
    yield lambda: lsm.forward(x, w, y, **kw)
    yield lambda: lsm.backward(g, x, w, y, **kw)


CASES = [
    (dict(x=np.ones(4)), ValueError, r"x must be 2-D.*\(4,\)"),
    (dict(w=np.ones((5, 4, 1))), ValueError, r"w must be 2-D"),
    (dict(y=np.zeros((3, 1), np.int64)), ValueError, r"label must be 1-D"),
    (dict(w=np.ones((5, 3)), g=G), ValueError, r"same feature size D: x.shape=\(3, 4\), w.shape=\(5, 3\)"),
    (dict(y=np.array([0, 1])), ValueError, r"label must have shape \(N,\) = \(3,\), got label.shape=\(2,\)"),
    (dict(y=np.array([0.0, 1.0, 2.0])), TypeError, r"label must have an integer dtype, got label.dtype=float64"),
    (dict(y=np.array([True, False, True])), TypeError, r"label.dtype=bool"),
    (dict(y=np.array([0, 5, 1])), ValueError, r"label must lie in \[0, C\) = \[0, 5\): label\[1\]=5"),
    (dict(y=np.array([0, 1, -1])), ValueError, r"label\[2\]=-1"),
    (dict(margin=0), ValueError, r"margin=0 must be an integer"),
    (dict(margin=2.0), TypeError, r"margin=2.0 must be an integer >= 1, not float"),
    (dict(margin=True), TypeError, r"margin=True"),
    (dict(margin=lsm.MAX_MARGIN + 1), ValueError, rf"margin={lsm.MAX_MARGIN + 1} must be an integer in \[1, {lsm.MAX_MARGIN}\]"),
    (dict(beta=-1.0), ValueError, r"beta=-1.0 must be a finite number >= 0"),
    (dict(beta=float("nan")), ValueError, r"beta=nan"),
    (dict(beta=float("inf")), ValueError, r"beta=inf"),
    (dict(beta="1"), TypeError, r"beta='1' must be a real number"),
    (dict(w=np.ones((5, 4), np.float32)), TypeError, r"same dtype \(no silent promotion\): x.dtype=float64, w.dtype=float32"),
    (dict(x=np.ones((3, 4), np.float16), w=np.ones((5, 4), np.float16)), TypeError, r"x.dtype=float16 is not supported"),
    (dict(x=np.ones((3, 4), np.int64), w=np.ones((5, 4), np.int64)), TypeError, r"x.dtype=int64 is not supported"),
    (dict(w=np.ones((0, 4)), g=np.ones((3, 0))), ValueError, r"w must have at least one class"),
    (dict(x=[[1.0] * 4] * 3), TypeError, r"x must be a numpy.ndarray.*got builtins.list"),
    (dict(y=[0, 1, 2]), TypeError, r"label must be a numpy.ndarray like"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", CASES)
def test_bad_input_is_named(kwargs, exc, pattern) -> None:
    for call in _both(**kwargs):
        with pytest.raises(exc, match=pattern):
            call()


@pytest.mark.parametrize(
    "g,exc,pattern",
    [
        (np.ones((3, 4)), ValueError, r"grad_logits must have shape \(N, C\) = \(3, 5\), got grad_logits.shape=\(3, 4\)"),
        (np.ones((3, 5), np.float32), TypeError, r"grad_logits.dtype=float32 must equal x.dtype=float64"),
        (np.ones(15), ValueError, r"grad_logits must have shape"),
    ],
)
def test_bad_grad_logits(g, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        lsm.backward(g, X, W, Y, margin=2, beta=0.0)


def test_numpy_integer_margin_and_beta_scalars_are_accepted() -> None:
    a = lsm.forward(X, W, Y, margin=np.int32(3), beta=np.float32(0.5))
    b = lsm.forward(X, W, Y, margin=3, beta=0.5)
    np.testing.assert_array_equal(a, b)


def test_error_messages_quote_the_argument_name_first() -> None:
    with pytest.raises(ValueError) as err:
        lsm.forward(X, W, Y, margin=-3, beta=0.0)
    assert re.match(r"margin=-3", str(err.value))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("c", [5, 127, 128, 129, 300, 70000])
def test_every_label_dtype_and_class_count_catches_each_bad_label(dtype, c) -> None:
    """The label scan reads signed labels as unsigned where that decides [0, C) in one
    reduction (C <= 2^(bits-1)), and scans both ends otherwise: a negative label, one equal
    to C and the dtype's extremes are refused at every C and width, with the first one named."""
    info = np.iinfo(dtype)
    good = np.zeros(6, dtype=dtype)
    good[2] = min(c - 1, info.max)
    lsm.check_arguments(np.ones((6, 2)), np.ones((c, 2)), good)  # accepted
    bad_values = {info.min, info.max, c, -1, -c}
    for bad in sorted(v for v in bad_values if info.min <= v <= info.max and not 0 <= v < c):
        y = good.copy()
        y[4] = bad
        with pytest.raises(ValueError, match=rf"label must lie in \[0, C\) = \[0, {c}\): label\[4\]={bad}$"):
            lsm.check_arguments(np.ones((6, 2)), np.ones((c, 2)), y)
        with pytest.raises(ValueError, match=rf"label\[4\]={bad}$"):
            lsm.check_arguments(np.ones((6, 2)), np.ones((c, 2)), np.repeat(y, 2)[::2])  # a strided view
