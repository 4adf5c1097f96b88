"""``subcenters=k`` in the JAX adapter's fused losses (SubCenter-ArcFace and its kin):
``lsoftmax_cross_entropy`` and ``class_parallel_cross_entropy`` with w of C·k rows, class
j's centres rows j·k ... j·k + k - 1, for the margin kinds that normalise the weights.

The adapter runs the core inside its callbacks, so the single-device loss is compared with
the core's own ``cross_entropy_with_grad`` (and ``cross_entropy_backward``) bits in float64,
eagerly and under ``jit``; the class-parallel loss over 4 JAX CPU devices (whole classes
per device, padding in whole classes) with the single-device loss, in a subprocess (JAX
fixes its device count at first use): this file run as a script (``python
test_jax_subcenters.py OUT.json``) records the results, the assertions are here.
"""

from __future__ import annotations

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

import lsoftmax_core as core
from lsoftmax_core.adapters.jax import class_parallel_cross_entropy, lsoftmax_cross_entropy
from lsoftmax_core.margins import ArcFace, CombinedMargin, CosFace, LSoftmax, SphereFace

from support.jax_subprocess import run_cases
from support.loss_reference import assert_rel

logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)

KINDS = [SphereFace(4), CosFace(0.35, s=4.0), ArcFace(0.5, s=4.0), CombinedMargin(1.0, 0.3, 0.2, s=4.0)]
IDS = [repr(k) for k in KINDS]
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100
PARTS = 4
#: The subprocess's cases take ~10 s; a hang fails the test instead of stalling CI.
TIMEOUT_S = 240


