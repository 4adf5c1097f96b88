"""lsoftmax_core.adapters.jax with every margin kind (SphereFace, CosFace, ArcFace,
CombinedMargin as margin objects, besides L-Softmax's int): ``lsoftmax``,
``lsoftmax_cross_entropy`` and ``class_parallel_cross_entropy`` give the core's NumPy
results in float64, eagerly, under ``jit`` (a traced beta compiles once), ``jax.grad`` and
``vmap``.

The adapter runs the core itself inside its callbacks, so the layer and the fused loss
are compared with the core's own bits (the core is tested against an independent
reference in tests/core).  The class-parallel loss runs on 4 JAX CPU devices in a
subprocess (JAX fixes its device count at first use, and this process already uses JAX
with one): this file run as a script (``python test_jax_margins.py OUT.json``) records the
sharded and single-device results, and the assertions are here.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import lsoftmax_core as core
from lsoftmax_core.adapters.jax import class_parallel_cross_entropy, lsoftmax, lsoftmax_cross_entropy
from lsoftmax_core.margins import ArcFace, CombinedMargin, CosFace, LSoftmax, SphereFace

from support.jax_subprocess import run_cases
from support.loss_reference import assert_rel

# A failing callback makes JAX log the traceback before re-raising; the tests check the raise.
logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)

KINDS = [
    SphereFace(4),
    CosFace(0.35, s=64.0),
    CosFace(0.35, s=4.0),
    ArcFace(0.5, s=4.0),
    ArcFace(0.5, s=64.0),
    CombinedMargin(1.0, 0.3, 0.2, s=4.0),
]
IDS = [repr(k) for k in KINDS]
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100
#: The subprocess's cases take a few seconds; a hang fails the test instead of stalling CI.
TIMEOUT_S = 240
PARTS = 4


def _problem(seed: int, n: int = 9, c: int = 5, d: int = 4, labels: list[int] | None = None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * 3.0
    w = rng.standard_normal((c, d))
    label = np.array(labels if labels is not None else rng.integers(0, c, n), dtype=np.int32)
    return x, w, label, rng


def _ends() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows at the ends c = +1 and c = -1 of their target, a zero feature row, a zero target
    weight row, and ordinary rows."""
    w = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 0.5]])
    x = np.array([[3.0, 0.0, 0.0], [0.0, -0.5, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.3, -1.0, 2.0],
                  [-2.0, 1.0, 0.0]])  # fmt: skip
    label = np.array([0, 1, 3, 2, 3, 0], dtype=np.int32)
    return x, w, label


def _layer_vjp(x, w, label, g, margin, beta, jit):
    def f(x, w, beta):
        return lsoftmax(x, w, label, margin=margin, beta=beta)

    if jit:
        f = jax.jit(f)
    logits, vjp = jax.vjp(lambda x, w: f(x, w, beta), jnp.asarray(x), jnp.asarray(w))
    return (logits, *vjp(jnp.asarray(g)))


def _assert_bits(got, want, what: str) -> None:
    for name, a, b in zip(("value", "grad_x", "grad_w"), got, want):
        a = np.asarray(a)
        assert a.dtype == np.float64, f"{what}: {name} is {a.dtype}"
        np.testing.assert_array_equal(a, b, err_msg=f"{what}: {name}")


# -- the layer ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_layer_is_the_cores_forward_and_backward(kind):
    """Logits and the VJP of a random cotangent: the core's bits, eagerly and under jit, with
    Python betas (the kinds have no statistics: the backward is the core's with stats=None)."""
    with jax.enable_x64(True):
        for seed, (x, w, label) in enumerate([_problem(1)[:3], _ends()]):
            g = np.random.default_rng(seed).standard_normal((len(x), len(w)))
            for beta in (0.0, 3.0):
                want = (core.forward(x, w, label, margin=kind, beta=beta),
                        *core.backward(g, x, w, label, margin=kind, beta=beta))  # fmt: skip
                assert all(np.all(np.isfinite(a)) for a in want)
                for jit in (False, True):
                    got = _layer_vjp(x, w, label, g, kind, beta, jit)
                    _assert_bits(got, want, f"{kind} case {seed} beta={beta} jit={jit}")


