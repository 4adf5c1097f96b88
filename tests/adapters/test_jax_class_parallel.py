"""lsoftmax_core.adapters.jax.class_parallel_cross_entropy: W sharded by class over
a mesh axis under ``jax.shard_map`` gives the single-device fused loss and its gradients.

The multi-device cases run on 4 JAX CPU devices in one subprocess
(``support/jax_class_parallel_cases.py``: JAX fixes its device count at first use, and this
process already uses JAX with one device); it records inputs and results, the assertions
are here.  Argument checks and the one-device case run in this process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lsoftmax_core.adapters.jax import class_parallel_cross_entropy, lsoftmax_cross_entropy

from support.jax_gpu import jax_gpu
from support.jax_subprocess import run_cases, run_script
from support.loss_reference import IGNORE, assert_rel, ref_grad_logits, ref_loss
from support.tolerances import TOLERANCES, check_backward, logit_scale

logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)

CASES = Path(__file__).resolve().parents[1] / "support" / "jax_class_parallel_cases.py"
#: The cases take ~20 s on the loaded 2-core machine; a hang fails instead of stalling CI.
TIMEOUT_S = 240
REDUCTIONS = ["mean", "sum", "none"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_cases(CASES, tmp_path_factory.mktemp("class_parallel") / "cases.json", TIMEOUT_S, devices=4)


def _get(cases: dict[str, Any], name: str) -> dict[str, Any]:
    """A case's record with its arrays as NumPy float64 (and their dtypes as ``<key>_dtype``);
    a case that raised fails the test with its traceback."""
    assert name in cases, f"no case {name!r} (cases: {sorted(cases)})"
    r = dict(cases[name])
    if "error" in r:
        pytest.fail(f"case {name!r} raised {r['error']}\n{r['traceback']}")
    for k, v in list(r.items()):
        if isinstance(v, dict) and "value" in v:
            r[k], r[f"{k}_dtype"] = np.asarray(v["value"], dtype=np.float64), v["dtype"]
    return r


def _assert_equals_single_device(r: dict[str, Any], name: str, rtol: float = 1e-10) -> None:
    """Loss, grad_x and grad_w within ``rtol`` (relative to the largest value) of the
    single-device loss; padding rows of grad_w exactly 0."""
    c = r["gw1"].shape[0]
    assert_rel(r["loss"], r["loss1"], rtol, f"{name}: loss")
    assert_rel(r["gx"], r["gx1"], rtol, f"{name}: grad_x")
    assert_rel(r["gw"][:c], r["gw1"], rtol, f"{name}: grad_w")
    assert np.all(r["gw"][c:] == 0.0), f"{name}: padding rows of grad_w are {r['gw'][c:]}"
    assert r["loss"].shape == r["loss1"].shape and r["gx"].shape == r["gx1"].shape, name


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
def test_float64_loss_and_gradients_equal_the_single_device_loss(cases, margin):
    """C = 10 over 4 devices of 3 rows (two NaN padding rows on the last), labels on both
    sides of shard boundaries, a device holding no target, ignored rows; every reduction,
    beta 0, 2 and 1000 (traced, under jit), grad of x and w through shard_map."""
    names = [n for n in cases if n.startswith(f"f64 m={margin} ")]
    assert len(names) == 9, names
    for name in names:
        r = _get(cases, name)
        assert r["loss_dtype"] == r["gx_dtype"] == r["gw_dtype"] == "float64", name
        _assert_equals_single_device(r, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_classes_dividing_evenly_need_no_padding(cases, reduction):
    _assert_equals_single_device(_get(cases, f"f64 even {reduction}"), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_device_holding_only_padding_adds_nothing(cases, reduction):
    """C = 5 over 4 devices of 2 rows: the last device holds no class at all."""
    _assert_equals_single_device(_get(cases, f"f64 padding-only device {reduction}"), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_an_all_ignored_batch_gives_zero_loss_and_gradients(cases, reduction):
    r = _get(cases, f"f64 all ignored {reduction}")
    for key in ("loss", "gx", "gw"):
        assert np.all(r[key] == 0.0), f"{key}: {r[key]}"


def test_a_batch_smaller_than_a_shard_equals_the_single_device_loss(cases):
    _assert_equals_single_device(_get(cases, "f64 few rows mean"), "N=2")


def test_eager_shard_map_equals_the_single_device_loss(cases):
    _assert_equals_single_device(_get(cases, "f64 eager none"), "eager")


@pytest.mark.parametrize("margin", [2, 4])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_check_vma_false_gives_the_same_gradients(cases, margin, reduction):
    """shard_map(check_vma=False) transposes differently (cotangent shares, psum of the
    replicated inputs' cotangents); jax.grad through it still gives the exact gradients."""
    name = f"f64 check_vma=False m={margin} {reduction}"
    _assert_equals_single_device(_get(cases, name), name)


def test_the_loss_alone_equals_the_single_device_loss(cases):
    r = _get(cases, "f64 forward only")
    assert_rel(r["loss"], r["loss1"], 1e-10, "loss per row")


def test_grad_taken_inside_shard_map_gives_whole_grad_x_and_sharded_grad_w(cases):
    """A training step written per device: value_and_grad inside shard_map, grad_x
    replicated (out_specs P()), grad_w in W's blocks (out_specs P("classes"))."""
    _assert_equals_single_device(_get(cases, "f64 grad inside shard_map check_vma=True"), "inside")


def test_without_check_vma_a_grad_inside_shard_map_scales_grad_w_by_p_as_psum_does(cases):
    """check_vma=False: the seed cotangent 1 on every device counts P times, as for
    jax.grad of JAX's own psum there (take the gradient outside shard_map instead)."""
    r = _get(cases, "f64 grad inside shard_map check_vma=False")
    assert_rel(r["loss"], r["loss1"], 1e-10, "loss")
    assert_rel(r["gw"][:10], 4 * r["gw1"], 1e-10, "grad_w")


@pytest.mark.parametrize("check_vma", [True, False])
def test_data_and_class_parallel_on_a_2x2_mesh(cases, check_vma):
    """Rows split over "data", classes over "classes", the summed loss psum'd over "data":
    grad_w is also summed over the data shards."""
    name = f"f64 2x2 mesh check_vma={check_vma}"
    _assert_equals_single_device(_get(cases, name), name)


@pytest.mark.parametrize("check_vma", [True, False])
def test_rows_split_over_the_class_axis_and_gathered_as_in_partial_fc(cases, check_vma):
    """Each device brings its own rows and all-gathers the batch before the loss (with
    to="invarying" under check_vma=True); grad_x comes back to each device's rows."""
    name = f"f64 partial fc check_vma={check_vma}"
    _assert_equals_single_device(_get(cases, name), name)


def _assert_float32_within_the_table(loss, gx, gw, x, w, label, cot, *, margin, beta, reduction, what=""):
    """Against the float64 reference: the loss within the forward tolerance of the row's
    logit scale (a row's loss moves by at most its largest logit error), the gradients
    within the table's."""
    tol = TOLERANCES["float32"]
    label = np.asarray(label).astype(np.int64)
    want = ref_loss(x, w, label, margin=margin, beta=beta, reduction=reduction)
    kept = label != IGNORE
    row_scale = np.abs(np.asarray(cot, np.float64)) * logit_scale(x, w, margin).max(axis=1)
    bound = 2 * tol.forward * (row_scale if reduction == "none" else np.sum(row_scale * kept))
    if reduction == "mean":
        bound = bound / max(int(kept.sum()), 1)
    assert np.all(np.abs(np.asarray(loss, np.float64) - want) <= bound), f"{what} loss {loss} vs {want}"
    grad_logits, target = ref_grad_logits(cot, x, w, label, margin=margin, beta=beta, reduction=reduction)
    c = w.shape[0]
    check_backward((gx, gw[:c]), grad_logits, x, w, target, margin=margin, beta=beta, dtype="float32")


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_within_the_tolerance_table(cases, x64, reduction):
    """N = 64, D = 16, C = 50 over 4 devices of 13 rows, margin 4.  Without x64 the
    devices' log-sum-exps are combined in float32, with it in float64."""
    r = _get(cases, f"f32 x64={x64} {reduction}")
    assert r["loss_dtype"] == r["gx_dtype"] == r["gw_dtype"] == "float32"
    _assert_float32_within_the_table(r["loss"], r["gx"], r["gw"], r["x"], r["w"], r["label"], r["cot"], margin=4,
                                     beta=1.0, reduction=reduction)  # fmt: skip


def test_a_new_traced_beta_reuses_the_compiled_function(cases):
    r = _get(cases, "f64 traced beta compiles once")
    assert r["cache_size"] == 1
    assert_rel(r["loss"], r["loss1"], 1e-10, "losses for beta 0.5, 7, 1000")
    assert len(set(r["loss"].tolist())) == 3  # beta did change the loss


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_training_step_moves_O_of_N_D_values_whatever_C(cases, check_vma, reduction):
    """The issue's goal, from XLA's compiled step (N=6, D=7, C=40 over 4 devices of 10):
    the collectives carry at most N*D + 4N values per device (a pmax of N, a psum of
    (2, N), the psum of grad_x (N, D), and with check_vma=False the cotangent's psum: 1 or
    N), none of them shaped by C or C_local."""
    r = _get(cases, f"collectives check_vma={check_vma} {reduction}")
    n, d, c, local, shapes = r["n"], r["d"], r["c"], r["local"], r["shapes"]
    assert shapes, "no collective found in the compiled HLO"
    assert [n, d] in shapes, f"grad_x's psum (N, D) is missing: {shapes}"
    assert all(c not in s and local not in s for s in shapes), shapes
    assert sum(int(np.prod(s)) for s in shapes) <= n * d + 4 * n, shapes


@pytest.mark.parametrize(("bad", "where"), [(10, "a padding row's index"), (11, "past the padding"), (-1, "negative")])
def test_labels_outside_num_classes_raise_naming_label(cases, bad, where):
    r = cases[f"error label={bad}"]
    assert "error" in r, f"label {bad} ({where}) was accepted"
    assert r["error"].startswith("JaxRuntimeError"), r["error"]
    assert f"label must lie in [0, C) = [0, 10) or equal ignore_index=-100: label[4]={bad}" in r["error"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("error num_classes too large", "num_classes=13 exceeds the 4 x 3 rows that the 4 devices of axis_name='classes'"),
        ("error x sharded over the class axis", "x must be replicated over axis_name='classes': every device"),
        ("error w replicated", "w_local must be sharded over axis_name='classes' (shard_map in_specs"),
    ],
)
def test_a_wrong_layout_is_a_value_error_when_tracing(cases, name, message):
    r = cases[name]
    assert r.get("error", "").startswith(f"ValueError: {message}"), r.get("error", "accepted")