def _problem(seed: int, c: int, k: int, labels: list[int], d: int = 4):
    """x (N, d), w (c·k, d) and labels; class 1's first two centres are equal (a tie: the
    gradient goes to the lower one), and class 1 is among the labels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(labels), d)) * 3.0
    w = rng.standard_normal((c * k, d))
    w[k + 1] = w[k]
    return x, w, np.array(labels, dtype=np.int32), rng


def _assert_bits(got, want, what: str) -> None:
    for name, a, b in zip(("loss", "grad_x", "grad_w"), got, want):
        a = np.asarray(a)
        assert a.dtype == np.float64, f"{what}: {name} is {a.dtype}"
        np.testing.assert_array_equal(a, b, err_msg=f"{what}: {name}")


# -- one device ---------------------------------------------------------------------------


LABELS = [0, 4, 4, IGNORE, 1, 1, 0, IGNORE, 3, 4, 2]


@pytest.mark.parametrize("k, budget", [(2, None), (3, None), (3, "64")], ids=["k=2", "k=3", "k=3-class-chunks"])
@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_loss_and_grad_are_the_cores(kind, k, budget, monkeypatch):
    """Loss, jax.grad and the VJP of a random cotangent, every reduction, eagerly and under
    jit: the core's cross_entropy_with_grad bits ("mean"/"sum"; the VJP its gradients scaled)
    and, for "none", cross_entropy_backward from the forward's lse.  A tiny
    LSOFTMAX_CE_BUDGET makes the core chunk by classes (a class's centres in one chunk)."""
    if budget is not None:
        monkeypatch.setenv("LSOFTMAX_CE_BUDGET", budget)
    with jax.enable_x64(True):
        x, w, label, rng = _problem(k, 5, k, LABELS)
        for reduction in REDUCTIONS:
            kw = dict(margin=kind, beta=1.0, reduction=reduction, subcenters=k)

            def f(x, w, kw=kw):
                return lsoftmax_cross_entropy(x, w, label, **kw)

            for jit in (False, True):
                what = f"{kind} k={k} {reduction} jit={jit}"
                g = jax.jit(f) if jit else f
                if reduction != "none":
                    want = core.cross_entropy_with_grad(x, w, label, **kw)
                    assert all(np.all(np.isfinite(a)) for a in want)
                    got = jax.value_and_grad(g, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
                    _assert_bits((got[0], *got[1]), want, what)
                    cot = np.float64(rng.standard_normal())
                    want_cot = (want[0], want[1] * cot, want[2] * cot)
                else:
                    loss, lse = core.cross_entropy(x, w, label, return_lse=True, **kw)
                    cot = rng.standard_normal(len(label))
                    want_cot = (loss, *core.cross_entropy_backward(cot, x, w, label, lse=lse, **kw))
                loss, vjp = jax.vjp(g, jnp.asarray(x), jnp.asarray(w))
                got = (loss, *vjp(jnp.asarray(cot)))
                for name, a, b in zip(("loss", "grad_x", "grad_w"), got, want_cot):
                    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14, err_msg=f"{what}: {name}")


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_a_row_sees_each_class_through_its_nearest_centre(kind):
    """Per row, the k-centre loss is the one-centre loss against the centres nearest to it
    (largest cosine, the lowest on a tie), and grad_w lands on those centres only."""
    k, c = 3, 4
    with jax.enable_x64(True):
        x, w, label, _ = _problem(7, c, k, [1, 0, 3, 2, 1])
        wn = w / np.linalg.norm(w, axis=1, keepdims=True)
        for i in range(len(label)):
            xi, yi = x[i : i + 1], label[i : i + 1]
            cos = (wn @ xi[0]).reshape(c, k)
            pick = np.arange(c) * k + np.argmax(cos, axis=1)  # argmax: the first of equal maxima
            loss, (gx, gw) = jax.value_and_grad(
                lambda x, w, yi=yi: lsoftmax_cross_entropy(x, w, yi, margin=kind, beta=1.0, subcenters=k), argnums=(0, 1)
            )(jnp.asarray(xi), jnp.asarray(w))  # fmt: skip
            loss1, (gx1, gw1) = jax.value_and_grad(
                lambda x, w, yi=yi: lsoftmax_cross_entropy(x, w, yi, margin=kind, beta=1.0), argnums=(0, 1)
            )(jnp.asarray(xi), jnp.asarray(w[pick]))  # fmt: skip
            np.testing.assert_allclose(float(loss), float(loss1), rtol=1e-12)
            np.testing.assert_allclose(np.asarray(gx), np.asarray(gx1), rtol=1e-11, atol=1e-14)
            others = np.setdiff1d(np.arange(c * k), pick)
            np.testing.assert_allclose(np.asarray(gw)[pick], np.asarray(gw1), rtol=1e-11, atol=1e-14)
            assert np.all(np.asarray(gw)[others] == 0.0), f"row {i}: gradient off the nearest centres"


def test_subcenters_is_static_and_one_is_the_default():
    """subcenters=1 is the call without it (the same compiled computation); under jit
    subcenters is a static argument: each k compiles once."""
    with jax.enable_x64(True):
        kind = ArcFace(0.5, s=4.0)
        x, w, label, _ = _problem(3, 6, 2, [0, 5, 1, 2, 3, 4])

        def lowered(**kw):
            return jax.jit(lambda x, w: lsoftmax_cross_entropy(x, w, label, margin=kind, **kw)).lower(x, w).as_text()

        assert lowered(subcenters=1) == lowered()
        np.testing.assert_array_equal(
            np.asarray(lsoftmax_cross_entropy(x, w, label, margin=kind, subcenters=1)),
            np.asarray(lsoftmax_cross_entropy(x, w, label, margin=kind)),
        )
        f = jax.jit(lambda x, w, y, k: lsoftmax_cross_entropy(x, w, y, margin=kind, subcenters=k), static_argnames="k")
        for k in (2, 3, 2, 3, 1):  # 12 rows: 6 classes of 2 centres, 4 of 3 or 12 of 1
            y = label % (12 // k)
            want = core.cross_entropy(x, w, y, margin=kind, subcenters=k)
            np.testing.assert_array_equal(np.asarray(f(x, w, y, k=k)), want, err_msg=f"k={k}")
        assert f._cache_size() == 3


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_an_all_ignored_batch_gives_zero_loss_and_gradients(reduction):
    with jax.enable_x64(True):
        x, w, label, _ = _problem(16, 3, 2, [IGNORE] * 4)
        f = lambda x, w: jnp.sum(lsoftmax_cross_entropy(x, w, label, margin=KINDS[2], reduction=reduction,  # noqa: E731
                                                        subcenters=2))  # fmt: skip
        loss, (gx, gw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
        assert float(loss) == 0.0 and np.all(np.asarray(gx) == 0.0) and np.all(np.asarray(gw) == 0.0)


# -- errors -------------------------------------------------------------------------------


def _one_device(x, w, label, **kw):
    mesh = Mesh(np.array(jax.devices()[:1]), ("classes",))
    f = jax.shard_map(
        lambda x, w: class_parallel_cross_entropy(x, w, jnp.asarray(label), axis_name="classes", **kw),
        mesh=mesh, in_specs=(P(), P("classes")), out_specs=P(),
    )  # fmt: skip
    return f(jnp.asarray(x), jnp.asarray(w))


@pytest.mark.parametrize("margin", [2, LSoftmax(3)], ids=repr)
def test_an_lsoftmax_margin_with_subcenters_is_the_cores_error(margin):
    x, w, label, _ = _problem(11, 4, 2, [0, 1, 2, 3])
    x, w = x.astype(np.float32), w.astype(np.float32)
    with pytest.raises(ValueError) as core_error:
        core.cross_entropy(x, w, label, margin=margin, subcenters=2)
    assert "subcenters=2" in str(core_error.value)
    for call in (
        lambda: lsoftmax_cross_entropy(x, w, label, margin=margin, subcenters=2),
        lambda: jax.jit(lambda x, w: lsoftmax_cross_entropy(x, w, label, margin=margin, subcenters=2)).trace(x, w),
        lambda: _one_device(x, w, label, num_classes=4, margin=margin, subcenters=2),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == str(core_error.value)


def test_rows_that_subcenters_does_not_divide_are_an_error():
    kind = CosFace(0.35, s=4.0)
    x, w, label, _ = _problem(12, 7, 1, [0, 1, 2])  # 7 rows, k = 2
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match=r"subcenters=2 must divide w's rows: w\.shape=\(7, 4\)"):
            lsoftmax_cross_entropy(x, w, label, margin=kind, subcenters=2)
        with pytest.raises(ValueError, match=r"subcenters=2 must divide w's rows: w\.shape=\(7, 4\)"):
            jax.jit(lambda x, w: lsoftmax_cross_entropy(x, w, label, margin=kind, subcenters=2)).trace(x, w)
        with pytest.raises(ValueError, match=r"subcenters=2 must divide w_local's rows: w_local\.shape=\(7, 4\)"):
            _one_device(x, w, label, num_classes=3, margin=kind, subcenters=2)
        # num_classes counts classes: 6 rows of k = 3 hold 2 classes, not 3
        with pytest.raises(ValueError, match=r"num_classes=3 exceeds the 1 x 2 classes of subcenters=3 rows"):
            _one_device(x, w[:6], label, num_classes=3, margin=kind, subcenters=3)


@pytest.mark.parametrize(
    "value, exc, match",
    [(0, ValueError, r"subcenters=0 must be an integer in \[1, 1024\]"),
     (2.0, TypeError, r"subcenters=2\.0 must be an integer"),
     (True, TypeError, r"subcenters=True must be an integer")],
)  # fmt: skip
def test_a_bad_subcenters_is_the_cores_error(value, exc, match):
    kind = ArcFace(0.5, s=4.0)
    x, w, label, _ = _problem(13, 2, 2, [0, 1])
    x, w = x.astype(np.float32), w.astype(np.float32)
    with pytest.raises(exc, match=match):
        core.cross_entropy(x, w, label, margin=kind, subcenters=value)
    with pytest.raises(exc, match=match):
        lsoftmax_cross_entropy(x, w, label, margin=kind, subcenters=value)
    with pytest.raises(exc, match=match):
        _one_device(x, w, label, num_classes=2, margin=kind, subcenters=value)


def test_labels_count_classes_not_rows():
    """With 3 classes of 2 centres a label of 3 (a row of w, not a class) is the core's
    label error: at the call for NumPy labels, from the callback for jax labels."""
    kind = CosFace(0.35, s=4.0)
    x, w, _, _ = _problem(14, 3, 2, [0, 1, 2])
    x, w = x.astype(np.float32), w.astype(np.float32)
    label = np.array([0, 3, 1], dtype=np.int32)
    with pytest.raises(ValueError, match=r"label must lie in \[0, C\) = \[0, 3\)"):
        lsoftmax_cross_entropy(x, w, label, margin=kind, subcenters=2)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"label must lie in \[0, C\)"):
        jax.block_until_ready(lsoftmax_cross_entropy(x, w, jnp.asarray(label), margin=kind, subcenters=2))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"label must lie in \[0, C\)"):
        jax.block_until_ready(_one_device(x, w, label, num_classes=3, margin=kind, subcenters=2))


# -- the class-parallel loss --------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_class_parallel_on_one_device_is_the_cores_loss(kind, k):
    """A one-device mesh in this process: the core's cross_entropy_with_grad, under jit."""
    with jax.enable_x64(True):
        x, w, label, _ = _problem(15, 5, k, [0, 4, 1, IGNORE, 3, 2, 1, 0, 4])
        mesh = Mesh(np.array(jax.devices()[:1]), ("classes",))

        def per_device(x, w_local, beta):
            return class_parallel_cross_entropy(x, w_local, jnp.asarray(label), axis_name="classes", num_classes=5,
                                                margin=kind, beta=beta, subcenters=k)  # fmt: skip

        sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("classes"), P()), out_specs=P())
        got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(x, w, 2.0)
        want = core.cross_entropy_with_grad(x, w, label, margin=kind, beta=2.0, subcenters=k)
        for a, b in zip(jax.tree.leaves(got), want):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14)