@pytest.mark.parametrize("kind", [SphereFace(4), CosFace(0.35, s=4.0), ArcFace(0.5, s=4.0),
                                  CombinedMargin(1.0, 0.3, 0.2, s=4.0)], ids=repr)  # fmt: skip
def test_layer_grad_matches_finite_differences(kind):
    """jax.grad through the layer against JAX's own finite differences (rows away from the
    ends, where every kind is smooth)."""
    with jax.enable_x64(True):
        x, w, label, _ = _problem(5, n=4, c=3, d=3)

        def f(x, w):
            return jnp.sum(jnp.sin(lsoftmax(x, w, label, margin=kind, beta=0.5)))

        check_grads(f, (jnp.asarray(x), jnp.asarray(w)), order=1, modes=["rev"], eps=1e-6)
        check_grads(jax.jit(f), (jnp.asarray(x), jnp.asarray(w)), order=1, modes=["rev"], eps=1e-6)


def test_lsoftmax_object_is_the_int_margin():
    """LSoftmax(m) is margin=m: the same bits, and the same statistics path (the forward
    keeps the core's per-sample statistics for the backward)."""
    with jax.enable_x64(True):
        x, w, label, rng = _problem(2)
        g = rng.standard_normal((len(x), len(w)))
        for jit in (False, True):
            a = _layer_vjp(x, w, label, g, LSoftmax(3), 1.5, jit)
            b = _layer_vjp(x, w, label, g, 3, 1.5, jit)
            for u, v in zip(a, b):
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        ce = [lsoftmax_cross_entropy(x, w, label, margin=m, beta=1.5) for m in (LSoftmax(3), 3)]
        np.testing.assert_array_equal(np.asarray(ce[0]), np.asarray(ce[1]))


def _callback_results(lowered_text: str) -> list[str]:
    """The result types of each buffer callback in a lowered computation."""
    calls = [line for line in lowered_text.splitlines() if "xla_buffer_python_cpu_callback" in line]
    return [line.rsplit("->", 1)[1].strip() for line in calls]


def test_the_kinds_that_normalise_keep_no_statistics(monkeypatch):
    """Under jax.grad L-Softmax's forward callback also returns the (STATS_ROWS, N) statistics
    for the backward; a kind that normalises returns the logits alone and its backward calls
    the core with stats=None."""
    x, w, label = jnp.ones((7, 4)), jnp.ones((5, 4)), jnp.zeros(7, jnp.int32)

    def grad_fn(margin):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(lsoftmax(x, w, label, margin=margin))), argnums=(0, 1)))

    grads = "(tensor<7x4xf32>, tensor<5x4xf32>)"
    stats = f"tensor<{core.STATS_ROWS}x7x2xui32>"
    assert _callback_results(grad_fn(3).lower(x, w).as_text()) == [f"(tensor<7x5xf32>, {stats})", grads]
    for kind in KINDS:
        assert _callback_results(grad_fn(kind).lower(x, w).as_text()) == ["tensor<7x5xf32>", grads], kind

    seen = []
    real = core.backward

    def spy(*arrays, stats=None, **kw):
        seen.append((kw["margin"], stats))
        return real(*arrays, stats=stats, **kw)

    monkeypatch.setattr(core, "backward", spy)
    xr, wr, yr, _ = _problem(3)
    xr = xr.astype(np.float32)
    for kind in KINDS:
        f = functools.partial(lambda w, kind: jnp.sum(jnp.sin(lsoftmax(xr, w, yr, margin=kind))), kind=kind)
        jax.block_until_ready(jax.grad(f)(jnp.asarray(wr, jnp.float32)))
    assert [(m, s) for m, s in seen] == [(k, None) for k in KINDS]


# -- the fused loss ----------------------------------------------------------------------