PADDING_ONLY = CASES.with_name("jax_padding_only_errors.py")
#: Those cases take a few seconds; a device left waiting in an all-reduce makes XLA abort
#: the process after about 60 s (a failure through the exit status), a hang fails here.
PADDING_ONLY_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def padding_only_errors() -> dict[str, dict[str, Any]]:
    """support/jax_padding_only_errors.py's cases (C = 9 over 4 devices of 3 rows: device 3
    holds only padding), by name; a process that aborts or hangs fails the tests."""
    done = run_script(PADDING_ONLY, PADDING_ONLY_TIMEOUT_S)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        pytest.fail(
            f"{PADDING_ONLY.name} exited with {done.returncode} after the cases {[r['case'] for r in records]}; "
            f"its stderr ends:\n{done.stderr[-3000:]}"
        )
    return {r["case"]: r for r in records}


@pytest.mark.parametrize(
    ("case", "where"),
    [("label=9", "label[2]=9"), ("label=9 under grad", "label[2]=9"), ("label=11", "label[1]=11"),
     ("label=-1", "label[2]=-1")],
)  # fmt: skip
def test_a_bad_label_is_an_error_on_every_device_also_one_holding_only_padding(padding_only_errors, case, where):
    """Issue 23 item 1: the devices holding classes reject the label in their callbacks; the
    padding-only device must reject it too, before the all-reduce, instead of waiting there
    until XLA aborts the process."""
    r = padding_only_errors[case]
    assert r.get("error", "").startswith("JaxRuntimeError"), r
    assert f"label must lie in [0, C) = [0, 9) or equal ignore_index=-100: {where}" in r["error"]