#: C = 10 classes over 4 devices of 3 classes (the last holds class 9 and two padding
#: classes of NaN rows): labels on both sides of the boundaries, a device holding no
#: target, duplicates, ignored rows.
SHARD_LABELS = [0, 2, 3, 9, 9, IGNORE, 2, 1, IGNORE, 3, 5, 9]
#: C = 5 over 4 devices of 2 classes: the last device holds only padding.
LABELS_PADDING_ONLY = [0, 1, 2, 3, 4, 4, IGNORE, 1, 2, 3, 0, 4]


def _shard_cases() -> list[dict[str, Any]]:
    """k = 2: every reduction; k = 3: "mean" (both: check_vma=False with "none" and a device
    holding only padding)."""
    cases = []
    for kind in range(len(KINDS)):
        for k in (2, 3):
            for reduction in REDUCTIONS if k == 2 else ["mean"]:
                cases.append(dict(kind=kind, k=k, reduction=reduction, check_vma=True, c=10, local=3,
                                  labels=SHARD_LABELS))  # fmt: skip
            cases.append(dict(kind=kind, k=k, reduction="none", check_vma=False, c=10, local=3, labels=SHARD_LABELS))
            cases.append(dict(kind=kind, k=k, reduction="mean", check_vma=True, c=5, local=2,
                              labels=LABELS_PADDING_ONLY))  # fmt: skip
    return cases


