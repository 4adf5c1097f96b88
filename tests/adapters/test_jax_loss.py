"""lsoftmax_core.adapters.jax.lsoftmax_cross_entropy against the float64 reference and the
unfused JAX composition, under eager, jit, grad and vmap."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp

import lsoftmax_core
from lsoftmax_core.adapters.jax import lsoftmax, lsoftmax_cross_entropy

from support import reference
from support.jax_gpu import jax_gpu
from support.tolerances import TOLERANCES, check_backward, logit_scale

# A failing callback makes JAX log the traceback before re-raising; the tests check the raise.
logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)

IGNORE = -100
REDUCTIONS = ["mean", "sum", "none"]
RUNTIME_ERRORS = (ValueError, jax.errors.JaxRuntimeError)


def _problem(rng, n, c, d, dtype="float64", scale=1.0):
    """x, w and int32 labels with two ignored rows and duplicated labels (where N allows)."""
    x = (rng.standard_normal((n, d)) * scale).astype(dtype)
    w = rng.standard_normal((c, d)).astype(dtype)
    label = rng.integers(0, c, n).astype(np.int32)
    if n >= 8:
        label[[1, 4]] = IGNORE
        label[5:8] = label[0]
    return x, w, label


def _cotangent(rng, n, reduction):
    return rng.standard_normal(n) if reduction == "none" else np.float64(rng.standard_normal())


def _expected(x, w, label, cot, *, margin, beta, reduction, ignore_index=IGNORE):
    """float64 loss and its VJP (grad_x, grad_w) for the cotangent ``cot``: log-softmax
    cross-entropy over support.reference's logits, the gradient through its backward."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    kept = np.asarray(label) != ignore_index
    target = np.where(kept, label, 0)
    rows = np.arange(len(target))
    f = reference.forward(x, w, target, margin=margin, beta=beta)
    shift = f.max(axis=1, initial=-np.inf)[:, None] if f.size else np.zeros((len(f), 1))
    e = np.exp(f - shift)
    softmax = e / e.sum(axis=1, keepdims=True)
    per_row = np.where(kept, np.log(e.sum(axis=1)) + shift[:, 0] - f[rows, target], 0.0)
    weight = kept * np.asarray(cot, np.float64)  # d(loss)/d(per_row) times the cotangent
    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        count = int(kept.sum())
        loss = per_row.sum() / count if count else 0.0
        weight = weight / max(count, 1)
    grad_logits = softmax
    grad_logits[rows, target] -= 1.0
    grad_logits *= weight[:, None]
    return (
        np.asarray(loss),
        *reference.backward(grad_logits, x, w, target, margin=margin, beta=beta),
    ), grad_logits


def _loss_and_vjp(x, w, label, cot, *, jit, **kw):
    def run(x, w, beta):
        loss, vjp = jax.vjp(lambda x, w: lsoftmax_cross_entropy(x, w, label, beta=beta, **kw), x, w)
        return (loss, *vjp(jnp.asarray(cot, dtype=x.dtype)))

    beta = kw.pop("beta")
    if jit:
        return jax.jit(run)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(beta, dtype=x.dtype))
    return run(jnp.asarray(x), jnp.asarray(w), beta)