def test_a_bad_traced_beta_is_an_error_on_every_device_also_one_holding_only_padding(padding_only_errors):
    r = padding_only_errors["beta=-1"]
    assert r.get("error", "").startswith("JaxRuntimeError"), r
    assert "beta=-1.0 must be a finite number >= 0" in r["error"]


def test_a_nan_feature_under_grad_is_the_cores_lse_error_on_every_device(padding_only_errors):
    """The combined lse of a row with a NaN feature is NaN on every device: the backward's
    lse check fails on the devices holding classes, and the padding-only one reaches the
    same verdict (one error, no device left waiting)."""
    r = padding_only_errors["nan feature under grad"]
    assert r.get("error", "").startswith("JaxRuntimeError"), r
    assert "lse must be finite on the rows that are not ignored: lse[1]=nan" in r["error"]


def test_good_data_on_the_padding_only_mesh_gives_a_finite_loss(padding_only_errors):
    r = padding_only_errors["good"]
    assert "error" not in r, r
    assert np.isfinite(r["loss"])


# --- In this process: one device. ---


def _one_device(fn, *args, in_specs):
    mesh = Mesh(np.array(jax.devices()[:1]), ("classes",))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P())(*args)


def test_one_device_with_padding_rows_equals_the_fused_loss():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x, w = rng.standard_normal((7, 4)) * 2, rng.standard_normal((5, 4))
        label = np.array([0, 4, IGNORE, 2, 2, 1, 3], np.int32)
        padded = np.concatenate([w, np.full((2, 4), np.nan)])

        def loss(x, w):
            return _one_device(
                lambda x, w, y: class_parallel_cross_entropy(x, w, y, axis_name="classes", num_classes=5, margin=3,
                                                             beta=1.5),
                x, w, label, in_specs=(P(), P("classes"), P()),
            )  # fmt: skip

        got, (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, padded)
        want, (ex, ew) = jax.value_and_grad(
            lambda x, w: lsoftmax_cross_entropy(x, w, label, margin=3, beta=1.5), argnums=(0, 1)
        )(x, w)
        assert_rel(got, want, 1e-10, "loss")
        assert_rel(gx, ex, 1e-10, "grad_x")
        assert_rel(gw[:5], ew, 1e-10, "grad_w")
        assert np.all(np.asarray(gw[5:]) == 0.0)


