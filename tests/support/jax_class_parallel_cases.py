"""Runs the multi-device cases of tests/adapters/test_jax_class_parallel.py in a process of
its own, with 4 JAX CPU devices (JAX fixes its device count at first use, and the test
process already uses JAX with one).

``python jax_class_parallel_cases.py OUT.json``: every case computes
``class_parallel_cross_entropy`` under ``jax.shard_map`` (loss and, through ``jax.grad``
of the sharded function, grad_x and grad_w) and the single-device
``lsoftmax_cross_entropy`` of the whole W on the same inputs, and writes inputs and
results (or the error raised) to OUT.json; the test file makes the assertions.  A case
that fails records its traceback instead of stopping the others.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
import traceback
from typing import Any, Callable

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lsoftmax_core.adapters.jax import class_parallel_cross_entropy, lsoftmax_cross_entropy  # noqa: E402

PARTS = 4
IGNORE = -100
#: C = 10 classes over 4 devices of 3 rows (the last holds class 9 and two padding rows).
#: Device 0 holds 0-2, 1 holds 3-5, 2 holds 6-8 (no target of the batch), 3 holds 9: labels
#: on both sides of the boundaries 2|3 and 5|6, the last class, duplicates, ignored rows.
LABELS = [0, 2, 3, 9, 9, IGNORE, 2, 0, IGNORE, 3, 5, 9]
REDUCTIONS = ("mean", "sum", "none")

_results: dict[str, Any] = {}


def _case(name: str, **meta: Any) -> Callable[[Callable[[], dict[str, Any]]], None]:
    """Run ``fn`` now and record its arrays (as float64 lists) or its error under ``name``."""

    def run(fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            out = fn()
            _results[name] = {**meta, **{k: _plain(v) for k, v in out.items()}}
        except Exception as e:  # recorded for the test to report
            _results[name] = {**meta, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        _results[name]["seconds"] = time.perf_counter() - t0  # where the file's time goes

    return run


def _plain(v: Any) -> Any:
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
        a = np.asarray(v)
        return {"dtype": str(a.dtype), "value": a.astype(np.float64).tolist()}
    return v


def _mesh(shape: tuple[int, ...] = (PARTS,), names: tuple[str, ...] = ("classes",)) -> Mesh:
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _problem(seed: int, n: int, c: int, d: int, dtype: str, labels: list[int] | None = None):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * 3.0).astype(dtype)
    w = rng.standard_normal((c, d)).astype(dtype)
    label = np.array(labels if labels is not None else rng.integers(0, c, n), dtype=np.int32)
    return x, w, label, rng


def _padded(w: np.ndarray, local: int, parts: int = PARTS) -> np.ndarray:
    pad = np.full((local * parts - w.shape[0], w.shape[1]), np.nan, w.dtype)  # padding may hold anything
    return np.concatenate([w, pad])


@functools.cache
def _sharded_vjp_fn(num_classes: int, margin: int, reduction: str, check_vma: bool, jit: bool) -> Callable[..., Any]:
    """(x, w_padded, label, cot, beta) -> (loss, (grad_x, grad_w)) of sum(cot * loss) through
    shard_map, beta traced; one per static configuration, so new betas re-use its compilation."""

    def per_device(x, w_local, label, beta):
        return class_parallel_cross_entropy(
            x, w_local, label, axis_name="classes", num_classes=num_classes, margin=margin, beta=beta,
            reduction=reduction,
        )  # fmt: skip

    sharded = jax.shard_map(
        per_device, mesh=_mesh(), in_specs=(P(), P("classes"), P(), P()), out_specs=P(), check_vma=check_vma
    )

    def scalar(x, w, label, cot, beta):
        loss = sharded(x, w, label, beta)
        return jnp.sum(loss * cot), loss

    f = jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True)
    return jax.jit(f) if jit else f


@functools.cache
def _single_vjp_fn(margin: int, reduction: str) -> Callable[..., Any]:
    def scalar(x, w, label, cot, beta):
        loss = lsoftmax_cross_entropy(x, w, label, margin=margin, beta=beta, reduction=reduction)
        return jnp.sum(loss * cot), loss

    return jax.jit(jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True))


def _sharded_vjp(x, w_padded, label, cot, beta, *, num_classes, margin, reduction, check_vma=True, jit=True):
    f = _sharded_vjp_fn(num_classes, margin, reduction, check_vma, jit)
    (_, loss), (gx, gw) = f(x, w_padded, label, cot, jnp.asarray(beta, dtype=x.dtype))
    return loss, gx, gw


def _single_vjp(x, w, label, cot, beta, *, margin, reduction):
    """The single-device fused loss of the whole W (jitted, beta traced)."""
    (_, loss), (gx, gw) = _single_vjp_fn(margin, reduction)(x, w, label, cot, jnp.asarray(beta, dtype=x.dtype))
    return loss, gx, gw


def _cot(rng, n: int, reduction: str, dtype: str) -> np.ndarray:
    return (rng.standard_normal(n) if reduction == "none" else np.asarray(rng.standard_normal())).astype(dtype)


def _compare_case(name, seed, *, c, local, margin, beta, reduction, dtype="float64", check_vma=True,
                  labels=LABELS, n=12, d=5, jit=True) -> None:  # fmt: skip
    @_case(name, kind="compare", margin=margin, beta=beta, reduction=reduction, dtype=dtype, c=c, local=local)
    def run() -> dict[str, Any]:
        x, w, label, rng = _problem(seed, n, c, d, dtype, labels)
        cot = _cot(rng, n, reduction, dtype)
        loss, gx, gw = _sharded_vjp(x, _padded(w, local), label, cot, beta, num_classes=c, margin=margin,
                                    reduction=reduction, check_vma=check_vma, jit=jit)  # fmt: skip
        loss1, gx1, gw1 = _single_vjp(x, w, label, cot, beta, margin=margin, reduction=reduction)
        return dict(x=x, w=w, label=label, cot=cot, loss=loss, gx=gx, gw=gw, loss1=loss1, gx1=gx1, gw1=gw1)


def float64_cases() -> None:
    for margin in (1, 2, 3, 4):
        for reduction in REDUCTIONS:
            for beta in (0.0, 2.0, 1000.0):
                _compare_case(f"f64 m={margin} beta={beta} {reduction}", margin * 7 + int(beta) % 13,
                              c=10, local=3, margin=margin, beta=beta, reduction=reduction)  # fmt: skip
    for reduction in REDUCTIONS:
        # C = 12: no padding; C = 5 over rows of 2: device 2 holds class 4 and a padding row,
        # device 3 only padding (lse = -inf there).
        _compare_case(f"f64 even {reduction}", 40, c=12, local=3, margin=4, beta=2.0, reduction=reduction,
                      labels=[0, 2, 3, 5, 6, 8, 9, 11, IGNORE, 11, 0, 6])  # fmt: skip
        _compare_case(f"f64 padding-only device {reduction}", 41, c=5, local=2, margin=3, beta=0.5,
                      reduction=reduction, labels=[0, 1, 2, 3, 4, 4, IGNORE, 1, 2, 3, 0, 4])  # fmt: skip
        _compare_case(f"f64 all ignored {reduction}", 42, c=10, local=3, margin=2, beta=1.0,
                      reduction=reduction, labels=[IGNORE] * 12)  # fmt: skip
    # Fewer rows than a device holds classes (N = 2 < C_local = 4).
    _compare_case("f64 few rows mean", 44, c=14, local=4, margin=3, beta=1.0, reduction="mean", labels=[13, 1], n=2)
    # Eager shard_map (op by op: slow, so one case).
    _compare_case("f64 eager none", 43, c=10, local=3, margin=2, beta=1.0, reduction="none", jit=False)
    for margin in (2, 4):
        for reduction in REDUCTIONS:
            _compare_case(f"f64 check_vma=False m={margin} {reduction}", 50 + margin, c=10, local=3,
                          margin=margin, beta=2.0, reduction=reduction, check_vma=False)  # fmt: skip


def forward_only_case() -> None:
    @_case("f64 forward only", kind="forward")
    def run() -> dict[str, Any]:
        x, w, label, _ = _problem(60, 12, 10, 5, "float64", LABELS)
        f = jax.jit(jax.shard_map(
            lambda x, w, y: class_parallel_cross_entropy(x, w, y, axis_name="classes", num_classes=10, margin=3,
                                                         beta=1.5, reduction="none"),
            mesh=_mesh(), in_specs=(P(), P("classes"), P()), out_specs=P(),
        ))  # fmt: skip
        loss = f(x, _padded(w, 3), label)
        return dict(loss=loss, loss1=lsoftmax_cross_entropy(x, w, label, margin=3, beta=1.5, reduction="none"))


def grad_inside_shard_map_case() -> None:
    """A training step written per device: jax.grad inside shard_map, grad_w stays sharded.
    Under check_vma=False JAX's rules for that mode apply, as to its own psum."""
    x, w, label, _ = _problem(61, 12, 10, 5, "float64", LABELS)
    loss1, gx1, gw1 = _single_vjp(x, w, label, np.float64(1.0), 2.0, margin=4, reduction="mean")

    def step(x, w_local, y):
        def loss_fn(x, w_local):
            return class_parallel_cross_entropy(x, w_local, y, axis_name="classes", num_classes=10, margin=4,
                                                beta=2.0)  # fmt: skip

        return jax.value_and_grad(loss_fn, argnums=(0, 1))(x, w_local)

    def run(check_vma: bool) -> dict[str, Any]:
        f = jax.jit(jax.shard_map(step, mesh=_mesh(), in_specs=(P(), P("classes"), P()),
                                  out_specs=(P(), (P(), P("classes"))), check_vma=check_vma))  # fmt: skip
        loss, (gx, gw) = f(x, _padded(w, 3), label)
        return dict(loss=loss, gx=gx, gw=gw, loss1=loss1, gx1=gx1, gw1=gw1)

    for check_vma in (True, False):
        _case(f"f64 grad inside shard_map check_vma={check_vma}", kind="compare")(functools.partial(run, check_vma))