def _case_name(case: dict[str, Any]) -> str:
    return f"{KINDS[case['kind']]!r} k={case['k']} {case['reduction']} check_vma={case['check_vma']} C={case['c']}"


def _shard_case(mesh: Mesh, seed: int, case: dict[str, Any]) -> dict[str, Any]:
    """One case's sharded and single-device loss and VJP (beta traced, 0 and 2, under jit,
    a random cotangent), the core's cross_entropy_with_grad for "mean"/"sum", and the
    sharded step's number of compilations."""
    kind, k, reduction, c, local = KINDS[case["kind"]], case["k"], case["reduction"], case["c"], case["local"]
    x, w, label_np, rng = _problem(seed, c, k, case["labels"], d=5)
    pad = (local * PARTS - c) * k  # whole classes of k rows
    w_padded = np.concatenate([w, np.full((pad, 5), np.nan)])  # padding may hold anything
    label = jnp.asarray(label_np)

    def per_device(x, w_local, beta):
        return class_parallel_cross_entropy(x, w_local, label, axis_name="classes", num_classes=c, margin=kind,
                                            beta=beta, reduction=reduction, subcenters=k)  # fmt: skip

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("classes"), P()), out_specs=P(),
                            check_vma=case["check_vma"])  # fmt: skip

    def single(x, w, beta):
        return lsoftmax_cross_entropy(x, w, label, margin=kind, beta=beta, reduction=reduction, subcenters=k)

    def vjp_of(f):
        def run(x, w, beta, cot):
            loss, vjp = jax.vjp(lambda x, w: f(x, w, beta), x, w)
            return (loss, *vjp(cot))

        return jax.jit(run)

    fs, f1 = vjp_of(sharded), vjp_of(single)
    record = []
    for beta in (0.0, 2.0):
        cot = rng.standard_normal(len(label_np)) if reduction == "none" else np.float64(rng.standard_normal())
        got, want = fs(x, w_padded, beta, cot), f1(x, w, beta, cot)
        rec = {"got": [np.asarray(a).tolist() for a in got], "want": [np.asarray(a).tolist() for a in want]}
        if reduction != "none":
            loss, gx, gw = core.cross_entropy_with_grad(x, w, label_np, margin=kind, beta=beta, reduction=reduction,
                                                        subcenters=k)  # fmt: skip
            rec["core"] = [loss.tolist(), (gx * cot).tolist(), (gw * cot).tolist()]
        record.append(rec)
    return {"betas": record, "compiled": fs._cache_size()}


