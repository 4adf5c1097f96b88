"""lsoftmax_core.adapters.jax against the float64 reference, under eager, jit, grad and vmap."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import lsoftmax_core
from lsoftmax_core.adapters.jax import lsoftmax

from support.jax_gpu import jax_gpu
from support.tolerances import check_backward, check_forward

# A failing callback makes JAX log the traceback before re-raising; the tests check the raise.
logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)

DTYPES = ["float32", "float64"]
# A run-time error in a callback surfaces as JAX's wrapper carrying the core's message.
RUNTIME_ERRORS = (ValueError, jax.errors.JaxRuntimeError)


def _problem(rng, n, c, d, dtype, scale_x=1.0, scale_w=1.0):
    x = (rng.standard_normal((n, d)) * scale_x).astype(dtype)
    w = (rng.standard_normal((c, d)) * scale_w).astype(dtype)
    label = rng.integers(0, c, n).astype(np.int32)
    return x, w, label


def _nasty(dtype):
    """Angles on and around the k*pi/m boundaries, |cos| = 1, cos = 0, zero rows, big/small norms."""
    m = 3
    thetas = [0.0, math.pi / 3, 2 * math.pi / 3, math.pi, math.pi / 2, 1e-4, math.pi - 1e-4]
    x = np.array([[math.cos(t), math.sin(t)] for t in thetas] + [[0.0, 0.0], [2.0, -1.0]])
    w = np.array([[1.0, 0.0], [0.0, 0.0], [-0.5, 2.0]])
    label = np.array([0] * len(thetas) + [0, 1], dtype=np.int32)
    big = 1e15 if dtype == "float32" else 1e150
    x_scaled = x * np.where(np.arange(len(x)) % 2, big, 1.0 / big)[:, None]
    return [(x.astype(dtype), w.astype(dtype), label, m), (x_scaled.astype(dtype), w.astype(dtype), label, m)]


def _run(x, w, label, margin, beta, grad_logits, jit):
    def f(x, w, label, beta):
        return lsoftmax(x, w, label, margin=margin, beta=beta)

    if jit:
        f = jax.jit(f)
    logits, vjp = jax.vjp(lambda x, w: f(x, w, label, beta), jnp.asarray(x), jnp.asarray(w))
    return np.asarray(logits), tuple(np.asarray(g) for g in vjp(jnp.asarray(grad_logits)))


def _check_case(x, w, label, margin, beta, dtype, rng):
    g = rng.standard_normal((x.shape[0], w.shape[0])).astype(dtype)
    eager = _run(x, w, label, margin, beta, g, jit=False)
    jitted = _run(x, w, label, margin, beta, g, jit=True)
    check_forward(eager[0], x, w, label, margin=margin, beta=beta, dtype=dtype)
    check_backward(eager[1], g, x, w, label, margin=margin, beta=beta, dtype=dtype)
    # The same NumPy code on the same buffers: jit and eager agree bit for bit.
    np.testing.assert_array_equal(jitted[0], eager[0])
    np.testing.assert_array_equal(jitted[1][0], eager[1][0])
    np.testing.assert_array_equal(jitted[1][1], eager[1][1])


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 5),
    d=st.integers(1, 5),
    margin=st.integers(1, 6),
    beta=st.sampled_from([0.0, 0.5, 7.0, 1000.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference_eager_and_jit(dtype, n, c, d, margin, beta, seed):
    rng = np.random.default_rng(seed)
    with jax.enable_x64(dtype == "float64"):
        _check_case(*_problem(rng, n, c, d, dtype), margin, beta, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_nasty_cases(dtype, beta):
    rng = np.random.default_rng(0)
    with jax.enable_x64(dtype == "float64"):
        for x, w, label, margin in _nasty(dtype):
            _check_case(x, w, label, margin, beta, dtype, rng)
        # One sample, one class.
        x, w, label = _problem(rng, 1, 1, 3, dtype)
        _check_case(x, w, label, 4, beta, dtype, rng)


def test_empty_batch():
    x = jnp.zeros((0, 3))
    w = jnp.ones((2, 3))
    label = jnp.zeros((0,), jnp.int32)
    logits, vjp = jax.vjp(lambda x, w: lsoftmax(x, w, label), x, w)
    grad_x, grad_w = vjp(jnp.zeros((0, 2)))
    assert logits.shape == (0, 2) and grad_x.shape == (0, 3)
    np.testing.assert_array_equal(np.asarray(grad_w), np.zeros((2, 3)))


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_check_grads_float64(margin, beta):
    rng = np.random.default_rng(margin)
    with jax.enable_x64(True):
        x, w, label = _problem(rng, 5, 4, 3, "float64")
        label_j = jnp.asarray(label)

        def f(x, w):
            return lsoftmax(x, w, label_j, margin=margin, beta=beta)

        check_grads(f, (jnp.asarray(x), jnp.asarray(w)), order=1, modes=["rev"])
        check_grads(jax.jit(f), (jnp.asarray(x), jnp.asarray(w)), order=1, modes=["rev"])


def test_beta_is_traced_and_constant():
    rng = np.random.default_rng(1)
    x, w, label = (jnp.asarray(a) for a in _problem(rng, 6, 4, 3, "float32"))

    @jax.jit
    def loss(x, w, beta):
        return jnp.sum(jnp.tanh(lsoftmax(x, w, label, margin=4, beta=beta)))

    for beta in (100.0, 50.0, 1.5, 0.0):
        got = lsoftmax(x, w, label, margin=4, beta=beta)
        check_forward(got, x, w, label, margin=4, beta=beta, dtype="float32")
        np.testing.assert_allclose(float(loss(x, w, beta)), float(jnp.sum(jnp.tanh(got))), rtol=1e-6)
    # One compiled computation for every beta: beta is an operand, not a static argument.
    assert loss._cache_size() == 1
    # beta is a hyper-parameter: no gradient flows to it.
    assert float(jax.grad(loss, argnums=2)(x, w, 3.0)) == 0.0
    # A jax scalar (e.g. a schedule value computed on device) is accepted too.
    beta_dev = jnp.float32(2.5)
    check_forward(
        lsoftmax(x, w, label, margin=4, beta=beta_dev), x, w, label, margin=4, beta=2.5, dtype="float32"
    )


def test_new_beta_eager_does_not_recompile(caplog):
    rng = np.random.default_rng(2)
    x, w, label = (jnp.asarray(a) for a in _problem(rng, 4, 3, 2, "float32"))
    jax.block_until_ready(jax.grad(lambda x: lsoftmax(x, w, label, beta=0.1).sum())(x))  # warm up
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        for beta in (0.2, 0.3):
            jax.block_until_ready(jax.grad(lambda x, beta=beta: lsoftmax(x, w, label, beta=beta).sum())(x))
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert not [m for m in compiled if "buffer_callback" in m], compiled


def test_vmap_maps_independent_problems():
    rng = np.random.default_rng(3)
    b, n, c, d, margin = 3, 5, 4, 3, 3
    xs = jnp.asarray(rng.standard_normal((b, n, d)).astype(np.float32))
    ws = jnp.asarray(rng.standard_normal((b, c, d)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, c, (b, n)).astype(np.int32))
    betas = jnp.asarray([0.0, 1.0, 10.0], dtype=jnp.float32)

    def f(x, w, label, beta):
        return lsoftmax(x, w, label, margin=margin, beta=beta)

    # Everything batched: slice i is the problem (xs[i], ws[i], labels[i], betas[i]).
    for fn in (jax.vmap(f), jax.jit(jax.vmap(f))):
        got = fn(xs, ws, labels, betas)
        for i in range(b):
            np.testing.assert_array_equal(
                np.asarray(got[i]), np.asarray(f(xs[i], ws[i], labels[i], betas[i]))
            )

    # Shared w: the same as folding the batch into N.
    shared = jax.vmap(f, in_axes=(0, None, 0, None))(xs, ws[0], labels, 0.5)
    folded = f(xs.reshape(b * n, d), ws[0], labels.reshape(b * n), 0.5).reshape(b, n, c)
    np.testing.assert_array_equal(np.asarray(shared), np.asarray(folded))

    # Gradients through vmap: grad of the batched sum, and per-problem gradients.
    def loss(x, w, label):
        return jnp.sum(jnp.sin(f(x, w, label, 0.5)))

    gx, gw = jax.grad(
        lambda xs, w: jax.vmap(loss, in_axes=(0, None, 0))(xs, w, labels).sum(), argnums=(0, 1)
    )(xs, ws[0])
    gx_f, gw_f = jax.grad(loss, argnums=(0, 1))(xs.reshape(b * n, d), ws[0], labels.reshape(b * n))
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_f).reshape(b, n, d), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_f), rtol=1e-5, atol=1e-5)
    per = jax.jit(jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None, 0)))(xs, ws[0], labels)
    for i in range(b):
        np.testing.assert_allclose(
            np.asarray(per[i]), np.asarray(jax.grad(loss, argnums=1)(xs[i], ws[0], labels[i])), rtol=1e-6
        )


class _Spy:
    """Wraps the core's forward/backward to record what the adapter hands them (the real
    core runs): (name, [(pointer, writeable) of each input], [(pointer, writeable) of out])."""

    def __init__(self, monkeypatch):
        self.seen: list[tuple[str, list[tuple[int, bool]], list[tuple[int, bool]]]] = []
        for name in ("forward", "backward"):
            real = getattr(lsoftmax_core, name)
            monkeypatch.setattr(lsoftmax_core, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def spy(*arrays, out=None, **kw):
            outs = [] if out is None else [out] if name == "forward" else list(out)
            self.seen.append((name, *([(a.ctypes.data, a.flags.writeable) for a in v] for v in (arrays, outs))))
            return real(*arrays, out=out, **kw)

        return spy


def test_cpu_zero_copy_both_ways(monkeypatch):
    rng = np.random.default_rng(4)
    x, w, label = (jnp.asarray(a) for a in _problem(rng, 64, 32, 16, "float32"))
    g = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
    spy = _Spy(monkeypatch)

    @jax.jit
    def fwd_bwd(x, w, label, g):
        logits, vjp = jax.vjp(lambda x, w: lsoftmax(x, w, label), x, w)
        return logits, vjp(g)

    logits, (grad_x, grad_w) = jax.block_until_ready(fwd_bwd(x, w, label, g))
    ptr = {
        name: a.unsafe_buffer_pointer()
        for name, a in dict(x=x, w=w, label=label, g=g, logits=logits, grad_x=grad_x, grad_w=grad_w).items()
    }
    (fwd_name, fwd_in, fwd_out), (bwd_name, bwd_in, bwd_out) = spy.seen
    assert (fwd_name, bwd_name) == ("forward", "backward")
    # In: the NumPy backend reads XLA's own operand buffers (same addresses) and cannot
    # write into them.
    assert fwd_in == [(ptr["x"], False), (ptr["w"], False), (ptr["label"], False)]
    assert bwd_in == [(ptr["g"], False), (ptr["x"], False), (ptr["w"], False), (ptr["label"], False)]
    # Out: the results are computed in XLA's result buffers, which jit returns as they are.
    assert fwd_out == [(ptr["logits"], True)]
    assert bwd_out == [(ptr["grad_x"], True), (ptr["grad_w"], True)]
    check_forward(np.asarray(logits), x, w, label, margin=2, beta=0.0, dtype="float32")
    check_backward([np.asarray(grad_x), np.asarray(grad_w)], g, x, w, label, margin=2, beta=0.0, dtype="float32")


@pytest.mark.parametrize("case", range(2))
def test_the_backward_takes_the_forwards_statistics_and_gives_the_cores_bits(monkeypatch, case):
    """Under differentiation the forward callback hands the core's per-sample statistics
    (as the uint32 words of their float64 bits: exact without x64) to the backward, which
    then gives the bits of a stand-alone core backward, also on zero-norm and extreme rows."""
    x, w, label, m = _nasty("float32")[case]
    g = np.random.default_rng(case).standard_normal((len(x), len(w))).astype(np.float32)
    stats_seen = []
    real = lsoftmax_core.backward

    def spy(*arrays, stats=None, **kw):
        stats_seen.append(stats)
        return real(*arrays, stats=stats, **kw)

    monkeypatch.setattr(lsoftmax_core, "backward", spy)
    logits, (grad_x, grad_w) = _run(x, w, label, m, 0.5, g, jit=True)
    assert len(stats_seen) == 1 and stats_seen[0].shape == (lsoftmax_core.STATS_ROWS, len(x))
    want = real(g, x, w, label.astype(np.int64), margin=m, beta=0.5)
    assert np.array_equal(logits, lsoftmax_core.forward(x, w, label, margin=m, beta=0.5))
    assert np.array_equal(grad_x, want[0]) and np.array_equal(grad_w, want[1])


def test_inputs_unchanged():
    rng = np.random.default_rng(5)
    x, w, label = _problem(rng, 6, 4, 3, "float32")
    copies = [a.copy() for a in (x, w, label)]
    xj, wj, lj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(label)
    for args in ((x, w, label), (xj, wj, lj)):
        jax.block_until_ready(
            jax.grad(lambda x, w, y=args[2]: lsoftmax(x, w, y, beta=1.0).sum(), argnums=(0, 1))(*args[:2])
        )
        jax.block_until_ready(lsoftmax(*args, margin=3))
    for a, b in zip((x, w, label), copies):
        np.testing.assert_array_equal(a, b)
    for a, b in zip((xj, wj, lj), copies):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_numpy_inputs():
    rng = np.random.default_rng(6)
    x, w, label = _problem(rng, 5, 3, 4, "float32")
    check_forward(lsoftmax(x, w, label.astype(np.int64)), x, w, label, margin=2, beta=0.0, dtype="float32")
    with jax.enable_x64(True):
        x64, w64, _ = _problem(rng, 5, 3, 4, "float64")
        got = lsoftmax(x64, w64, label, beta=3.0)
        assert got.dtype == jnp.float64
        check_forward(got, x64, w64, label, margin=2, beta=3.0, dtype="float64")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"margin": 0}, ValueError, "margin"),
        ({"margin": 2.0}, TypeError, "margin"),
        ({"margin": True}, TypeError, "margin"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"beta": "1"}, TypeError, "beta"),
        ({"beta": jnp.ones(2)}, TypeError, "beta"),
        ({"x": jnp.ones(4)}, ValueError, "x must be 2-D"),
        ({"w": jnp.ones((3, 5))}, ValueError, "same feature size D"),
        ({"w": jnp.ones((0, 4))}, ValueError, "at least one class"),
        ({"label": jnp.zeros(4, jnp.int32)}, ValueError, "label must have shape"),
        ({"label": jnp.zeros(5)}, TypeError, "label must have an integer dtype"),
        ({"x": jnp.ones((5, 4), jnp.int32)}, TypeError, "x and w must have the same dtype"),
        ({"x": jnp.ones((5, 4), jnp.int32), "w": jnp.ones((3, 4), jnp.int32)}, TypeError, "not supported"),
        (
            {"x": jnp.ones((5, 4), jnp.bfloat16), "w": jnp.ones((3, 4), jnp.bfloat16)},
            TypeError,
            "not supported",
        ),
        (  # the CPU computes with the NumPy backend: its dtypes and the core's message
            {"x": jnp.ones((5, 4), jnp.float16), "w": jnp.ones((3, 4), jnp.float16)},
            TypeError,
            r"^x.dtype=float16 is not supported by this backend \(supported: float32, float64\)",
        ),
        ({"x": [[1.0] * 4] * 5}, TypeError, "x must be a jax.Array or numpy.ndarray"),
        ({"x": np.ones((5, 4)), "w": np.ones((3, 4))}, TypeError, "x.dtype=float64 needs jax_enable_x64"),
        (
            {"label": np.array([0, 1, 2, 3, 0])},
            ValueError,
            r"label must lie in \[0, C\) = \[0, 3\): label\[3\]=3",
        ),
        ({"label": np.array([0, 1, 2**33 + 1, 1, 0])}, ValueError, r"label\[2\]=8589934593"),
    ],
)
def test_argument_errors_at_call_site(kwargs, exc, match):
    args = {"x": jnp.ones((5, 4)), "w": jnp.ones((3, 4)), "label": jnp.zeros(5, jnp.int32), **kwargs}
    x, w, label = args.pop("x"), args.pop("w"), args.pop("label")
    with pytest.raises(exc, match=match):
        lsoftmax(x, w, label, **args)
    if isinstance(x, jax.Array) and isinstance(w, jax.Array) and isinstance(label, jax.Array):
        # Under jit the same error is raised while tracing, before anything runs.
        with pytest.raises(exc, match=match):
            jax.jit(lambda x, w, label: lsoftmax(x, w, label, **args)).trace(x, w, label)


def test_float64_dtype_mismatch_is_type_error():
    with jax.enable_x64(True), pytest.raises(TypeError, match="x.dtype=float32, w.dtype=float64"):
        lsoftmax(jnp.ones((2, 3), jnp.float32), jnp.ones((2, 3), jnp.float64), jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bad", [3, -1])
def test_label_out_of_range_at_run_time(jit, bad):
    x, w = jnp.ones((5, 4)), jnp.ones((3, 4))
    label = jnp.array([0, 1, 2, bad, 0], dtype=jnp.int32)

    def fwd(x, w, label):
        return lsoftmax(x, w, label)

    def bwd(x, w, label):
        return jax.grad(lambda x: lsoftmax(x, w, label).sum())(x)

    for f in (fwd, bwd):
        f = jax.jit(f) if jit else f
        with pytest.raises(RUNTIME_ERRORS, match=rf"label must lie in \[0, C\) = \[0, 3\): label\[3\]={bad}"):
            jax.block_until_ready(f(x, w, label))


def _core_results(x, w, label, g, margin, beta):
    return (
        lsoftmax_core.forward(x, w, label, margin=margin, beta=beta),
        *lsoftmax_core.backward(g, x, w, label, margin=margin, beta=beta),
    )


def _assert_same(got, want):
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("beta", [1e39, 1e300, 1.0 / 3.0, 0.1, 5e-324])
@pytest.mark.parametrize("jit", [False, True])
def test_python_beta_reaches_the_core_exactly(beta, jit):
    """A Python beta is the float64 the core computes with, also beyond float32's range
    and without x64: the results are the core's own, bit for bit."""
    rng = np.random.default_rng(11)
    x, w, label = _problem(rng, 6, 4, 3, "float32")
    g = rng.standard_normal((6, 4)).astype(np.float32)

    def fwd_bwd(x, w):
        logits, vjp = jax.vjp(lambda x, w: lsoftmax(x, w, label, margin=3, beta=beta), x, w)
        return (logits, *vjp(jnp.asarray(g)))

    got = (jax.jit(fwd_bwd) if jit else fwd_bwd)(jnp.asarray(x), jnp.asarray(w))
    want = _core_results(x, w, label, g, 3, beta)
    _assert_same(got, want)
    for a in got:
        assert np.all(np.isfinite(np.asarray(a)))
    check_forward(np.asarray(got[0]), x, w, label, margin=3, beta=beta, dtype="float32")
    check_backward([np.asarray(a) for a in got[1:]], g, x, w, label, margin=3, beta=beta, dtype="float32")