@pytest.mark.parametrize(
    ("n", "ignore_index", "reduction"), [(0, IGNORE, "mean"), (0, IGNORE, "none"), (9, 2, "mean"), (9, 2, "none")]
)
def test_an_empty_batch_and_ignore_index_naming_a_class_match_the_fused_loss(n, ignore_index, reduction):
    rng = np.random.default_rng(n)
    x, w = rng.standard_normal((n, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    label = rng.integers(0, 4, n).astype(np.int32)
    kw = dict(reduction=reduction, ignore_index=ignore_index, margin=2, beta=0.5)

    def sharded(x, w):
        return _one_device(
            lambda x, w, y: class_parallel_cross_entropy(x, w, y, axis_name="classes", num_classes=4, **kw),
            x, w, label, in_specs=(P(), P("classes"), P()),
        )  # fmt: skip

    def total(f):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1)))(x, w)

    got, (gx, gw) = total(sharded)
    want, (ex, ew) = total(lambda x, w: lsoftmax_cross_entropy(x, w, label, **kw))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(ex), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(ew), rtol=1e-5, atol=1e-7)
    assert np.asarray(sharded(x, w)).shape == ((n,) if reduction == "none" else ())


def _call_one_device(**kw: Any) -> None:
    x = jnp.ones((3, 2), jnp.float32)
    w = jnp.ones((4, 2), jnp.float32)
    y = jnp.zeros(3, jnp.int32)
    args = dict(axis_name="classes", num_classes=4)
    args.update(kw)
    _one_device(lambda x, w, y: class_parallel_cross_entropy(x, w, y, **args), x, w, y,
                in_specs=(P(), P("classes"), P()))  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        (dict(reduction="avg"), ValueError, r"reduction='avg' must be one of"),
        (dict(margin=0), ValueError, r"margin"),
        (dict(num_classes=0), ValueError, r"num_classes"),
        (dict(num_classes=5), ValueError, r"num_classes=5 exceeds the 1 x 4 rows"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index"),
        (dict(beta=-1.0), ValueError, r"beta"),
        (dict(axis_name="model"), ValueError, r"axis_name=.model. is not a mesh axis here"),
        (dict(axis_name=("classes",)), TypeError, r"axis_name must name one mesh axis"),
    ],
)
def test_bad_arguments_are_named(kw, error, message):
    with pytest.raises(error, match=message):
        _call_one_device(**kw)