def _loss_vjp(x, w, label, cot, jit, **kw):
    def f(x, w, beta):
        return lsoftmax_cross_entropy(x, w, label, beta=beta, **kw)

    if jit:
        f = jax.jit(f)
    beta = kw.pop("beta")
    loss, vjp = jax.vjp(lambda x, w: f(x, w, beta), jnp.asarray(x), jnp.asarray(w))
    return (loss, *vjp(jnp.asarray(cot)))


@pytest.mark.parametrize("budget", [None, "64"], ids=["default-plan", "class-chunks"])
@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_loss_is_the_cores_cross_entropy(kind, budget, monkeypatch):
    """Loss and VJP, with ignored rows and duplicate labels, for every reduction: the core's
    own bits for a unit cotangent (the core's cross_entropy_backward, from the forward's
    log-sum-exp for "none"), and a random cotangent to 1e-12 (for "mean"/"sum" the single
    pass's gradients scaled by it); a tiny
    LSOFTMAX_CE_BUDGET makes the core chunk by classes."""
    if budget is not None:
        monkeypatch.setenv("LSOFTMAX_CE_BUDGET", budget)
    labels = [0, 4, 4, IGNORE, 2, 1, 0, IGNORE, 3, 4, 2]
    with jax.enable_x64(True):
        x, w, label, rng = _problem(4, n=11, c=5, d=4, labels=labels)
        for reduction in REDUCTIONS:
            for beta in (0.0, 2.0):
                kw = dict(margin=kind, beta=beta, reduction=reduction)
                ones = np.ones(11) if reduction == "none" else np.float64(1.0)
                loss, lse = core.cross_entropy(x, w, label, return_lse=True, **kw)
                # "none": the adapter's backward is a second pass from the forward's lse
                bkw = dict(kw, lse=lse) if reduction == "none" else kw
                want = (loss, *core.cross_entropy_backward(ones, x, w, label, **bkw))
                assert all(np.all(np.isfinite(a)) for a in want)
                cot = rng.standard_normal(11) if reduction == "none" else np.float64(rng.standard_normal())
                want_cot = (loss, *core.cross_entropy_backward(cot, x, w, label, **bkw))
                for jit in (False, True):
                    what = f"{kind} {reduction} beta={beta} jit={jit}"
                    _assert_bits(_loss_vjp(x, w, label, ones, jit, **kw), want, what)
                    for name, a, b in zip(("loss", "grad_x", "grad_w"), _loss_vjp(x, w, label, cot, jit, **kw), want_cot):
                        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14, err_msg=f"{what}: {name}")


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_loss_equals_the_unfused_composition(kind):
    """The fused loss is the log-softmax cross-entropy of lsoftmax's logits, gradients too."""
    with jax.enable_x64(True):
        x, w, label, _ = _problem(6, n=8, c=6, d=3)

        def fused(x, w):
            return lsoftmax_cross_entropy(x, w, label, margin=kind, beta=1.0)

        def unfused(x, w):
            logits = lsoftmax(x, w, label, margin=kind, beta=1.0)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None], axis=1))

        a = jax.value_and_grad(fused, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
        b = jax.value_and_grad(unfused, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-11, atol=1e-13)


# -- jit, vmap ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_a_traced_beta_compiles_once(kind):
    """beta is an operand for every kind: one compiled step for every value."""
    with jax.enable_x64(True):
        x, w, label, rng = _problem(7)
        g = rng.standard_normal((len(x), len(w)))

        @jax.jit
        def layer_step(x, w, beta):
            logits, vjp = jax.vjp(lambda x, w: lsoftmax(x, w, label, margin=kind, beta=beta), x, w)
            return (logits, *vjp(jnp.asarray(g)))

        @jax.jit
        def loss_step(x, w, beta):
            f = lambda x, w: lsoftmax_cross_entropy(x, w, label, margin=kind, beta=beta)  # noqa: E731
            loss, grads = jax.value_and_grad(f, argnums=(0, 1))(x, w)
            return (loss, *grads)

        for beta in (100.0, 3.0, 0.0):
            want = (core.forward(x, w, label, margin=kind, beta=beta),
                    *core.backward(g, x, w, label, margin=kind, beta=beta))  # fmt: skip
            _assert_bits(layer_step(x, w, beta), want, f"layer beta={beta}")
            want = core.cross_entropy_with_grad(x, w, label, margin=kind, beta=beta)
            _assert_bits(loss_step(x, w, beta), want, f"loss beta={beta}")
        assert layer_step._cache_size() == 1 and loss_step._cache_size() == 1
        # No gradient to beta, whatever the kind.
        grad_beta = jax.grad(lambda b: lsoftmax_cross_entropy(x, w, label, margin=kind, beta=b))(3.0)
        assert float(grad_beta) == 0.0


def test_margin_is_a_static_argument_compared_by_value():
    """A margin object is hashable and compares by value: an equal object made anew re-uses
    the compiled function (jit's static argument), a different one compiles its own."""
    with jax.enable_x64(True):
        x, w, label, _ = _problem(8)
        f = jax.jit(lambda x, w, margin: lsoftmax_cross_entropy(x, w, label, margin=margin), static_argnames="margin")
        a = f(x, w, margin=CosFace(0.35, s=64.0))
        b = f(x, w, margin=CosFace(m=0.35, s=64))
        assert f._cache_size() == 1
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        c = f(x, w, margin=CosFace(0.35, s=4.0))
        assert f._cache_size() == 2 and float(c) != float(a)


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_vmap_maps_independent_problems(kind):
    """Each mapped slice is its own problem (x, w, label, beta), for the layer and the loss,
    under jit and grad."""
    with jax.enable_x64(True):
        problems = [_problem(20 + i, n=6, c=4, d=3)[:3] for i in range(3)]
        xs, ws, labels = (jnp.asarray(np.stack(a)) for a in zip(*problems))
        betas = jnp.asarray([0.0, 1.0, 10.0])

        def layer(x, w, label, beta):
            return jnp.sum(jnp.sin(lsoftmax(x, w, label, margin=kind, beta=beta)))

        def loss(x, w, label, beta):
            return lsoftmax_cross_entropy(x, w, label, margin=kind, beta=beta)

        for f in (layer, loss):
            fn = jax.value_and_grad(f, argnums=(0, 1))
            got = jax.jit(jax.vmap(fn))(xs, ws, labels, betas)
            for i in range(3):
                want = fn(xs[i], ws[i], labels[i], betas[i])
                for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                    np.testing.assert_array_equal(np.asarray(u)[i], np.asarray(v))


# -- argument errors ----------------------------------------------------------------------


BAD_MARGINS = [
    (0, ValueError, r"margin=0 must be an integer in \[1, 64\]"),
    (2.5, TypeError, "margin=2.5 must be an integer"),
    ("arcface", TypeError, "margin='arcface' must be an int .* or a margin object"),
    (None, TypeError, "margin=None must be an int"),
]


@pytest.mark.parametrize("margin, exc, match", BAD_MARGINS)
def test_a_bad_margin_is_the_cores_error_at_the_call(margin, exc, match):
    x, w, label, _ = _problem(9)
    x, w = x.astype(np.float32), w.astype(np.float32)
    for f in (lsoftmax, lsoftmax_cross_entropy):
        with pytest.raises(exc, match=match):
            f(x, w, label, margin=margin)
        with pytest.raises(exc, match=match):  # under jit: when tracing
            jax.jit(lambda x, w, f=f: f(x, w, label, margin=margin)).trace(x, w)
    mesh = Mesh(np.array(jax.devices()[:1]), ("classes",))
    sharded = jax.shard_map(
        lambda x, w: class_parallel_cross_entropy(x, w, label, axis_name="classes", num_classes=5, margin=margin),
        mesh=mesh, in_specs=(P(), P("classes")), out_specs=P(),
    )  # fmt: skip
    with pytest.raises(exc, match=match):
        sharded(jnp.asarray(x), jnp.asarray(w))


# -- the class-parallel loss --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_class_parallel_on_one_device_is_the_single_device_loss(kind):
    """A one-device mesh in this process (the 4-device cases: below)."""
    with jax.enable_x64(True):
        x, w, label, _ = _problem(10, labels=[0, 4, 1, IGNORE, 3, 2, 2, 0, 4])
        mesh = Mesh(np.array(jax.devices()[:1]), ("classes",))

        def per_device(x, w_local, beta):
            return class_parallel_cross_entropy(x, w_local, jnp.asarray(label), axis_name="classes", num_classes=5,
                                                margin=kind, beta=beta)  # fmt: skip

        sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("classes"), P()), out_specs=P())
        got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(x, w, 2.0)
        want = core.cross_entropy_with_grad(x, w, label, margin=kind, beta=2.0)
        for a, b in zip(jax.tree.leaves(got), want):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14)


