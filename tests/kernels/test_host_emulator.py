"""kernels/lsoftmax.cu run on the CPU: every kernel the CuPy backend launches, with the
backend's own launch plan and argument binding (lsoftmax_core/_cupy_plan.py), on the fiber
emulator of tests/support/cuda_emulator.hpp (NumPy GEMMs stand in for cuBLAS).

What this proves without a GPU: the kernels' indexing, reductions, per-class grouping and
label handling are right (against the float64 reference, per dtype tolerance, also where a
norm exceeds the float64 range), results do not depend on the order threads run between
barriers (a missing __syncthreads would show), every barrier is reached by the whole block,
argument sizes match the kernel signatures, the block size and op codes come only from the
plan's definitions, and outputs are bitwise independent of run, workspace reuse and
pointer alignment.
What it cannot prove: GPU timing, the memory model beyond barriers, and cuBLAS.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lsoftmax_core import _cupy_plan as plan
from lsoftmax_core.checks import check_arrays

from support.kernel_host import (
    BFLOAT16,
    DTYPES,
    EXTREME_NORMS,
    KERNELS,
    SUPPORT,
    EmuBackend,
    build_emulator,
    check_extreme_norms,
    compiler,
    emulator_source,
    gemm,
    mixed_scale_class,
    nasty_rows,
    representable,
)
from support.reference import backward as ref_backward
from support.reference import forward as ref_forward
from support.strategies import problems
from support.tolerances import TOLERANCES, assert_close, check_backward, check_forward, grad_scales

pytestmark = pytest.mark.skipif(compiler() is None, reason="needs a host C++ compiler (g++)")

DTYPE_IDS = [d.name for d in DTYPES]
UINT64_MAX = np.iinfo(np.uint64).max


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("emu"))


@pytest.fixture(scope="module", autouse=True, params=["small", "gemm"])
def path(request):
    """Every test runs on both plans: as the backend chooses (the small-problem kernels at
    most of these sizes), and with the small path off (cuBLAS GEMMs + the margin kernels)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "gemm":
            mp.setattr(plan, "SMALL_MAX_MACS", 0)
        yield request.param


def _rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _case(seed, n, c, d, dtype, *, label=None):
    rng = np.random.default_rng(seed)
    x, w = _rand(rng, (n, d), dtype), _rand(rng, (c, d), dtype)
    lab = rng.integers(0, c, n) if label is None else np.asarray(label)
    return x, w, lab, _rand(rng, (n, c), dtype)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _assert_bitwise(a, b) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(_bits(a), _bits(b))


def test_registry_matches_plan(emu) -> None:
    assert sorted(emu.sizes) == sorted(plan.name_expressions())
    # Every scalar parameter is 8 bytes (long long / double / unsigned long long), like
    # the NumPy scalars the plan passes.
    assert all(s == 8 for sizes in emu.sizes.values() for s in sizes)