def data_and_class_parallel_cases() -> None:
    """A 2x2 mesh: rows of x and labels split over "data", classes over "classes"; the summed
    loss over both data shards against the single-device sum."""
    x, w, label, _ = _problem(62, 12, 10, 5, "float64", LABELS)
    loss1, gx1, gw1 = _single_vjp(x, w, label, np.float64(1.0), 1.0, margin=3, reduction="sum")

    def per_device(x, w_local, y):
        loss = class_parallel_cross_entropy(x, w_local, y, axis_name="classes", num_classes=10, margin=3,
                                            beta=1.0, reduction="sum")  # fmt: skip
        return jax.lax.psum(loss, "data")

    def run(check_vma: bool) -> dict[str, Any]:
        sharded = jax.shard_map(per_device, mesh=_mesh((2, 2), ("data", "classes")),
                                in_specs=(P("data"), P("classes"), P("data")), out_specs=P(),
                                check_vma=check_vma)  # fmt: skip
        f = jax.jit(jax.value_and_grad(lambda x, w: sharded(x, w, label), argnums=(0, 1)))
        loss, (gx, gw) = f(x, _padded(w, 6, parts=2))
        return dict(loss=loss, gx=gx, gw=gw, loss1=loss1, gx1=gx1, gw1=gw1)

    for check_vma in (True, False):
        _case(f"f64 2x2 mesh check_vma={check_vma}", kind="compare")(functools.partial(run, check_vma))