#: C = 10 over 4 devices of 3 rows (the last holds class 9 and two NaN padding rows): labels
#: on both sides of the boundaries, a device holding no target, duplicates, ignored rows.
LABELS = [0, 2, 3, 9, 9, IGNORE, 2, 0, IGNORE, 3, 5, 9]
#: C = 5 over 4 devices of 2 rows: the last device holds only padding.
LABELS_PADDING_ONLY = [0, 1, 2, 3, 4, 4, IGNORE, 1, 2, 3, 0, 4]


def _shard_cases() -> list[dict[str, Any]]:
    """(kind index, reduction, check_vma, classes, rows per device, labels) of each case."""
    cases = []
    for k in range(len(KINDS)):
        for reduction in REDUCTIONS:
            cases.append(dict(kind=k, reduction=reduction, check_vma=True, c=10, local=3, labels=LABELS))
        cases.append(dict(kind=k, reduction="none", check_vma=False, c=10, local=3, labels=LABELS))
        cases.append(dict(kind=k, reduction="mean", check_vma=True, c=5, local=2, labels=LABELS_PADDING_ONLY))
    return cases


def _case_name(case: dict[str, Any]) -> str:
    return f"{KINDS[case['kind']]!r} {case['reduction']} check_vma={case['check_vma']} C={case['c']}"