def _assert_rel(actual, expected, rtol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    err = float(np.abs(actual - expected).max(initial=0.0)) / scale
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", [1, 2, 3, 4, 5, 6])
def test_float64_equals_the_reference(margin, reduction):
    """Loss and VJP to 1e-10 of the float64 reference, with ignored rows and duplicate
    labels, for a random cotangent; eagerly with a Python beta and under jit with a
    traced one."""
    rng = np.random.default_rng(margin * 10 + REDUCTIONS.index(reduction))
    with jax.enable_x64(True):
        x, w, label = _problem(rng, 11, 7, 5, scale=3.0)
        for beta in (0.0, 3.0, 1000.0):
            cot = _cotangent(rng, 11, reduction)
            want, _ = _expected(x, w, label, cot, margin=margin, beta=beta, reduction=reduction)
            for jit in (False, True):
                got = _loss_and_vjp(x, w, label, cot, jit=jit, margin=margin, beta=beta, reduction=reduction)
                assert got[0].dtype == jnp.float64
                for name, a, b in zip(("loss", "grad_x", "grad_w"), got, want):
                    _assert_rel(a, b, 1e-10, f"{name} m={margin} beta={beta} {reduction} jit={jit}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_class_chunks_equal_the_reference(reduction, monkeypatch):
    """The core's class-chunked path (a tiny memory budget): four GEMMs, and for "none" the
    backward from the forward's log-sum-exp."""
    monkeypatch.setenv("LSOFTMAX_CE_BUDGET", "64")
    rng = np.random.default_rng(21)
    with jax.enable_x64(True):
        x, w, label = _problem(rng, 10, 6, 4, scale=4.0)
        cot = _cotangent(rng, 10, reduction)
        want, _ = _expected(x, w, label, cot, margin=4, beta=0.5, reduction=reduction)
        got = _loss_and_vjp(x, w, label, cot, jit=True, margin=4, beta=0.5, reduction=reduction)
        for name, a, b in zip(("loss", "grad_x", "grad_w"), got, want):
            _assert_rel(a, b, 1e-10, f"{name} {reduction}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_equals_the_unfused_composition(reduction):
    """The fused loss is jax.nn.log_softmax cross-entropy over lsoftmax's logits, value and
    gradients (torch's ignore_index semantics: ignored rows drop out of sum and mean)."""
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        x, w, label = (jnp.asarray(a) for a in _problem(rng, 12, 6, 4, scale=2.0))
        weights = jnp.asarray(rng.standard_normal(12))
        kept = label != IGNORE
        target = jnp.where(kept, label, 0)

        def unfused(x, w):
            logp = jax.nn.log_softmax(lsoftmax(x, w, target, margin=4, beta=2.5))
            per_row = jnp.where(kept, -jnp.take_along_axis(logp, target[:, None], axis=1)[:, 0], 0.0)
            return {"mean": per_row.sum() / kept.sum(), "sum": per_row.sum(), "none": per_row}[reduction]

        def fused(x, w):
            return lsoftmax_cross_entropy(x, w, label, margin=4, beta=2.5, reduction=reduction)

        def scalar(f):
            return lambda x, w: jnp.sum(f(x, w) * (weights if reduction == "none" else 1.0))

        _assert_rel(fused(x, w), unfused(x, w), 1e-10, "loss")
        got = jax.jit(jax.grad(scalar(fused), argnums=(0, 1)))(x, w)
        want = jax.grad(scalar(unfused), argnums=(0, 1))(x, w)
        _assert_rel(got[0], want[0], 1e-10, "grad_x")
        _assert_rel(got[1], want[1], 1e-10, "grad_w")


@pytest.mark.parametrize(("n", "c"), [(1, 1), (1, 6), (6, 1), (0, 3)])
def test_one_sample_one_class_and_an_empty_batch(n, c):
    rng = np.random.default_rng(n * 10 + c)
    with jax.enable_x64(True):
        x, w, label = _problem(rng, n, c, 3)
        for reduction in REDUCTIONS:
            cot = _cotangent(rng, n, reduction)
            want, _ = _expected(x, w, label, cot, margin=3, beta=0.5, reduction=reduction)
            got = _loss_and_vjp(x, w, label, cot, jit=False, margin=3, beta=0.5, reduction=reduction)
            for a, b in zip(got, want):
                np.testing.assert_allclose(np.asarray(a), b, rtol=1e-10, atol=1e-12)


def test_an_all_ignored_batch_gives_zero_loss_and_gradients():
    rng = np.random.default_rng(8)
    x, w, _ = _problem(rng, 5, 4, 3, "float32")
    label = np.full(5, 7, np.int32)
    for reduction in REDUCTIONS:
        got = _loss_and_vjp(x, w, label, _cotangent(rng, 5, reduction), jit=True, beta=1.0,
                            reduction=reduction, ignore_index=7)  # fmt: skip
        for a in got:
            assert np.all(np.asarray(a) == 0.0), reduction


def test_ignore_index_can_be_a_class():
    """ignore_index drops the rows with that label, whatever its value."""
    rng = np.random.default_rng(9)
    x, w, label = _problem(rng, 10, 4, 3, "float32")
    label[:] = rng.integers(0, 4, 10)
    kept = label != 2
    got = lsoftmax_cross_entropy(x, w, label, margin=3, reduction="none", ignore_index=2)
    sub = lsoftmax_cross_entropy(x[kept], w, label[kept], margin=3, reduction="none")
    np.testing.assert_array_equal(np.asarray(got)[~kept], 0.0)
    np.testing.assert_allclose(np.asarray(got)[kept], np.asarray(sub), rtol=1e-6)


def test_float32_within_the_tolerance_table():
    rng = np.random.default_rng(2)
    x, w, label = _problem(rng, 64, 50, 16, "float32", scale=2.0)
    tol = TOLERANCES["float32"]
    for reduction in REDUCTIONS:
        cot = _cotangent(rng, 64, reduction)
        want, grad_logits = _expected(x, w, label, cot, margin=4, beta=1.0, reduction=reduction)
        got = _loss_and_vjp(x, w, label, cot, jit=True, margin=4, beta=1.0, reduction=reduction)
        assert all(a.dtype == jnp.float32 for a in got)
        # A row's loss moves by at most its largest logit error: the forward tolerance.
        row_scale = logit_scale(x, w, 4).max(axis=1)
        kept = label != IGNORE
        per_row = np.abs(np.asarray(cot)) * (row_scale if reduction == "none" else row_scale / kept.sum())
        bound = 2 * tol.forward * (per_row if reduction == "none" else np.sum(per_row * kept))
        assert np.all(np.abs(np.asarray(got[0], np.float64) - want[0]) <= bound), reduction
        check_backward(
            got[1:], grad_logits, x, w, np.where(kept, label, 0), margin=4, beta=1.0, dtype="float32"
        )


def test_grad_under_jit_with_a_traced_beta_compiles_once():
    rng = np.random.default_rng(1)
    x, w, label = (jnp.asarray(a) for a in _problem(rng, 9, 5, 4, "float32"))

    @jax.jit
    def step(x, w, beta):
        return jax.value_and_grad(lambda x, w: lsoftmax_cross_entropy(x, w, label, margin=4, beta=beta),
                                  argnums=(0, 1))(x, w)  # fmt: skip

    for beta in (100.0, 50.0, 1.5, 0.0):
        loss, (gx, gw) = step(x, w, beta)
        want = lsoftmax_core.cross_entropy_with_grad(np.asarray(x), np.asarray(w), np.asarray(label),
                                                     margin=4, beta=float(np.float32(beta)))  # fmt: skip
        for a, b in zip((loss, gx, gw), want):
            np.testing.assert_array_equal(np.asarray(a), b)  # the core's own bits (cotangent 1)
    # One compiled computation for every beta: beta is an operand, not a static argument.
    assert step._cache_size() == 1
    # beta is a hyper-parameter: no gradient flows to it.
    grad_beta = jax.grad(lambda b: lsoftmax_cross_entropy(x, w, label, margin=4, beta=b))(jnp.float32(3.0))
    assert float(grad_beta) == 0.0


def _callback_results(lowered_text):
    """The result types of each buffer callback in a lowered computation."""
    calls = [line for line in lowered_text.splitlines() if "xla_buffer_python_cpu_callback" in line]
    return [line.rsplit("->", 1)[1].strip() for line in calls]


def test_the_primal_computes_the_loss_alone_and_grad_does_not_recompute():
    """Without differentiation one callback returns the loss only; jax.grad with mean/sum is
    still one callback (loss and gradients in one pass, the backward only scales them);
    with none a second callback computes the gradients from the kept log-sum-exp."""
    x, w, label = jnp.ones((7, 4)), jnp.ones((5, 4)), jnp.zeros(7, jnp.int32)
    for reduction, primal, grad in (
        ("mean", ["tensor<f32>"], ["(tensor<f32>, tensor<7x4xf32>, tensor<5x4xf32>)"]),
        ("sum", ["tensor<f32>"], ["(tensor<f32>, tensor<7x4xf32>, tensor<5x4xf32>)"]),
        (
            "none",
            ["tensor<7xf32>"],
            ["(tensor<7xf32>, tensor<7x2xui32>)", "(tensor<7x4xf32>, tensor<5x4xf32>)"],
        ),
    ):

        def f(x, w, reduction=reduction):
            return jnp.sum(lsoftmax_cross_entropy(x, w, label, reduction=reduction))

        assert _callback_results(jax.jit(f).lower(x, w).as_text()) == primal
        assert _callback_results(jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text()) == grad


@pytest.mark.parametrize("beta", [1e39, 1.0 / 3.0, 5e-324])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("budget", [None, "64"], ids=["default-plan", "class-chunks"])
def test_python_beta_reaches_the_core_exactly(beta, reduction, budget, monkeypatch):
    """A Python beta is the float64 the core computes with, also beyond float32's range and
    without x64: loss and gradients are the core's own, bit for bit, eager and under jit.
    A tiny LSOFTMAX_CE_BUDGET makes the core chunk by classes, whose backward reads the
    log-sum-exp that "none" keeps from the forward: it arrives exactly."""
    if budget is not None:
        monkeypatch.setenv("LSOFTMAX_CE_BUDGET", budget)
    rng = np.random.default_rng(11)
    x, w, label = _problem(rng, 9, 4, 3, "float32")
    cot = np.ones(9, np.float32) if reduction == "none" else np.float32(1.0)
    kw = dict(margin=3, beta=beta, reduction=reduction)
    want = (
        lsoftmax_core.cross_entropy(x, w, label, **kw),
        *lsoftmax_core.cross_entropy_backward(cot, x, w, label, **kw),
    )

    def run(x, w):
        loss, vjp = jax.vjp(lambda x, w: lsoftmax_cross_entropy(x, w, label, **kw), x, w)
        return (loss, *vjp(jnp.asarray(cot)))

    for f in (run, jax.jit(run)):
        got = f(jnp.asarray(x), jnp.asarray(w))
        for a, b in zip(got, want):
            assert np.all(np.isfinite(np.asarray(a)))
            np.testing.assert_array_equal(np.asarray(a), b)


def test_vmap_maps_independent_problems():
    rng = np.random.default_rng(3)
    b = 3
    problems = [_problem(rng, 8, 4, 3, "float32") for _ in range(b)]
    xs, ws, labels = (jnp.asarray(np.stack(a)) for a in zip(*problems))
    betas = jnp.asarray([0.0, 1.0, 10.0], jnp.float32)

    def loss(x, w, label, beta):
        return lsoftmax_cross_entropy(x, w, label, margin=3, beta=beta)

    got = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=1)))(xs, ws, labels, betas)
    for i in range(b):
        want = jax.value_and_grad(loss, argnums=1)(xs[i], ws[i], labels[i], betas[i])
        np.testing.assert_array_equal(np.asarray(got[0][i]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1][i]), np.asarray(want[1]))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"reduction": "avg"}, ValueError, r"reduction='avg' must be one of \('mean', 'sum', 'none'\)"),
        ({"reduction": None}, ValueError, "reduction=None"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index=1.5 must be an integer"),
        ({"ignore_index": True}, TypeError, "ignore_index=True must be an integer"),
        ({"ignore_index": 2**63}, ValueError, "ignore_index=.* must be an integer in"),
        ({"margin": 0}, ValueError, "margin"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"beta": jnp.ones(2)}, TypeError, "beta"),
        ({"x": jnp.ones(4)}, ValueError, "x must be 2-D"),
        ({"w": jnp.ones((3, 5))}, ValueError, "same feature size D"),
        ({"label": jnp.zeros(4, jnp.int32)}, ValueError, "label must have shape"),
        ({"label": jnp.zeros(5)}, TypeError, "label must have an integer dtype"),
        (
            {"x": jnp.ones((5, 4), jnp.float16), "w": jnp.ones((3, 4), jnp.float16)},
            TypeError,
            r"^x.dtype=float16 is not supported by this backend",
        ),
        ({"x": [[1.0] * 4] * 5}, TypeError, "x must be a jax.Array or numpy.ndarray"),
        (
            {"label": np.array([0, IGNORE, 2, 3, 0])},
            ValueError,
            r"label must lie in \[0, C\) = \[0, 3\) or equal ignore_index=-100: label\[3\]=3",
        ),
    ],
)
def test_argument_errors_name_the_argument(kwargs, exc, match):
    args = {"x": jnp.ones((5, 4)), "w": jnp.ones((3, 4)), "label": jnp.zeros(5, jnp.int32), **kwargs}
    x, w, label = args.pop("x"), args.pop("w"), args.pop("label")
    with pytest.raises(exc, match=match):
        lsoftmax_cross_entropy(x, w, label, **args)
    if all(isinstance(a, jax.Array) for a in (x, w, label)):
        # Under jit the same error is raised while tracing, before anything runs.
        with pytest.raises(exc, match=match):
            jax.jit(lambda x, w, label: lsoftmax_cross_entropy(x, w, label, **args)).trace(x, w, label)