def test_traced_float64_beta_beyond_float32_range():
    """With x64 a traced beta is a float64 operand: 1e39 with float32 inputs is the core's result."""
    rng = np.random.default_rng(12)
    x, w, label = _problem(rng, 5, 3, 4, "float32")
    g = rng.standard_normal((5, 3)).astype(np.float32)
    with jax.enable_x64(True):

        @jax.jit
        def fwd_bwd(x, w, beta):
            logits, vjp = jax.vjp(lambda x, w: lsoftmax(x, w, label, margin=4, beta=beta), x, w)
            return (logits, *vjp(jnp.asarray(g)))

        for beta in (1e39, 1.0 / 3.0):
            got = fwd_bwd(jnp.asarray(x), jnp.asarray(w), jnp.float64(beta))
            _assert_same(got, _core_results(x, w, label, g, 4, beta))
        assert fwd_bwd._cache_size() == 1


def test_traced_beta_keeps_its_dtype():
    """A traced float32 beta reaches the core unrounded: the core's result for that float32 value."""
    rng = np.random.default_rng(13)
    x, w, label = _problem(rng, 5, 3, 4, "float32")
    beta = np.float32(0.1)
    got = jax.jit(lambda b: lsoftmax(x, w, label, beta=b))(jnp.float32(beta))
    np.testing.assert_array_equal(np.asarray(got), lsoftmax_core.forward(x, w, label, beta=float(beta)))