def partial_fc_cases() -> None:
    """Partial FC's layout: each device brings its own rows of the batch (x and labels split
    over the class axis too) and gathers everyone's before the loss; under check_vma=True
    with all_gather(to="invarying"), under check_vma=False with a plain all_gather."""
    x, w, label, _ = _problem(63, 12, 10, 5, "float64", LABELS)
    loss1, gx1, gw1 = _single_vjp(x, w, label, np.float64(1.0), 2.0, margin=4, reduction="mean")

    def run(check_vma: bool) -> dict[str, Any]:
        to = "invarying" if check_vma else "varying"

        def per_device(x_rows, w_local, y_rows):
            x_all = jax.lax.all_gather(x_rows, "classes", axis=0, tiled=True, to=to)
            y_all = jax.lax.all_gather(y_rows, "classes", axis=0, tiled=True, to=to)
            return class_parallel_cross_entropy(x_all, w_local, y_all, axis_name="classes", num_classes=10,
                                                margin=4, beta=2.0)  # fmt: skip

        sharded = jax.shard_map(per_device, mesh=_mesh(), in_specs=(P("classes"), P("classes"), P("classes")),
                                out_specs=P(), check_vma=check_vma)  # fmt: skip
        f = jax.jit(jax.value_and_grad(lambda x, w: sharded(x, w, label), argnums=(0, 1)))
        loss, (gx, gw) = f(x, _padded(w, 3))
        return dict(loss=loss, gx=gx, gw=gw, loss1=loss1, gx1=gx1, gw1=gw1)

    for check_vma in (True, False):
        _case(f"f64 partial fc check_vma={check_vma}", kind="compare")(functools.partial(run, check_vma))


def float32_cases() -> None:
    """float32 without x64 (the combination in float32) and with it (in float64)."""
    for x64 in (False, True):
        jax.config.update("jax_enable_x64", x64)
        for reduction in REDUCTIONS:
            _compare_case(f"f32 x64={x64} {reduction}", 70, c=50, local=13, margin=4, beta=1.0,
                          reduction=reduction, dtype="float32", n=64, d=16, labels=None)  # fmt: skip
    jax.config.update("jax_enable_x64", True)