@pytest.mark.parametrize("margin", [1, 3])
@pytest.mark.parametrize("n, d", [(0, 4), (5, 0), (5, 4)])
def test_binding_of_a_call(margin, n, d) -> None:
    """bind_forward/bind_backward resolve every name of their steps, with the kernels' C
    types (double beta, long long serial, unsigned long long record address) and labels as
    the kernels read them (int32/int64 in place, others as an int64 copy); the workspace is
    requested only when a step uses it."""
    c = 3
    x, w, g = np.ones((n, d)), np.ones((c, d)), np.ones((n, c))
    dev = plan.DeviceBuffers.create(np, 12345)
    asked = []

    def workspace(ncoef, nclasses):
        asked.append((ncoef, nclasses))
        return np.zeros(ncoef), np.zeros(nclasses, np.uint32)

    for label in (
        np.zeros(n, np.int32),
        np.zeros(n, np.int64),
        np.zeros(n, np.uint8),
        np.zeros(2 * n, np.int64)[::2],
    ):
        p = check_arrays(x, w, label, margin, 0.5, dtypes=DTYPES, grad_logits=g)
        calls = [
            plan.bind_forward(p, np, dev, x=x, w=w, label=label, logits=g.copy(), serial=7),
            plan.bind_backward(
                p, np, dev, grad_logits=g, x=x, w=w, label=label, grad_x=x.copy(), grad_w=w.copy(),
                serial=8, workspace=workspace,
            ),
            plan.bind_small_forward(p, np, dev, x=x, w=w, label=label, logits=g.copy(), serial=7),
            plan.bind_small_backward(
                p, np, dev, grad_logits=g, x=x, w=w, label=label, grad_x=x.copy(), grad_w=w.copy(), serial=8
            ),
        ]  # fmt: skip
        for call in calls:
            lab = call.values["label"]
            assert lab.flags.c_contiguous and lab.dtype in (np.int32, np.int64)
            assert (lab is label) == (label.dtype in (np.int32, np.int64) and label.flags.c_contiguous)
            assert call.values["beta"].dtype == np.float64 and call.values["serial"].dtype == np.int64
            assert call.values["err_rec"] == np.uint64(12345) and call.values["err_rec"].dtype == np.uint64
            for step in call.steps:
                names = (
                    [step.name]
                    if isinstance(step, plan.Zero)
                    else [a for a in step.args if isinstance(a, str)]
                )
                assert all(name in call.values for name in names)
                if isinstance(step, plan.Launch):
                    assert all(a.dtype.itemsize == 8 for a in call.args(step) if isinstance(a, np.generic))
        uses = any(isinstance(s, plan.Zero) for s in calls[1].steps)
        assert uses == (margin > 1 and n > 0)
        assert asked == ([plan.workspace_sizes(p)] if uses else [])
        asked.clear()


def test_small_problems_take_one_launch_each_way(emu, path) -> None:
    """At the seed's size (256x2x10) the backend's plan is one kernel per direction, GEMMs
    included, and no workspace; margin 1, D > BLOCK, N or C over the limits, or too many
    multiply-adds keep the GEMM plan."""
    x, w, label, g = _case(11, 256, 10, 2, np.float32)
    p = check_arrays(x, w, label, 4, 0.0, dtypes=DTYPES, grad_logits=g)
    b = EmuBackend(emu)
    b.forward(x, w, label, margin=4, beta=0.0)
    b.backward(g, x, w, label, margin=4, beta=0.0)
    if path == "small":
        assert plan.small(p)
        assert b.launched == [plan.kernel_name(k, np.float32, label.dtype) for k in ("lsm_small_forward", "lsm_small_backward")]
        assert b.coef.size == 0 and b.classes.size == 0  # no workspace
    else:
        assert not plan.small(p) and len(b.launched) == 3
    for n, c, d, m in ((256, 10, 2, 1), (4, 3, plan.BLOCK + 1, 4), (plan.SMALL_MAX_N + 1, 2, 2, 4),
                       (2, plan.SMALL_MAX_C + 1, 2, 4), (512, 512, 2, 4)):  # fmt: skip
        x, w, label, g = _case(12, n, c, d, np.float32)
        assert not plan.small(check_arrays(x, w, label, m, 0.0, dtypes=DTYPES, grad_logits=g))