def test_traced_beta_checked_at_run_time():
    x, w, label = jnp.ones((5, 4)), jnp.ones((3, 4)), jnp.zeros(5, jnp.int32)
    f = jax.jit(lambda beta: lsoftmax(x, w, label, beta=beta))
    for bad in (-1.0, float("inf")):
        with pytest.raises(RUNTIME_ERRORS, match="beta=.* must be a finite number >= 0"):
            jax.block_until_ready(f(bad))


def test_lowering_uses_device_callbacks():
    """On each platform the computation is a buffer callback on XLA's buffers.

    On CUDA this is the custom call that hands device buffers and XLA's stream to the
    callback, not a host callback (which would copy every operand to the host and back).
    """
    x, w, label = jnp.ones((5, 4)), jnp.ones((3, 4)), jnp.zeros(5, jnp.int32)

    def fwd_bwd(x, w, beta):
        logits, vjp = jax.vjp(lambda x, w: lsoftmax(x, w, label, beta=beta), x, w)
        return logits, vjp(logits)

    traced = jax.jit(fwd_bwd).trace(x, w, 0.5)
    for platform, target in (
        ("cpu", "xla_buffer_python_cpu_callback"),
        ("cuda", "xla_buffer_python_gpu_callback"),
    ):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        calls = [line for line in text.splitlines() if "custom_call" in line]
        assert len(calls) == 2 and all(target in line for line in calls), calls