def _shard_case(mesh: Mesh, seed: int, case: dict[str, Any]) -> dict[str, Any]:
    """One case's sharded and single-device loss and gradients (beta traced, 0 and 2, under
    jit, a random cotangent) and the sharded step's number of compilations."""
    kind, reduction, c, local = KINDS[case["kind"]], case["reduction"], case["c"], case["local"]
    x, w, label, rng = _problem(seed, n=12, c=c, d=5, labels=case["labels"])
    w_padded = np.concatenate([w, np.full((local * PARTS - c, 5), np.nan)])  # padding may hold anything
    label = jnp.asarray(label)

    def per_device(x, w_local, beta):
        return class_parallel_cross_entropy(x, w_local, label, axis_name="classes", num_classes=c, margin=kind,
                                            beta=beta, reduction=reduction)  # fmt: skip

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("classes"), P()), out_specs=P(),
                            check_vma=case["check_vma"])  # fmt: skip

    def single(x, w, beta):
        return lsoftmax_cross_entropy(x, w, label, margin=kind, beta=beta, reduction=reduction)

    def vjp_of(f):
        def run(x, w, beta, cot):
            loss, vjp = jax.vjp(lambda x, w: f(x, w, beta), x, w)
            return (loss, *vjp(cot))

        return jax.jit(run)

    fs, f1 = vjp_of(sharded), vjp_of(single)
    record = []
    for beta in (0.0, 2.0):
        cot = rng.standard_normal(12) if reduction == "none" else np.float64(rng.standard_normal())
        got, want = fs(x, w_padded, beta, cot), f1(x, w, beta, cot)
        record.append({"got": [np.asarray(a).tolist() for a in got], "want": [np.asarray(a).tolist() for a in want]})
    return {"betas": record, "compiled": fs._cache_size()}