def test_kernels_do_not_compile_without_the_plan_definitions(tmp_path) -> None:
    src = emulator_source(tmp_path)
    cmd = [compiler(), "-std=c++17", "-fsyntax-only", f"-I{KERNELS}", f"-I{SUPPORT}", str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "_cupy_plan.DEFINES" in res.stderr
    res = subprocess.run([*cmd, *plan.define_options()], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_kernels_follow_the_definitions_they_are_built_with(tmp_path) -> None:
    """The block size and the op codes come from the build's definitions alone: a build with
    LSM_BLOCK=64 and other op codes, launched with 64 threads per block, computes the same
    results and records its own op codes (a hard-coded 128 or 0/1 in the kernels would
    show).  Margin > 1 and D <= 64 groups only: there the plan's grids do not depend on
    BLOCK (per-sample blocks, at most 64 column groups per class block)."""
    other = {"LSM_BLOCK": 64, "LSM_OP_FORWARD": 5, "LSM_OP_BACKWARD": 9, "LSM_SMALL_MAX_N": plan.SMALL_MAX_N}
    emu64 = build_emulator(tmp_path, other)
    assert emu64.block == 64
    n, c, d = 150, 3, 37  # more members per class than one chunk of 64 labels
    x, w, label, g = _case(30, n, c, d, np.float64)
    assert plan.class_layout(d, np.float64)[0] <= 64
    for order in (0, 1):
        b = EmuBackend(emu64, order=order)
        check_forward(
            b.forward(x, w, label, margin=3, beta=0.5), x, w, label, margin=3, beta=0.5, dtype="float64"
        )
        grads = b.backward(g, x, w, label, margin=3, beta=0.5)
        check_backward(grads, g, x, w, label, margin=3, beta=0.5, dtype="float64")
    bad = label.copy()
    bad[4] = c
    b = EmuBackend(emu64)
    b.forward(x, w, bad, margin=3, beta=0.5)
    assert list(b.err_rec) == [b.serial, c, 5, 0]
    b.err_key[0], b.err_rec[:] = UINT64_MAX, 0
    b.backward(g, x, w, bad, margin=3, beta=0.5)
    assert list(b.err_rec) == [b.serial, c, 9, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(data=st.data())
def test_matches_reference(emu, dtype, data) -> None:
    x, w, label, m, beta = data.draw(problems(dtype=dtype, max_n=9, max_c=6, max_d=40))
    g = _rand(np.random.default_rng(len(label)), (len(x), len(w)), dtype)
    assume(representable(dtype, x, w, label, g, m, beta))
    b = EmuBackend(emu)
    out = b.forward(x, w, label, margin=m, beta=beta)
    assert out.dtype == dtype
    check_forward(out, x, w, label, margin=m, beta=beta, dtype=dtype.name)
    grads = b.backward(g, x, w, label, margin=m, beta=beta)
    assert grads[0].dtype == grads[1].dtype == dtype
    check_backward(grads, g, x, w, label, margin=m, beta=beta, dtype=dtype.name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape",
    [(300, 2, 5), (260, 300, 3), (70, 3, 37), (5, 2, 1030), (40, 4, 2), (129, 1, 17), (252, 123, 507)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_shapes_against_reference(emu, dtype, shape) -> None:
    """More than one label chunk (N > 128), all-unique labels, many column tiles, tiny D
    (member lanes), one class, odd sizes."""
    n, c, d = shape
    if n * c * d > 2_000_000 and dtype.itemsize < 8:
        pytest.skip("the big case once is enough")
    x, w, label, g = _case(sum(shape), n, c, d, dtype)
    for m, beta in [(4, 0.0), (2, 3.5)]:
        b = EmuBackend(emu)
        check_forward(
            b.forward(x, w, label, margin=m, beta=beta), x, w, label, margin=m, beta=beta, dtype=dtype.name
        )
        grads = b.backward(g, x, w, label, margin=m, beta=beta)
        check_backward(grads, g, x, w, label, margin=m, beta=beta, dtype=dtype.name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape", [(150, 3, 37), (40, 4, 2), (9, 9, 300)], ids=lambda s: "x".join(map(str, s))
)
def test_bits_do_not_depend_on_thread_order(emu, dtype, shape) -> None:
    x, w, label, g = _case(1, *shape, dtype)
    results = []
    for order in (0, 1, 7):
        b = EmuBackend(emu, order=order)
        results.append(
            (b.forward(x, w, label, margin=3, beta=0.25), *b.backward(g, x, w, label, margin=3, beta=0.25))
        )
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            _assert_bitwise(a, b_)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bits_do_not_depend_on_alignment_or_workspace_reuse(emu, dtype) -> None:
    n, c, d = 50, 6, 24  # D * itemsize is a multiple of 16: the aligned rows take vector loads
    x, w, label, g = _case(2, n, c, d, dtype)
    b = EmuBackend(emu)
    want = (b.forward(x, w, label, margin=4, beta=1.0), *b.backward(g, x, w, label, margin=4, beta=1.0))

    def misaligned(a: np.ndarray) -> np.ndarray:  # same values, base address off by one element
        buf = np.empty(a.size + 1, dtype=a.dtype)
        out = buf[1:].reshape(a.shape)
        out[...] = a
        assert out.ctypes.data % 16 != 0
        return out

    other = EmuBackend(emu)
    # Another problem first, so the workspace holds stale per-class entries of a different call.
    x2, w2, label2, g2 = _case(3, 80, 9, d, dtype)
    other.backward(g2, x2, w2, label2, margin=2, beta=0.0)
    got = (
        other.forward(misaligned(x), misaligned(w), label, margin=4, beta=1.0),
        *other.backward(misaligned(g), misaligned(x), misaligned(w), label, margin=4, beta=1.0),
    )
    for a, b_ in zip(want, got):
        _assert_bitwise(a, b_)
    again = (b.forward(x, w, label, margin=4, beta=1.0), *b.backward(g, x, w, label, margin=4, beta=1.0))
    for a, b_ in zip(want, again):
        _assert_bitwise(a, b_)


def test_reused_workspace_with_other_labels(emu) -> None:
    """A class's first sample moves between calls on one workspace (what a CUDA-graph
    replay with new labels does): the per-class table is cleared every call."""
    x, w, label, g = _case(20, 90, 6, 11, np.float64)
    b = EmuBackend(emu)
    for seed in range(4):
        perm = np.random.default_rng(seed).permutation(len(label))
        got = b.backward(g, x, w, label[perm], margin=3, beta=0.2)
        want = EmuBackend(emu).backward(g, x, w, label[perm], margin=3, beta=0.2)
        for a, b_ in zip(got, want):
            _assert_bitwise(a, b_)


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64, np.uint8, np.int16, np.uint64])
def test_label_dtypes(emu, label_dtype) -> None:
    x, w, label, g = _case(4, 20, 5, 7, np.float64)
    b = EmuBackend(emu)
    want = (b.forward(x, w, label, margin=2, beta=0.0), *b.backward(g, x, w, label, margin=2, beta=0.0))
    lab = label.astype(label_dtype)
    got = (b.forward(x, w, lab, margin=2, beta=0.0), *b.backward(g, x, w, lab, margin=2, beta=0.0))
    for a, b_ in zip(want, got):
        _assert_bitwise(a, b_)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6, 64])
def test_nasty_cases(emu, dtype, m) -> None:
    x, w, label = nasty_rows(dtype, m)
    g = _rand(np.random.default_rng(m), (len(x), len(w)), dtype)
    b = EmuBackend(emu)
    for beta in (0.0, 7.0):
        out = b.forward(x, w, label, margin=m, beta=beta)
        assert np.all(np.isfinite(out.astype(np.float64)))
        check_forward(out, x, w, label, margin=m, beta=beta, dtype=dtype.name)
        grads = b.backward(g, x, w, label, margin=m, beta=beta)
        check_backward(grads, g, x, w, label, margin=m, beta=beta, dtype=dtype.name)


def test_float32_subnormal_inputs(emu) -> None:
    """float32 subnormals are read and written exactly (no flush to zero on the GPU either:
    the kernels convert formats with integer code, immune to CuPy's -ftz=true)."""
    x = np.array([[3e-41, -1e-40], [1e-39, 2e-39]], dtype=np.float32)
    w = np.array([[1e-3, 2e-3], [-5e-41, 4e-41]], dtype=np.float32)
    label = np.array([0, 1])
    b = EmuBackend(emu)
    for m in (2, 3):
        out = b.forward(x, w, label, margin=m, beta=0.0)
        check_forward(out, x, w, label, margin=m, beta=0.0, dtype="float32")
        assert out[0, 0] != 0.0 and abs(out[0, 0]) < np.finfo(np.float32).tiny  # a subnormal target survives


@pytest.mark.parametrize("case", list(EXTREME_NORMS))
@pytest.mark.parametrize("m, beta", [(2, 0.0), (3, 0.0), (2, 7.0), (64, 0.5)])
def test_norms_beyond_float64_range(emu, case, m, beta) -> None:
    """Finite logits and gradients when a norm overflows float64 (only a gradient whose exact
    value overflows is inf: with G = 1 and m = 2, the w_y part of grad_x is 3.3e308)."""
    x, w, s = EXTREME_NORMS[case]
    label = np.array([0])
    b = EmuBackend(emu)
    out = b.forward(x, w, label, margin=m, beta=beta)
    assert out[0, 0] == pytest.approx(ref_forward(x * s, w / s, label, margin=m, beta=beta)[0, 0], rel=1e-12)
    for gv in (2.0**-8, -0.25, 1.0):
        g = np.array([[gv]])
        grads = b.backward(g, x, w, label, margin=m, beta=beta)
        check_extreme_norms(out, grads, g, x, w, label, s, margin=m, beta=beta)
        if gv == 2.0**-8:
            assert all(np.all(np.isfinite(a)) for a in grads)


@pytest.mark.parametrize("case", ["huge_w_orthogonal", "huge_x_orthogonal"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_large_upstream_gradient_at_the_float64_limit(emu, case, beta) -> None:
    """|G| = 4 with a row of norm 2^1021 at a right angle (m = 2: psi' = 0): the exact
    gradients (up to 2^1023) and the GEMMs are finite, G times the row's power of two is
    not, and must not be formed."""
    x, w, s = EXTREME_NORMS[case]
    label = np.array([0])
    b = EmuBackend(emu)
    out = b.forward(x, w, label, margin=2, beta=beta)
    for gv in (4.0, -4.0):
        g = np.array([[gv]])
        grads = b.backward(g, x, w, label, margin=2, beta=beta)
        assert all(np.all(np.isfinite(a)) for a in grads)
        check_extreme_norms(out, grads, g, x, w, label, s, margin=2, beta=beta)


@pytest.mark.parametrize("huge_g", [0.0, 0.25, -0.25])
@pytest.mark.parametrize("m, beta", [(2, 0.0), (3, 0.0), (5, 0.5)])
def test_norms_beyond_float64_range_in_a_class_of_mixed_scales(emu, huge_g, m, beta) -> None:
    """One class sums samples whose norms differ by 2^525, one of them beyond the float64
    range: its grad_w row is finite and accurate although parts of the huge sample's share
    (g·(psi'-1)·x and the w_y term, 2e308 at m = 3) overflow on their own, and the small
    samples' share stays accurate when the huge one's G is 0 (it still sets the scale)."""
    x, w, label, s = mixed_scale_class()
    g = _rand(np.random.default_rng(m), (len(x), len(w)), np.float64) * 2.0**-8
    g[0, 0] = huge_g
    b = EmuBackend(emu)
    out = b.forward(x, w, label, margin=m, beta=beta)
    grads = b.backward(g, x, w, label, margin=m, beta=beta)
    assert all(np.all(np.isfinite(a)) for a in (out, *grads))
    check_extreme_norms(out, grads, g, x, w, label, s, margin=m, beta=beta)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_inputs_unchanged(emu, dtype) -> None:
    x, w, label, g = _case(5, 30, 4, 9, dtype)
    copies = [a.copy() for a in (x, w, label, g)]
    b = EmuBackend(emu)
    b.forward(x, w, label, margin=3, beta=0.5)
    b.backward(g, x, w, label, margin=3, beta=0.5)
    for a, c in zip((x, w, label, g), copies):
        _assert_bitwise(a, c)


# ------------------------------------------------------------------ bad labels


def _decode(key: int) -> tuple[int, int]:
    return key >> 32, int(np.uint32(key & 0xFFFFFFFF).view(np.int32))


def _assert_plain(got, want, small: bool) -> None:
    """Rows left as the plain layer's: the GEMM's bits on the GEMM plan; on the small plan
    the kernel's own float64 products, which differ from NumPy's GEMM by rounding only (a
    corrected row would differ by far more)."""
    if small:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14 * float(np.max(np.abs(want))))
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("margin", [1, 3])
def test_bad_labels_are_skipped_and_recorded(emu, margin) -> None:
    n, c, d = 12, 5, 6
    x, w, label, g = _case(6, n, c, d, np.float64)
    bad = label.copy()
    bad[[3, 7, 9]] = [c, -1, c + 100]
    good = np.setdiff1d(np.arange(n), [3, 7, 9])
    small = plan.small(check_arrays(x, w, label, margin, 0.5, dtypes=DTYPES))
    b = EmuBackend(emu)

    out = b.forward(x, w, bad, margin=margin, beta=0.5)
    assert _decode(int(b.err_key[0])) == (3, c)
    assert list(b.err_rec) == [b.serial, c, plan.OP_FORWARD, 0]
    plain = gemm(x, w.T, np.float64)
    _assert_plain(out[[3, 7, 9]], plain[[3, 7, 9]], small)  # bad rows: plain layer
    if small:  # and bit for bit the products the kernel forms for a row it corrects
        for cls in (0, 1):
            relabeled = EmuBackend(emu).forward(x, w, np.where(bad == label, bad, cls), margin=margin, beta=0.5)
            keep = np.arange(c) != cls
            _assert_bitwise(out[[3, 7, 9]][:, keep], relabeled[[3, 7, 9]][:, keep])
    ref = EmuBackend(emu).forward(x[good], w, label[good], margin=margin, beta=0.5)
    _assert_bitwise(out[good], ref)

    # A later bad call does not overwrite the pending report of the first one.
    first = list(b.err_rec)
    b.backward(g, x, w, np.where(np.arange(n) == 1, -5, label), margin=margin, beta=0.5)
    assert list(b.err_rec) == first and _decode(int(b.err_key[0])) == (3, c)

    # After the host clears the record, the backward reports its own first bad index.
    b.err_key[0], b.err_rec[:] = UINT64_MAX, 0
    gx, gw = b.backward(g, x, w, bad, margin=margin, beta=0.5)
    assert _decode(int(b.err_key[0])) == (3, c)
    assert list(b.err_rec) == [b.serial, c, plan.OP_BACKWARD, 0]
    _assert_plain(gx[[3, 7, 9]], gemm(g, w, np.float64)[[3, 7, 9]], small)
    # grad_w: the good samples' exact gradient plus the bad samples' plain G^T x part.
    want_gx, want_gw = ref_backward(g[good], x[good], w, label[good], margin=margin, beta=0.5)
    want_gw = want_gw + g[[3, 7, 9]].T @ x[[3, 7, 9]]
    sx, sw = grad_scales(g, x, w, margin)
    assert_close(gx[good], want_gx, sx[good], TOLERANCES["float64"].grad, "grad_x good rows")
    assert_close(gw, want_gw, sw, TOLERANCES["float64"].grad, "grad_w")


def test_bad_label_values_saturate(emu) -> None:
    x, w, label, _ = _case(7, 4, 3, 2, np.float32)
    for value, want in [(2**40, 2**31 - 1), (-(2**40), -(2**31)), (-3, -3)]:
        b = EmuBackend(emu)
        lab = label.astype(np.int64)
        lab[2] = value
        b.forward(x, w, lab, margin=2, beta=0.0)
        assert _decode(int(b.err_key[0])) == (2, want)


def test_all_good_labels_record_nothing(emu) -> None:
    x, w, label, g = _case(8, 40, 7, 5, np.float32)
    b = EmuBackend(emu)
    b.forward(x, w, label, margin=2, beta=0.0)
    b.backward(g, x, w, label, margin=1, beta=0.0)
    b.backward(g, x, w, label, margin=5, beta=0.0)
    assert int(b.err_key[0]) == UINT64_MAX and not b.err_rec.any()


@pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes")
def test_empty_batch_and_zero_features(emu) -> None:
    b = EmuBackend(emu)
    for dtype in DTYPES:
        x, w = np.zeros((0, 3), dtype), np.ones((4, 3), dtype)
        assert b.forward(x, w, np.zeros(0, np.int64), margin=3, beta=0.0).shape == (0, 4)
        x, w, label, g = (
            np.zeros((3, 0), dtype),
            np.zeros((4, 0), dtype),
            np.array([0, 3, 3]),
            np.ones((3, 4), dtype),
        )
        out = b.forward(x, w, label, margin=3, beta=0.0)
        gx, gw = b.backward(g, x, w, label, margin=3, beta=0.0)
        assert not out.astype(np.float64).any() and gx.shape == (3, 0) and gw.shape == (4, 0)