def _run_shard_cases(out: str) -> None:
    """The subprocess: every case of :func:`_shard_cases` on 4 devices, into ``out`` as JSON;
    a case that raises records its traceback instead of stopping the others."""
    mesh = Mesh(np.array(jax.devices()[:PARTS]), ("classes",))
    results: dict[str, Any] = {"devices": len(jax.devices())}
    try:
        # A core call that raises on one device leaves the others waiting in the all-reduce
        # until XLA aborts the process (40 s): first the shard calls the cases make with
        # one device's data, so that such an error is reported at once, with its traceback.
        _preflight()
    except Exception as e:
        err = {"error": f"{type(e).__name__}: {e} (the core's shard call, before any case)",
               "traceback": traceback.format_exc()}  # fmt: skip
        results.update({_case_name(case): err for case in _shard_cases()})
        Path(out).write_text(json.dumps(results), encoding="utf-8")
        return
    for i, case in enumerate(_shard_cases()):
        try:
            results[_case_name(case)] = _shard_case(mesh, 200 + i, case)
        except Exception as e:  # recorded for the test to report
            results[_case_name(case)] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    Path(out).write_text(json.dumps(results), encoding="utf-8")


def _preflight() -> None:
    """The core's shard calls on a shard that holds classes but no row's target (device 2 of
    the C = 10 cases), with k = 2."""
    x, w, label, _ = _problem(0, 10, 2, SHARD_LABELS, d=5)
    kw = dict(margin=KINDS[1], class_start=6, num_classes=10, subcenters=2)
    lse, _ = core.cross_entropy_shard_stats(x, w[12:18], label, **kw)
    core.cross_entropy_backward(1.0, x, w[12:18], label, lse=lse, **kw)


