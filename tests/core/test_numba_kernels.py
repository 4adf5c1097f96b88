"""lsoftmax_core/_numba_kernels.py, the opt-in compiled loops of the NumPy backend: psi with
the reference recurrences' bits, the angles where the maths is delicate, the rows the loops
decline (left whole to the NumPy code, nothing written), the statistics record shared with
the NumPy code, and the choice itself.  The whole NumPy-backend suite also runs with them
(tests/core/test_numpy_backend.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import lsoftmax_core as lsm
from lsoftmax_core import _chebyshev, _numpy_backend

from support.tolerances import check_backward, check_forward

nk = pytest.importorskip("lsoftmax_core._numba_kernels", reason="needs Numba")

SAFE = _numpy_backend._SAFE_SQ  # the NumPy code's safe ranges, which the loops share


@pytest.fixture(autouse=True)
def numba_kernels():
    before = lsm.cpu_kernels()
    lsm.set_cpu_kernels("numba")
    yield
    lsm.set_cpu_kernels(before)


def _thr(m):
    return np.array(_chebyshev.thresholds(m))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 6, 16, 64])
def test_psi_has_the_bits_of_the_reference_recurrences(m) -> None:
    edges = np.array(_chebyshev.thresholds(m) + [-1.0, 0.0, 1.0])
    near = np.concatenate([edges, np.nextafter(edges, 2.0), np.nextafter(edges, -2.0)])
    c = np.clip(np.concatenate([near, np.linspace(-1.0, 1.0, 1001)]), -1.0, 1.0)
    psi, dpsi = _chebyshev.psi_and_derivative(c, m)
    got = np.array([nk._psi(float(v), m, _thr(m)) for v in c])
    assert np.array_equal(got[:, 0], psi) and np.array_equal(got[:, 1], dpsi)


def _rotated(theta, norm_x=2.0, norm_w=3.0):
    """x at angle theta from w (2-D)."""
    return norm_x * np.array([math.cos(theta), math.sin(theta)]), np.array([norm_w, 0.0])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("m", [2, 3, 4, 6])
def test_the_delicate_angles_run_in_the_loops_and_match_the_reference(dtype, m) -> None:
    """|cos| = 1, cos = 0 and theta exactly on k*pi/m, with one class and with several."""
    thetas = [0.0, math.pi, math.pi / 2] + [k * math.pi / m for k in range(1, m)]
    rows = [_rotated(t) for t in thetas]
    x = np.array([r[0] for r in rows]).astype(dtype)
    w = np.array([rows[0][1], [0.5, -1.0]]).astype(dtype)
    for label in (np.zeros(len(thetas), dtype=np.int64), np.arange(len(thetas)) % 2):
        rec = nk.stats_rows(x, w, label, m, _thr(m), SAFE[np.dtype(dtype)])
        assert rec is not None  # every row is the loops' own
        out = lsm.forward(x, w, label, margin=m, beta=0.5)
        check_forward(out, x, w, label, margin=m, beta=0.5, dtype=dtype)
        g = np.random.default_rng(m).standard_normal(out.shape).astype(dtype)
        check_backward(lsm.backward(g, x, w, label, margin=m, beta=0.5), g, x, w, label, margin=m, beta=0.5,
                       dtype=dtype)  # fmt: skip
    one = lsm.forward(x[:1], w[:1], np.array([0]), margin=m, beta=0.0)
    assert one.shape == (1, 1) and one[0, 0] == pytest.approx(6.0, rel=1e-6)  # theta = 0: psi = 1


def _problem(dtype, n=6, c=4, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    w = rng.standard_normal((c, d)).astype(dtype)
    return x, w, rng.integers(0, c, n), rng.standard_normal((n, c)).astype(dtype)


@pytest.mark.parametrize(
    "case", ["zero x row", "zero w row", "huge x", "tiny w", "nan in x", "inf in w", "tiny upstream gradient"]
)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_rows_the_loops_decline_leave_the_whole_call_to_the_numpy_code(case, dtype) -> None:
    x, w, label, g = _problem(dtype)
    huge = 1e200 if dtype == "float64" else 1e20
    if case == "zero x row":
        x[2] = 0.0
    elif case == "zero w row":
        w[label[2]] = 0.0
    elif case == "huge x":
        x[1] *= huge
    elif case == "tiny w":
        w[label[1]] /= huge
    elif case == "nan in x":
        x[3, 0] = np.nan
    elif case == "inf in w":
        w[label[0], 1] = np.inf
    else:
        g[:] = 1e-310 if dtype == "float64" else 1e-40  # coefficients below the dtype's normal range
    logits = x @ w.T
    before = logits.copy()
    rec = nk.forward_rows(logits, x, w, label, 3, 0.5, _thr(3), SAFE[np.dtype(dtype)])
    if case == "tiny upstream gradient":
        assert rec is not None
        gx, gw = g @ w, g.T @ x
        gx0, gw0 = gx.copy(), gw.copy()
        ok = nk.backward_rows(gx, gw, g, x, w, label, rec, 0.5)
        assert not ok and np.array_equal(gx, gx0) and np.array_equal(gw, gw0)  # nothing written
    else:
        assert rec is None
        assert np.array_equal(logits, before, equal_nan=True)  # nothing written
    # The public calls then give the NumPy code's bits (the forward too, unless only the
    # backward declined).
    def calls():
        grads = lsm.backward(g, x, w, label, margin=3, beta=0.5)
        return grads if rec is not None else (lsm.forward(x, w, label, margin=3, beta=0.5), *grads)

    with np.errstate(all="ignore"):
        got = calls()
        lsm.set_cpu_kernels("numpy")
        want = calls()
    for a, b in zip(got, want):
        assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_statistics_record_goes_both_ways_between_the_loops_and_the_numpy_code(dtype) -> None:
    x, w, label, g = _problem(dtype, n=40, c=7, d=5, seed=3)
    kw = dict(margin=4, beta=2.0)
    _, rec_loops = lsm.forward(x, w, label, return_stats=True, **kw)
    lsm.set_cpu_kernels("numpy")
    _, rec_numpy = lsm.forward(x, w, label, return_stats=True, **kw)
    np.testing.assert_allclose(rec_loops, rec_numpy, rtol=1e-5 if dtype == "float32" else 1e-13)
    for kernels in ("numpy", "numba"):
        lsm.set_cpu_kernels(kernels)
        for rec in (rec_loops, rec_numpy):
            check_backward(lsm.backward(g, x, w, label, stats=rec, **kw), g, x, w, label, dtype=dtype, **kw)
    # A record with careful rows (a zero row here) sends the loops' backward to the NumPy code.
    x[0] = 0.0
    _, rec = lsm.forward(x, w, label, return_stats=True, **kw)
    assert rec[5, 0] == -4
    lsm.set_cpu_kernels("numba")
    a = lsm.backward(g, x, w, label, stats=rec, **kw)
    lsm.set_cpu_kernels("numpy")
    b = lsm.backward(g, x, w, label, stats=rec, **kw)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("n", "c", "d"), [(256, 10, 2), (64, 30, 8), (7, 3, 1), (1, 1, 4), (8, 30, 3)])
def test_given_the_same_record_the_backward_has_the_numpy_codes_bits(dtype, n, c, d) -> None:
    """Where the NumPy code sums r_i per class in float64 (D <= 8, C <= 4N), the loops form
    q_i and r_i with its operations in its order and sum alike: the same bits, whether they
    sum in a per-class block (C <= N) or after a sort by label (8x30x3)."""
    x, w, label, g = _problem(dtype, n=n, c=c, d=d, seed=n + d)
    lsm.set_cpu_kernels("numpy")
    _, rec = lsm.forward(x, w, label, margin=4, beta=1.0, return_stats=True)
    want = lsm.backward(g, x, w, label, margin=4, beta=1.0, stats=rec)
    lsm.set_cpu_kernels("numba")
    got = lsm.backward(g, x, w, label, margin=4, beta=1.0, stats=rec)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_repeated_calls_give_the_same_bits_and_inputs_are_not_modified() -> None:
    x, w, label, g = _problem("float32", n=64, c=5, d=7, seed=5)
    copies = [a.copy() for a in (x, w, label, g)]
    first = (lsm.forward(x, w, label, margin=6, beta=1.0), *lsm.backward(g, x, w, label, margin=6, beta=1.0))
    again = (lsm.forward(x, w, label, margin=6, beta=1.0), *lsm.backward(g, x, w, label, margin=6, beta=1.0))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(np.array_equal(a, b) for a, b in zip(copies, (x, w, label, g)))


def test_a_bad_choice_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"name must be 'numpy' or 'numba', got 'fast'"):
        lsm.set_cpu_kernels("fast")
    assert lsm.cpu_kernels() == "numba"


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "LSOFTMAX_CPU_KERNELS"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)


PROBE = (
    "import sys, json, numpy as np, lsoftmax_core as lsm;"
    "before = 'numba' in sys.modules;"
    "lsm.forward(np.ones((2, 3)), np.ones((4, 3)), np.array([0, 3]), margin=3);"
    "print(json.dumps([before, lsm.cpu_kernels(), 'numba' in sys.modules]))"
)


def test_numba_is_imported_only_once_chosen_and_the_environment_chooses() -> None:
    default = _run(PROBE)
    assert json.loads(default.stdout.strip().splitlines()[-1]) == [False, "numpy", False], default.stderr
    chosen = _run(PROBE, LSOFTMAX_CPU_KERNELS="numba")
    assert json.loads(chosen.stdout.strip().splitlines()[-1]) == [False, "numba", True], chosen.stderr
    bad = _run(PROBE, LSOFTMAX_CPU_KERNELS="fortran")
    assert bad.returncode != 0 and "LSOFTMAX_CPU_KERNELS must be 'numpy' or 'numba', got 'fortran'" in bad.stderr


def test_the_torch_adapter_runs_on_them() -> None:
    torch = pytest.importorskip("torch")
    from lsoftmax_core.adapters.torch import lsoftmax

    x, w, label, _ = _problem("float64", n=32, c=6, d=4, seed=7)
    grads = {}
    for kernels in ("numba", "numpy"):
        lsm.set_cpu_kernels(kernels)
        tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, w))
        loss = torch.nn.functional.cross_entropy(lsoftmax(tx, tw, torch.from_numpy(label), margin=4, beta=1.0),
                                                 torch.from_numpy(label))  # fmt: skip
        grads[kernels] = [loss.item(), *torch.autograd.grad(loss, (tx, tw))]
    assert grads["numba"][0] == pytest.approx(grads["numpy"][0], rel=1e-13)
    for a, b in zip(grads["numba"][1:], grads["numpy"][1:]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-15)