def _run_shard_cases(out: str) -> None:
    """The subprocess: every case of :func:`_shard_cases` on 4 devices, into ``out`` as JSON;
    a case that raises records its traceback instead of stopping the others."""
    mesh = Mesh(np.array(jax.devices()[:PARTS]), ("classes",))
    results: dict[str, Any] = {"devices": len(jax.devices())}
    for i, case in enumerate(_shard_cases()):
        try:
            results[_case_name(case)] = _shard_case(mesh, 100 + i, case)
        except Exception as e:  # recorded for the test to report
            results[_case_name(case)] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    Path(out).write_text(json.dumps(results), encoding="utf-8")


@pytest.fixture(scope="module")
def shard_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_cases(__file__, tmp_path_factory.mktemp("margins_class_parallel") / "cases.json", TIMEOUT_S, devices=PARTS)


@pytest.mark.parametrize("kind", range(len(KINDS)), ids=IDS)
def test_class_parallel_over_4_devices_is_the_single_device_loss(shard_results, kind):
    """C = 10 over 4 devices (NaN padding rows), every reduction, check_vma True and False,
    and a device holding only padding: loss, grad_x and grad_w within 1e-10 of the
    single-device loss (relative to the largest value), padding rows' gradient exactly 0;
    one compilation for both betas."""
    cases = [case for case in _shard_cases() if case["kind"] == kind]
    for case in cases:
        name = _case_name(case)
        r = shard_results[name]
        if "error" in r:
            pytest.fail(f"case {name!r} raised {r['error']}\n{r['traceback']}")
        assert r["compiled"] == 1 and len(r["betas"]) == 2, name
        for beta, rec in zip((0.0, 2.0), r["betas"]):
            (loss, gx, gw), (loss1, gx1, gw1) = rec["got"], rec["want"]
            c = case["c"]
            assert np.all(np.isfinite(loss1)) and np.all(np.isfinite(gx1)) and np.all(np.isfinite(gw1)), name
            assert_rel(loss, loss1, 1e-10, f"{name} beta={beta}: loss")
            assert_rel(gx, gx1, 1e-10, f"{name} beta={beta}: grad_x")
            assert_rel(np.asarray(gw)[:c], gw1, 1e-10, f"{name} beta={beta}: grad_w")
            assert np.all(np.asarray(gw)[c:] == 0.0), f"{name}: padding rows of grad_w"


# -- CUDA ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_gpu_matches_the_cores_numpy_results(kind):
    """On a CUDA device (the core's CuPy backend on XLA's stream) the layer and the fused
    loss give the core's NumPy results in float64, to rounding."""
    from support.jax_gpu import jax_gpu

    dev = jax_gpu()
    with jax.enable_x64(True):
        x, w, label, rng = _problem(30, n=16, c=7, d=5)
        g = rng.standard_normal((16, 7))
        xd, wd, ld, gd = (jax.device_put(a, dev) for a in (x, w, label, g))
        logits, vjp = jax.vjp(jax.jit(lambda x, w: lsoftmax(x, w, ld, margin=kind, beta=1.0)), xd, wd)
        got = (logits, *vjp(gd))
        want = (core.forward(x, w, label, margin=kind, beta=1.0), *core.backward(g, x, w, label, margin=kind, beta=1.0))
        for name, a, b in zip(("logits", "grad_x", "grad_w"), got, want):
            assert_rel(np.asarray(a), b, 1e-11, f"{kind} {name}")
        f = jax.jit(jax.value_and_grad(lambda x, w: lsoftmax_cross_entropy(x, w, ld, margin=kind, beta=1.0),
                                       argnums=(0, 1)))  # fmt: skip
        got = jax.tree.leaves(f(xd, wd))
        want = core.cross_entropy_with_grad(x, w, label, margin=kind, beta=1.0)
        for name, a, b in zip(("loss", "grad_x", "grad_w"), got, want):
            assert_rel(np.asarray(a), b, 1e-11, f"{kind} {name}")


if __name__ == "__main__":
    # The class-parallel cases (shard_results): 4 CPU devices, float64.
    jax.config.update("jax_num_cpu_devices", PARTS)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", True)
    _run_shard_cases(sys.argv[1])