@pytest.mark.parametrize("jit", [False, True])
def test_label_and_beta_values_checked_at_run_time(jit):
    x, w = jnp.ones((5, 4)), jnp.ones((3, 4))

    def maybe_jit(f):
        return jax.jit(f) if jit else f

    label = jnp.array([0, IGNORE, 2, 3, 0], dtype=jnp.int32)
    for reduction in REDUCTIONS:
        f = maybe_jit(
            jax.grad(lambda x, r=reduction: jnp.sum(lsoftmax_cross_entropy(x, w, label, reduction=r)))
        )
        with pytest.raises(RUNTIME_ERRORS, match=r"or equal ignore_index=-100: label\[3\]=3"):
            jax.block_until_ready(f(x))
    good = jnp.zeros(5, jnp.int32)
    f = maybe_jit(lambda beta: lsoftmax_cross_entropy(x, w, good, beta=beta))
    with pytest.raises(RUNTIME_ERRORS, match="beta=.* must be a finite number >= 0"):
        jax.block_until_ready(f(jnp.float32(-1.0)))


def test_numpy_int64_labels_and_an_ignore_index_beyond_int32():
    """Without x64 JAX narrows int64 labels to int32: an ignore_index that int32 cannot
    hold is refused when labels carry it (narrowing would make those rows a class), and
    works with x64."""
    x, w = np.ones((3, 2), np.float32), np.ones((4, 2), np.float32)
    label = np.array([1, 2**40, 3], dtype=np.int64)
    with pytest.raises(TypeError, match="ignore_index=1099511627776 needs jax_enable_x64"):
        lsoftmax_cross_entropy(x, w, label, ignore_index=2**40)
    with jax.enable_x64(True):
        got = lsoftmax_cross_entropy(x, w, label, ignore_index=2**40, reduction="none")
        assert float(got[1]) == 0.0 and float(got[0]) > 0.0
    # Labels in range are narrowed safely; -100 fits int32.
    label = np.array([1, IGNORE, 3], dtype=np.int64)
    np.testing.assert_array_equal(
        np.asarray(lsoftmax_cross_entropy(x, w, label, reduction="none")),
        lsoftmax_core.cross_entropy(x, w, label, reduction="none"),
    )


