"""lsoftmax_core/_cublas.py: the column-major gemm arguments of a row-major product, checked
on the host by running them through a column-major GEMM written here over the operands'
raw memory; on a GPU (marked ``gpu``), ``matmul`` against ``cupy.matmul`` bit for bit
(except a 1x1 product, which CuPy does not hand to cuBLAS)."""

from __future__ import annotations

import numpy as np
import pytest

from lsoftmax_core._cublas import OP_N, OP_T, gemm_args


def _memory(a: np.ndarray) -> np.ndarray:
    """The elements in the order they lie in memory (the view's own layout)."""
    return a.ravel(order="C" if a.flags.c_contiguous else "F")


def _column_major_gemm(transa, transb, m, n, k, A, lda, B, ldb, ldc) -> np.ndarray:
    """cuBLAS's C = op(A) op(B) (C m x n, column-major with leading dimension ldc), from
    the flat memories A and B read column-major with leading dimensions lda and ldb."""

    def matrix(mem, ld, rows, cols):
        assert ld >= max(1, rows), f"leading dimension {ld} < {rows} rows"
        return np.array([[mem[i + j * ld] for j in range(cols)] for i in range(rows)])

    opa = matrix(A, lda, m, k) if transa == OP_N else matrix(A, lda, k, m).T
    opb = matrix(B, ldb, k, n) if transb == OP_N else matrix(B, ldb, n, k).T
    c = opa @ opb
    flat = np.zeros(ldc * n)
    for j in range(n):
        flat[j * ldc : j * ldc + m] = c[:, j]
    return flat


def _layouts(rng, rows, cols):
    """The same (rows, cols) values as a C-contiguous array and as a transposed view."""
    v = rng.standard_normal((rows, cols))
    return {"C": np.ascontiguousarray(v), "T": np.ascontiguousarray(v.T).T}


@pytest.mark.parametrize(("n", "k", "m"), [(5, 3, 4), (1, 3, 4), (5, 1, 4), (5, 3, 1), (1, 1, 1), (2, 7, 2)])
@pytest.mark.parametrize("a_layout", ["C", "T"])
@pytest.mark.parametrize("b_layout", ["C", "T"])
def test_the_gemm_arguments_compute_a_times_b_in_every_layout(n, k, m, a_layout, b_layout) -> None:
    rng = np.random.default_rng(n * 100 + k * 10 + m)
    a, b = _layouts(rng, n, k)[a_layout], _layouts(rng, k, m)[b_layout]
    out = np.empty((n, m))
    args = gemm_args(a, b, out)
    assert args is not None
    transa, transb, mm, nn, kk, lda, ldb, ldc = args
    # cuBLAS's A is b and its B is a: out^T = b^T a^T, column-major.
    flat = _column_major_gemm(transa, transb, mm, nn, kk, _memory(b), lda, _memory(a), ldb, ldc)
    np.testing.assert_allclose(flat.reshape(n, m), a @ b, rtol=1e-14, atol=1e-14)


def test_the_backends_three_products_use_the_transposes_without_copies() -> None:
    rng = np.random.default_rng(1)
    x, w, g = rng.standard_normal((6, 3)), rng.standard_normal((4, 3)), rng.standard_normal((6, 4))
    assert gemm_args(x, w.T, np.empty((6, 4)))[:2] == (OP_T, OP_N)  # logits = x @ w.T
    assert gemm_args(g, w, np.empty((6, 3)))[:2] == (OP_N, OP_N)  # grad_x = g @ w
    assert gemm_args(g.T, x, np.empty((4, 3)))[:2] == (OP_N, OP_T)  # grad_w = g.T @ x


@pytest.mark.parametrize(
    "case",
    ["empty rows", "empty inner", "empty cols", "strided a", "strided b", "out not C-contiguous", "shape mismatch"],
)
def test_what_one_gemm_cannot_do_is_left_to_cupy_matmul(case) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((3, 4))
    out = np.empty((5, 4))
    if case == "empty rows":
        a, out = a[:0], out[:0]
    elif case == "empty inner":
        a, b = a[:, :0], b[:0]
    elif case == "empty cols":
        b, out = b[:, :0], out[:, :0]
    elif case == "strided a":
        a = rng.standard_normal((5, 6))[:, ::2]
    elif case == "strided b":
        b = rng.standard_normal((6, 4))[::2]
    elif case == "out not C-contiguous":
        out = np.empty((4, 5)).T
    else:
        out = np.empty((5, 5))
    assert gemm_args(a, b, out) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_matmul_equals_cupy_matmul_bit_for_bit_on_the_gpu(dtype) -> None:
    cupy = pytest.importorskip("cupy")
    from lsoftmax_core import supported_dtypes
    from lsoftmax_core._cublas import matmul

    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    dt = np.dtype(dtype) if dtype != "bfloat16" else next((d for d in supported_dtypes("cupy") if d.name == dtype), None)
    if dt is None:
        pytest.skip("this CuPy has no bfloat16 matmul")
    rng = np.random.default_rng(3)
    for n, k, m in [(256, 2, 10), (37, 129, 65), (1, 5, 3), (64, 1, 1)]:
        x = cupy.asarray(rng.standard_normal((n, k)).astype(dt))
        w = cupy.asarray(rng.standard_normal((m, k)).astype(dt))
        g = cupy.asarray(rng.standard_normal((n, m)).astype(dt))
        for a, b in [(x, w.T), (g, w), (g.T, x), (x[1:], w.T), (w[: m // 2 + 1], x.T)]:
            got, want = matmul(a, b), cupy.matmul(a, b)
            assert got.dtype == want.dtype and got.shape == want.shape
            if got.shape == (1, 1):
                # CuPy computes a 1x1 product with its own multiply-and-sum kernel, not
                # cuBLAS: the two differ in the last bit (seen on an H200), so compare the
                # value with the float64 product instead.
                a64, b64 = (cupy.asnumpy(v).astype(np.float64) for v in (a, b))
                eps = {2: 2.0**-8, 4: 2.0**-23, 8: 2.0**-52}[dt.itemsize]  # bfloat16's covers float16
                bound = (a.shape[1] + 1) * eps * (np.abs(a64) @ np.abs(b64))  # rounding of a sum of products
                assert np.all(np.abs(cupy.asnumpy(got).astype(np.float64) - a64 @ b64) <= bound)
                continue
            bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]
            assert np.array_equal(cupy.asnumpy(got).view(bits), cupy.asnumpy(want).view(bits)), (n, k, m)
        out = cupy.empty((n, m), dtype=dt)
        assert matmul(x, w.T, out) is out