# ---------------------------------------------------------------------------------------
# GPU (CUDA): the CuPy backend on XLA's buffers and stream.  Skipped without a device.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("jit", [False, True])
def test_gpu_matches_reference(dtype, jit):
    dev = jax_gpu()
    rng = np.random.default_rng(7)
    with jax.enable_x64(dtype == "float64"):
        x, w, label = _problem(rng, 37, 11, 9, dtype)
        g = rng.standard_normal((37, 11)).astype(dtype)
        xj, wj, lj, gj = (jax.device_put(a, dev) for a in (x, w, label, g))
        for margin, beta in ((1, 0.0), (2, 0.0), (4, 5.0)):

            def f(x, w, margin=margin, beta=beta):
                return lsoftmax(x, w, lj, margin=margin, beta=beta)

            f = jax.jit(f) if jit else f
            logits, vjp = jax.vjp(f, xj, wj)
            grads = vjp(gj)
            assert logits.devices() == {dev}
            check_forward(np.asarray(logits), x, w, label, margin=margin, beta=beta, dtype=dtype)
            check_backward(
                [np.asarray(a) for a in grads], g, x, w, label, margin=margin, beta=beta, dtype=dtype
            )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("jit", [False, True])
def test_gpu_half_precision_matches_reference(dtype, jit):
    """On CUDA the adapter accepts what the CuPy backend accepts."""
    dev = jax_gpu()
    jdtype = {"float16": jnp.float16, "bfloat16": jnp.bfloat16}[dtype]
    rng = np.random.default_rng(14)
    x, w, label = _problem(rng, 37, 11, 9, "float32")
    g = rng.standard_normal((37, 11)).astype(np.float32)
    xj, wj, gj = (jax.device_put(jnp.asarray(a, dtype=jdtype), dev) for a in (x, w, g))
    lj = jax.device_put(label, dev)
    # The reference sees the values the device computes with.
    xr, wr, gr = (np.asarray(a.astype(jnp.float32)) for a in (xj, wj, gj))
    if np.dtype(jdtype) not in lsoftmax_core.supported_dtypes("cupy"):
        with pytest.raises(TypeError, match=f"x.dtype={dtype} is not supported"):
            lsoftmax(xj, wj, lj)
        return
    for margin, beta in ((1, 0.0), (2, 0.0), (4, 5.0)):

        def f(x, w, margin=margin, beta=beta):
            return lsoftmax(x, w, lj, margin=margin, beta=beta)

        f = jax.jit(f) if jit else f
        logits, vjp = jax.vjp(f, xj, wj)
        grads = vjp(gj)
        assert logits.dtype == jdtype and logits.devices() == {dev}
        as64 = [np.asarray(a.astype(jnp.float32)) for a in (logits, *grads)]
        check_forward(as64[0], xr, wr, label, margin=margin, beta=beta, dtype=dtype)
        check_backward(as64[1:], gr, xr, wr, label, margin=margin, beta=beta, dtype=dtype)


