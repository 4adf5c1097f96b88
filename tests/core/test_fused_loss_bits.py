"""The NumPy fused loss keeps the bits of the implementation it replaced (its own module,
lsoftmax_core/_numpy_loss.py of commit 44256fc) wherever the order of operations is the
same: every loss and lse, and, on the pure-NumPy path (``LSOFTMAX_CE_BLAS=0``), every
gradient.  With the BLAS's beta = 1 accumulation, grad_w of the row chunks after the first
and grad_x of the class chunks after the first are summed inside the GEMM (one rounding
fewer per element), so there the gradients agree to rounding, not bit for bit.

The expected arrays in data/fused_loss_bits.npz were computed by the old module, on fixed
seeds, with ``python tests/core/test_fused_loss_bits.py 44256fc`` (run from the repository
root: it imports that commit's module from a temporary copy).  Bits also depend on NumPy's
own loops (its version, and the SIMD extensions they dispatch to on this CPU) and its
BLAS: data/fused_loss_bits.env records that environment, and elsewhere (the MXNet
environment's NumPy 1.23, another CPU) the comparisons are to rounding instead, with the
exact ones skipped and saying why."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

import lsoftmax_core as lsm
from lsoftmax_core import _cblas

DATA = pathlib.Path(__file__).parent / "data" / "fused_loss_bits.npz"
ENV = DATA.with_suffix(".env")


def environment() -> str:
    """What the expected bits depend on besides the code: NumPy's version (its ufunc loops
    and, for a wheel, the OpenBLAS it bundles) and the SIMD extensions its loops use here."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    simd = ",".join(sorted(k for k, v in features.items() if v))
    return f"numpy {np.__version__}; simd {simd}"


SAME_ENVIRONMENT = ENV.read_text().strip() == environment()
IGNORE = -100

#: (name, N, C, D, dtype, margin, beta, reduction, chunking, chunk_size)
CASES = [
    ("rows64", 13, 9, 5, "float64", 3, 1.0, "mean", "rows", 3),
    ("rows64_m1", 13, 9, 5, "float64", 1, 0.0, "sum", "rows", 4),
    ("rows32", 40, 30, 8, "float32", 4, 0.0, "none", "rows", 7),
    ("classes64", 13, 9, 5, "float64", 3, 1.0, "mean", "classes", 2),
    ("classes32", 40, 30, 8, "float32", 2, 5.0, "none", "classes", 7),
    ("classes32_m6", 17, 11, 6, "float32", 6, 0.0, "sum", "classes", 4),
]
SHARD = (0, 4)  # w[0:4] of all C classes, for the shard cases


def _inputs(i: int, n: int, c: int, d: int, dtype: str):
    rng = np.random.default_rng(1000 + i)
    x = (rng.standard_normal((n, d)) * 2.0).astype(dtype)
    w = rng.standard_normal((c, d)).astype(dtype)
    label = rng.integers(0, c, n)
    label[rng.random(n) < 0.2] = IGNORE
    grad = rng.standard_normal(n)
    return x, w, label, grad


def compute(api, i: int, case: tuple) -> dict[str, np.ndarray]:
    """Every result of one case through ``api`` (the old module or lsoftmax_core)."""
    name, n, c, d, dtype, margin, beta, reduction, chunking, size = case
    x, w, label, grad = _inputs(i, n, c, d, dtype)
    kw = dict(margin=margin, beta=beta, chunking=chunking, chunk_size=size)
    g = grad if reduction == "none" else np.float64(grad[0])
    out = {}
    out["loss"], out["lse"] = api.cross_entropy(x, w, label, reduction=reduction, return_lse=True, **kw)
    out["gx"], out["gw"] = api.cross_entropy_backward(g, x, w, label, reduction=reduction, **kw)
    if chunking == "classes":  # the old module used a given lse with class chunks only
        out["gx_lse"], out["gw_lse"] = api.cross_entropy_backward(
            g, x, w, label, reduction=reduction, lse=out["lse"], **kw
        )
    if reduction != "none":
        out["wg_loss"], out["wg_gx"], out["wg_gw"] = api.cross_entropy_with_grad(x, w, label, reduction=reduction, **kw)
    a, b = SHARD
    out["s_lse"], out["s_tgt"] = api.cross_entropy_shard_stats(x, w[a:b], label, class_start=a, num_classes=c, **kw)
    out["s_gx"], out["s_gw"] = api.cross_entropy_backward(
        grad, x, w[a:b], label, reduction="none", lse=out["lse"], class_start=a, num_classes=c, **kw
    )
    return {f"{name}.{k}": np.asarray(v) for k, v in out.items()}