# ---------------------------------------------------------------------------------------
# GPU (CUDA): the core's CuPy cross-entropy on XLA's buffers and stream, through the same
# callback as lsoftmax.  Skipped without a device (never run here).


def _on_gpu(item):
    return next(iter(item.devices())).platform in ("gpu", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin,beta", [(1, 0.0), (2, 0.0), (4, 2.5), (6, 1000.0)])
@pytest.mark.parametrize("jit", [False, True])
def test_gpu_float64_equals_the_unfused_composition(margin, beta, reduction, jit):
    """On CUDA, fused = log_softmax over lsoftmax's logits to 1e-10, loss and VJP, with
    ignored rows and duplicate labels; eagerly with a Python beta, under jit a traced one."""
    dev = jax_gpu()
    rng = np.random.default_rng(margin * 10 + REDUCTIONS.index(reduction))
    with jax.enable_x64(True):
        x, w, label = (jax.device_put(a, dev) for a in _problem(rng, 33, 17, 9, scale=3.0))
        cot = jax.device_put(jnp.asarray(_cotangent(rng, 33, reduction)), dev)
        kept = label != IGNORE
        target = jnp.where(kept, label, 0)

        def unfused(x, w, beta):
            logp = jax.nn.log_softmax(lsoftmax(x, w, target, margin=margin, beta=beta))
            per_row = jnp.where(kept, -jnp.take_along_axis(logp, target[:, None], axis=1)[:, 0], 0.0)
            return {"mean": per_row.sum() / kept.sum(), "sum": per_row.sum(), "none": per_row}[reduction]

        def fused(x, w, beta):
            return lsoftmax_cross_entropy(x, w, label, margin=margin, beta=beta, reduction=reduction)

        def loss_and_vjp(f, beta):
            def run(x, w, beta):
                loss, vjp = jax.vjp(lambda x, w: f(x, w, beta), x, w)
                return (loss, *vjp(cot))

            if jit:
                return jax.jit(run)(x, w, jax.device_put(jnp.float64(beta), dev))
            return run(x, w, beta)

        got, want = loss_and_vjp(fused, beta), loss_and_vjp(unfused, beta)
        assert got[0].shape == ((33,) if reduction == "none" else ())
        for name, a, b in zip(("loss", "grad_x", "grad_w"), got, want):
            assert a.dtype == jnp.float64 and _on_gpu(a), name
            _assert_rel(a, b, 1e-10, f"{name} m={margin} beta={beta} {reduction} jit={jit}")
        assert not np.asarray(got[1])[~np.asarray(kept)].any()  # no gradient for an ignored row
        # Without differentiation: the loss-only call.
        alone = jax.jit(fused)(x, w, beta) if jit else fused(x, w, beta)
        _assert_rel(alone, got[0], 1e-12, "loss alone")
        # And the host reference.
        expected, _ = _expected(
            np.asarray(x), np.asarray(w), np.asarray(label), np.asarray(cot), margin=margin, beta=beta,
            reduction=reduction,
        )  # fmt: skip
        for name, a, b in zip(("loss", "grad_x", "grad_w"), got, expected):
            _assert_rel(a, b, 1e-10, f"{name} vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpu_float64_class_chunks_round_trip_the_lse(reduction, monkeypatch):
    """A tiny memory budget: class chunks, and for "none" the backward from the forward's
    float64 log-sum-exp (its uint32 words in XLA's buffer)."""
    monkeypatch.setenv("LSOFTMAX_CE_BUDGET", "64")
    dev = jax_gpu()
    rng = np.random.default_rng(21)
    with jax.enable_x64(True):
        x, w, label = _problem(rng, 10, 6, 4, scale=4.0)
        cot = _cotangent(rng, 10, reduction)
        want, _ = _expected(x, w, label, cot, margin=4, beta=0.5, reduction=reduction)
        xj, wj, lj = (jax.device_put(a, dev) for a in (x, w, label))
        f = functools.partial(lsoftmax_cross_entropy, margin=4, beta=0.5, reduction=reduction)
        loss, vjp = jax.vjp(lambda x, w: f(x, w, lj), xj, wj)
        got = (loss, *vjp(jax.device_put(jnp.asarray(cot), dev)))
        for name, a, b in zip(("loss", "grad_x", "grad_w"), got, want):
            assert _on_gpu(a), name
            _assert_rel(a, b, 1e-10, f"{name} {reduction}")


@pytest.mark.gpu
def test_gpu_float32_within_the_tolerance_table():
    dev = jax_gpu()
    rng = np.random.default_rng(2)
    x, w, label = _problem(rng, 64, 50, 16, "float32", scale=2.0)
    xj, wj, lj = (jax.device_put(a, dev) for a in (x, w, label))
    tol = TOLERANCES["float32"]
    for margin, beta in ((1, 0.0), (2, 0.0), (4, 1.0), (6, 100.0)):
        for reduction in REDUCTIONS:
            cot = _cotangent(rng, 64, reduction)
            want, grad_logits = _expected(x, w, label, cot, margin=margin, beta=beta, reduction=reduction)

            def run(x, w, margin=margin, beta=beta, reduction=reduction, cot=cot):
                f = functools.partial(lsoftmax_cross_entropy, margin=margin, beta=beta, reduction=reduction)
                loss, vjp = jax.vjp(lambda x, w: f(x, w, lj), x, w)
                return (loss, *vjp(jnp.asarray(cot, dtype=x.dtype)))

            got = jax.jit(run)(xj, wj)
            assert all(a.dtype == jnp.float32 and _on_gpu(a) for a in got)
            row_scale = logit_scale(x, w, margin).max(axis=1)
            kept = label != IGNORE
            per_row = np.abs(np.asarray(cot)) * (row_scale if reduction == "none" else row_scale / kept.sum())
            bound = 2 * tol.forward * (per_row if reduction == "none" else np.sum(per_row * kept))
            assert np.all(np.abs(np.asarray(got[0], np.float64) - want[0]) <= bound), (margin, reduction)
            check_backward(
                [np.asarray(a) for a in got[1:]], grad_logits, x, w, np.where(kept, label, 0),
                margin=margin, beta=beta, dtype="float32",
            )  # fmt: skip


@pytest.mark.gpu
def test_gpu_a_few_training_steps():
    """SGD on the class weights through jit(value_and_grad) of the fused loss on CUDA, beta
    annealed as a traced argument: finite gradients, and the loss at beta 1 goes down."""
    dev = jax_gpu()
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        label = np.tile(np.arange(3, dtype=np.int32), 10)
        label[::7] = IGNORE
        x = np.eye(3, 4)[np.where(label == IGNORE, 0, label)] * 3 + 0.3 * rng.standard_normal((30, 4))
        xj, lj = jax.device_put(x, dev), jax.device_put(label, dev)
        w = jax.device_put(0.1 * rng.standard_normal((3, 4)), dev)
        step = jax.jit(jax.value_and_grad(lambda w, beta: lsoftmax_cross_entropy(xj, w, lj, margin=2, beta=beta)))
        before = float(lsoftmax_cross_entropy(xj, w, lj, margin=2, beta=1.0))
        for t in range(8):
            beta = jax.device_put(jnp.float64(16.0 * 0.5**t), dev)
            loss, grad = step(w, beta)
            assert _on_gpu(grad) and np.isfinite(np.asarray(grad)).all()
            w = w - 0.1 * grad
        assert float(lsoftmax_cross_entropy(xj, w, lj, margin=2, beta=1.0)) < before