@pytest.mark.gpu
def test_gpu_python_beta_beyond_float32_range():
    dev = jax_gpu()
    rng = np.random.default_rng(15)
    x, w, label = _problem(rng, 9, 5, 3, "float32")
    xj, wj, lj = (jax.device_put(a, dev) for a in (x, w, label))
    got = jax.jit(lambda x, w: lsoftmax(x, w, lj, margin=3, beta=1e39))(xj, wj)
    check_forward(np.asarray(got), x, w, label, margin=3, beta=1e39, dtype="float32")


@pytest.mark.gpu
def test_gpu_operands_are_device_views_on_xla_stream(monkeypatch):
    import cupy

    dev = jax_gpu()
    rng = np.random.default_rng(8)
    x, w, label = (jax.device_put(a, dev) for a in _problem(rng, 16, 8, 4, "float32"))
    seen = []
    real = lsoftmax_core.forward

    def spy(x, w, label, *, out, **kw):
        seen.append((type(x), out.data.ptr, x.data.ptr, w.data.ptr, label.data.ptr, cupy.cuda.get_current_stream().ptr))
        return real(x, w, label, out=out, **kw)

    monkeypatch.setattr(lsoftmax_core, "forward", spy)
    logits = jax.block_until_ready(jax.jit(lambda x, w, label: lsoftmax(x, w, label))(x, w, label))
    ((kind, po, px, pw, pl, stream),) = seen
    assert kind is cupy.ndarray
    assert (po, px, pw, pl) == (
        logits.unsafe_buffer_pointer(),
        x.unsafe_buffer_pointer(),
        w.unsafe_buffer_pointer(),
        label.unsafe_buffer_pointer(),
    )
    check_forward(np.asarray(logits), *(np.asarray(a) for a in (x, w, label)), margin=2, beta=0.0, dtype="float32")
    assert stream != 0  # XLA's compute stream, not CuPy's legacy default stream