@pytest.fixture(scope="module")
def shard_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_cases(__file__, tmp_path_factory.mktemp("subcenters_class_parallel") / "cases.json", TIMEOUT_S, devices=PARTS)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("kind", range(len(KINDS)), ids=IDS)
def test_class_parallel_over_4_devices_is_the_single_device_loss(shard_results, kind, k):
    """C = 10 classes of k centres over 4 devices of 3 classes (NaN padding classes), every
    reduction, check_vma True and False, and a device holding only padding: loss, grad_x
    and grad_w within 1e-10 of the single-device loss (relative to the largest value; the
    single-device loss is the core's bits for "mean"/"sum"), the padding rows' gradient
    exactly 0; one compilation for both betas."""
    cases = [case for case in _shard_cases() if case["kind"] == kind and case["k"] == k]
    assert len(cases) == (5 if k == 2 else 3)
    for case in cases:
        name = _case_name(case)
        r = shard_results[name]
        if "error" in r:
            pytest.fail(f"case {name!r} raised {r['error']}\n{r['traceback']}")
        assert r["compiled"] == 1 and len(r["betas"]) == 2, name
        rows = case["c"] * k
        for beta, rec in zip((0.0, 2.0), r["betas"]):
            (loss, gx, gw), (loss1, gx1, gw1) = rec["got"], rec["want"]
            assert np.all(np.isfinite(loss1)) and np.all(np.isfinite(gx1)) and np.all(np.isfinite(gw1)), name
            assert np.asarray(gw).shape[0] == PARTS * case["local"] * k, name
            assert_rel(loss, loss1, 1e-10, f"{name} beta={beta}: loss")
            assert_rel(gx, gx1, 1e-10, f"{name} beta={beta}: grad_x")
            assert_rel(np.asarray(gw)[:rows], gw1, 1e-10, f"{name} beta={beta}: grad_w")
            assert np.all(np.asarray(gw)[rows:] == 0.0), f"{name}: padding rows of grad_w"
            if "core" in rec:
                for what, a, b in zip(("loss", "grad_x", "grad_w"), rec["want"], rec["core"]):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name} beta={beta}: {what}")


# -- CUDA ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", [CosFace(0.35, s=4.0), ArcFace(0.5, s=4.0)], ids=repr)
def test_gpu_matches_the_cores_numpy_results(kind):
    """On a CUDA device (the core's CuPy loss on XLA's stream) the sub-centre loss and its
    gradients are the core's NumPy results in float64, to rounding.  (Not yet run on a GPU.)"""
    from support.jax_gpu import jax_gpu

    dev = jax_gpu()
    with jax.enable_x64(True):
        x, w, label, _ = _problem(31, 7, 3, [0, 6, 1, IGNORE, 5, 1, 3, 2])
        xd, wd, ld = (jax.device_put(a, dev) for a in (x, w, label))
        f = jax.jit(jax.value_and_grad(
            lambda x, w: lsoftmax_cross_entropy(x, w, ld, margin=kind, beta=1.0, subcenters=3), argnums=(0, 1)
        ))  # fmt: skip
        got = jax.tree.leaves(f(xd, wd))
        want = core.cross_entropy_with_grad(x, w, label, margin=kind, beta=1.0, subcenters=3)
        for name, a, b in zip(("loss", "grad_x", "grad_w"), got, want):
            assert_rel(np.asarray(a), b, 1e-11, f"{kind} {name}")


if __name__ == "__main__":
    # The class-parallel cases (shard_results): 4 CPU devices, float64.
    jax.config.update("jax_num_cpu_devices", PARTS)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", True)
    _run_shard_cases(sys.argv[1])