def test_outside_shard_map_the_axis_is_unbound():
    x, w, y = jnp.ones((3, 2)), jnp.ones((4, 2)), jnp.zeros(3, jnp.int32)
    with pytest.raises(ValueError, match=r"axis_name='classes' is not a mesh axis here: call .* inside jax.shard_map"):
        class_parallel_cross_entropy(x, w, y, axis_name="classes", num_classes=4)


def test_numpy_arrays_and_mixed_dtypes_are_type_errors():
    x, w, y = np.ones((3, 2), np.float32), np.ones((4, 2), np.float32), np.zeros(3, np.int32)
    with pytest.raises(TypeError, match=r"x must be a jax.Array"):
        class_parallel_cross_entropy(x, jnp.asarray(w), jnp.asarray(y), axis_name="classes", num_classes=4)
    with pytest.raises(TypeError, match=r"x and w must have the same dtype"):
        _one_device(
            lambda x, w, y: class_parallel_cross_entropy(x, w, y, axis_name="classes", num_classes=4),
            jnp.asarray(x), jnp.asarray(w, jnp.bfloat16), jnp.asarray(y), in_specs=(P(), P("classes"), P()),
        )  # fmt: skip


# --- On a CUDA device (scripts/gpu_check.sh): one GPU, so the axis has one device. ---


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpu_one_device_with_padding_equals_the_fused_loss(dtype, reduction):
    """The CUDA route (the core's CuPy class shards on XLA's stream): float64 to 1e-10 of
    the single-device fused loss on the same GPU, float32 within the tolerance table."""
    dev = jax_gpu()
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 16)) * 2).astype(dtype)
    w = rng.standard_normal((50, 16)).astype(dtype)
    label = rng.integers(0, 50, 64).astype(np.int32)
    label[[3, 9]] = IGNORE
    cot = (rng.standard_normal(64) if reduction == "none" else np.asarray(1.3)).astype(dtype)
    padded = np.concatenate([w, np.full((6, 16), np.nan, dtype)])
    mesh = Mesh(np.array([dev]), ("classes",))
    with jax.enable_x64(dtype == "float64"):
        sharded = jax.shard_map(
            lambda x, w, y, b: class_parallel_cross_entropy(x, w, y, axis_name="classes", num_classes=50,
                                                            margin=4, beta=b, reduction=reduction),
            mesh=mesh, in_specs=(P(), P("classes"), P(), P()), out_specs=P(),
        )  # fmt: skip

        def step(f):
            return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w) * cot), argnums=(0, 1)))

        args = [jax.device_put(a, dev) for a in (x, padded, label)]
        beta = jax.device_put(jnp.asarray(1.0, dtype), dev)
        total, (gx, gw) = step(lambda x, w: sharded(x, w, args[2], beta))(args[0], args[1])
        loss = jax.jit(sharded)(*args, beta)
        assert next(iter(gw.devices())).platform in ("gpu", "cuda")
        if dtype == "float64":
            single = step(lambda x, w: lsoftmax_cross_entropy(x, w, args[2], margin=4, beta=1.0, reduction=reduction))
            total1, (gx1, gw1) = single(args[0], jax.device_put(w, dev))
            assert_rel(total, total1, 1e-10, "loss")
            assert_rel(gx, gx1, 1e-10, "grad_x")
            assert_rel(np.asarray(gw)[:50], gw1, 1e-10, "grad_w")
            assert np.all(np.asarray(gw)[50:] == 0.0)
        else:
            _assert_float32_within_the_table(np.asarray(loss), np.asarray(gx), np.asarray(gw), x, w, label, cot,
                                             margin=4, beta=1.0, reduction=reduction, what="gpu")  # fmt: skip