@pytest.mark.gpu
def test_gpu_vmap_and_label_error():
    dev = jax_gpu()
    rng = np.random.default_rng(9)
    xs = jax.device_put(rng.standard_normal((2, 5, 3)).astype(np.float32), dev)
    w = jax.device_put(rng.standard_normal((4, 3)).astype(np.float32), dev)
    labels = jax.device_put(rng.integers(0, 4, (2, 5)).astype(np.int32), dev)
    got = jax.jit(jax.vmap(lambda x, y: lsoftmax(x, w, y, margin=3), in_axes=(0, 0)))(xs, labels)
    for i in range(2):
        check_forward(
            np.asarray(got[i]),
            np.asarray(xs[i]),
            np.asarray(w),
            np.asarray(labels[i]),
            margin=3,
            beta=0.0,
            dtype="float32",
        )
    bad = jax.device_put(np.array([0, 1, 4, 0, 0], dtype=np.int32), dev)
    # On CUDA the core checks labels on the device without synchronising: the computation
    # completes, and the error is reported by the next call on that device or, at once, by
    # check_labels() (which also clears it, so that it cannot fail a later test).
    jax.block_until_ready(jax.jit(lambda x: lsoftmax(x, w, bad))(xs[0]))
    with pytest.raises(ValueError, match=r"label\[2\]=4"):
        lsoftmax_core.check_labels()