def beta_compiles_once_case() -> None:
    @_case("f64 traced beta compiles once", kind="beta")
    def run() -> dict[str, Any]:
        x, w, label, _ = _problem(80, 12, 10, 5, "float64", LABELS)
        f = jax.jit(jax.shard_map(
            lambda x, w, y, b: class_parallel_cross_entropy(x, w, y, axis_name="classes", num_classes=10, margin=2,
                                                            beta=b),
            mesh=_mesh(), in_specs=(P(), P("classes"), P(), P()), out_specs=P(),
        ))  # fmt: skip
        wp = _padded(w, 3)
        betas = [0.5, 7.0, 1000.0]
        losses = [f(x, wp, label, jnp.float64(b)) for b in betas]
        singles = [lsoftmax_cross_entropy(x, w, label, margin=2, beta=b) for b in betas]
        return dict(loss=jnp.stack(losses), loss1=jnp.stack(singles), cache_size=f._cache_size())


_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def collectives_case() -> None:
    """The shapes that the compiled training step (loss and both gradients) moves between
    devices, from XLA's optimised HLO, with sizes that tell N, D, C and C_local apart."""
    n, d, c, local = 6, 7, 40, 10
    for check_vma in (True, False):
        for reduction in ("mean", "none"):

            def run(check_vma: bool = check_vma, reduction: str = reduction) -> dict[str, Any]:
                f = _sharded_vjp_fn(c, 2, reduction, check_vma, True)
                x, w, label = np.ones((n, d)), np.ones((c, d)), np.zeros(n, np.int32)
                cot = np.ones(n) if reduction == "none" else np.float64(1.0)
                hlo = f.lower(x, w, label, cot, jnp.float64(0.0)).compile().as_text()
                shapes = []
                for line in hlo.splitlines():
                    if (op := _COLLECTIVE.search(line)) is not None:
                        head = line[: op.start()]  # the result's shape(s), left of the op's name
                        shapes += [[int(v) for v in s.split(",") if v] for s in _SHAPE.findall(head)]
                return dict(shapes=shapes, n=n, d=d, c=c, local=local)

            _case(f"collectives check_vma={check_vma} {reduction}", kind="collectives")(run)


def error_cases() -> None:
    x, w, label, _ = _problem(90, 12, 10, 5, "float64", LABELS)
    wp = _padded(w, 3)

    def run_with(labels: np.ndarray, **kw: Any) -> Any:
        f = jax.jit(jax.shard_map(
            lambda x, w, y: class_parallel_cross_entropy(x, w, y, axis_name="classes", **kw),
            mesh=_mesh(), in_specs=(P(), P("classes"), P()), out_specs=P(),
        ))  # fmt: skip
        return jax.block_until_ready(f(x, wp, labels))

    def bad_label(bad: int) -> dict[str, Any]:
        labels = label.copy()
        labels[4] = bad
        return dict(loss=run_with(labels, num_classes=10))

    for bad, where in ((10, "a padding row's index"), (11, "past the padding"), (-1, "negative")):
        _case(f"error label={bad}", kind="error", bad=bad, where=where)(functools.partial(bad_label, bad))

    @_case("error num_classes too large", kind="error")
    def run_large() -> dict[str, Any]:
        return dict(loss=run_with(label, num_classes=13))

    @_case("error x sharded over the class axis", kind="error")
    def run_x_sharded() -> dict[str, Any]:
        f = jax.shard_map(
            lambda x, w, y: class_parallel_cross_entropy(x, w, y, axis_name="classes", num_classes=10),
            mesh=_mesh(), in_specs=(P("classes"), P("classes"), P("classes")), out_specs=P(),
        )  # fmt: skip
        return dict(loss=f(x, wp, label))

    @_case("error w replicated", kind="error")
    def run_w_replicated() -> dict[str, Any]:
        f = jax.shard_map(
            lambda x, w, y: class_parallel_cross_entropy(x, w, y, axis_name="classes", num_classes=10),
            mesh=_mesh(), in_specs=(P(), P(), P()), out_specs=P(),
        )  # fmt: skip
        return dict(loss=f(x, wp, label))


def main() -> None:
    jax.config.update("jax_enable_x64", True)
    _results["devices"] = len(jax.devices())
    float64_cases()
    forward_only_case()
    grad_inside_shard_map_case()
    data_and_class_parallel_cases()
    partial_fc_cases()
    float32_cases()
    beta_compiles_once_case()
    collectives_case()
    error_cases()
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(_results, f)


if __name__ == "__main__":
    main()