GRADS = ("gx", "gw", "gx_lse", "gw_lse", "wg_gx", "wg_gw", "s_gx", "s_gw")


@pytest.fixture(scope="module")
def expected():
    with np.load(DATA) as f:
        return dict(f)


@pytest.mark.parametrize("row_bytes", [None, 1], ids=["blocks", "one-row-blocks"])
@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_pure_numpy_path_keeps_every_bit_of_the_old_implementation(monkeypatch, expected, i, row_bytes) -> None:
    """Also with the softmax's row blocks one row each."""
    from lsoftmax_core import _numpy_loss

    if not SAME_ENVIRONMENT:
        pytest.skip(f"the expected bits were made with {ENV.read_text().strip()!r}, not {environment()!r}")

    monkeypatch.setattr(_cblas, "_GEMM", {})
    monkeypatch.setattr(_cblas, "_LOADED", [True])
    if row_bytes is not None:
        monkeypatch.setattr(_numpy_loss, "_SOFTMAX_BYTES", row_bytes)
    got = compute(lsm, i, CASES[i])
    assert got.keys() == {k for k in expected if k.startswith(CASES[i][0] + ".")}
    for key, value in got.items():
        assert value.dtype == expected[key].dtype, key
        assert value.tobytes() == expected[key].tobytes(), key


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_blas_accumulation_changes_gradients_by_rounding_only(expected, i) -> None:
    """Losses and lse keep their bits (in the environment the bits were made in; elsewhere
    everything is compared to rounding)."""
    got = compute(lsm, i, CASES[i])
    eps = float(np.finfo(CASES[i][4]).eps)
    for key, value in got.items():
        want = expected[key]
        if key.split(".")[1] in GRADS or not SAME_ENVIRONMENT:
            scale = float(np.abs(want).max(initial=0.0)) + 1e-300
            assert float(np.abs(value - want).max(initial=0.0)) <= 64 * eps * scale, key
        else:
            assert value.tobytes() == want.tobytes(), key


def test_the_blas_accumulation_is_found_and_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setattr(_cblas, "_GEMM", {})
    monkeypatch.setattr(_cblas, "_LOADED", [])
    monkeypatch.setenv(_cblas.ENV, "0")
    assert not _cblas.available(np.float32)
    out = np.zeros((2, 2))
    assert not _cblas.gemm_add(np.ones((2, 3)), np.ones((3, 2)), out) and not out.any()
    monkeypatch.setattr(_cblas, "_LOADED", [])
    monkeypatch.delenv(_cblas.ENV)
    if not _cblas._library_files():
        pytest.skip("this NumPy does not ship scipy-openblas where the loss looks for it")
    assert _cblas.available(np.float32) and _cblas.available(np.float64)
    a, b = np.arange(6.0).reshape(2, 3), np.arange(6.0).reshape(3, 2)
    assert _cblas.gemm_add(a, b, out) and np.array_equal(out, a @ b)
    assert _cblas.gemm_add(a[:, ::2], b[::2], out) is False  # no unit stride: the caller adds


def _old_module(commit: str):
    """The fused loss of ``commit`` as a package in a temporary directory, on today's backend."""
    import subprocess
    import tempfile

    root = pathlib.Path(tempfile.mkdtemp()) / "oldloss"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name in ("_numpy_loss", "_loss_plan"):
        src = subprocess.run(["git", "show", f"{commit}:lsoftmax_core/{name}.py"], check=True, capture_output=True,
                             text=True).stdout  # fmt: skip
        src = src.replace("from ._loss_plan", "from oldloss._loss_plan").replace("from .", "from lsoftmax_core.")
        (root / f"{name}.py").write_text(src)
    sys.path.insert(0, str(root.parent))
    from oldloss import _numpy_loss  # type: ignore[import-not-found]

    return _numpy_loss


if __name__ == "__main__":
    old = _old_module(sys.argv[1])
    arrays: dict[str, np.ndarray] = {}
    for i, case in enumerate(CASES):
        arrays.update(compute(old, i, case))
    np.savez_compressed(DATA, **arrays)
    ENV.write_text(environment() + "\n")
    print(f"wrote {len(arrays)} arrays to {DATA} ({environment()})")
