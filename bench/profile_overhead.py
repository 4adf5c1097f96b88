"""Per-call overhead, path by path: ``python -m bench.profile_overhead``.

At the seed's MNIST head (N=256, D=2, C=10: ``--size mnist``, the default) the GEMMs cost
nothing and a forward+backward is per-call overhead.  For each path this prints the
median time per call (interleaved with the path's floor, like ``python -m bench``) and a
cProfile of a few thousand calls, sorted by own time, with the number of function calls
per forward+backward (NumPy's C functions count as one each):

* ``numpy``: ``lsoftmax_core.forward`` + ``backward`` on NumPy arrays, against a whole
  NumPy linear + softmax-cross-entropy step (logits, softmax, loss, both gradients);
* ``torch``: ``F.cross_entropy(lsoftmax(...))`` forward+backward through the PyTorch
  adapter, against ``F.cross_entropy(F.linear(...))``;
* ``jax``: ``jax.grad`` of the mean cross-entropy of ``lsoftmax(...)`` under ``jit``,
  against the same with ``x @ w.T`` (the callbacks' host side is what we add);
* ``cupy`` (only where a GPU is visible): the CuPy backend's host time per
  forward+backward, from call to return without synchronising, then the host time of its
  public steps and of the CuPy primitives they are made of (``cupy_steps``).

``--paths numpy,torch`` picks paths, ``--top`` the rows of each profile.  Cap the threads
from outside (``OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1``) for one-thread figures.
cProfile roughly doubles the cost of each Python call, so its times rank where the time
goes; the medians above each profile are the unprofiled figures.

``--between`` prints, instead of the profiles, each path's time per call (ours and its
floor) when something else runs before every timed call, as in a training step: nothing
(calls back to back, as ``python -m bench`` times them), a 1 ms busy wait, a 1 ms sleep,
and a PyTorch ``F.cross_entropy(F.linear(...))`` forward+backward; then ours / floor for
each.  Only the call itself is timed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from .contenders import BETA, MARGIN, sizes_for
from .harness import Case, Clock, cpu_clock, measure, paired_ratio

__all__ = ["main", "paths"]

Fn = Callable[[], object]


def _numpy(x: np.ndarray, w: np.ndarray, g: np.ndarray, y: np.ndarray) -> tuple[Fn, Fn]:
    import lsoftmax_core as lsm

    from .contenders import numpy_ce_step

    def ours() -> object:
        logits = lsm.forward(x, w, y, margin=MARGIN, beta=BETA)
        return logits, lsm.backward(g, x, w, y, margin=MARGIN, beta=BETA)

    return ours, numpy_ce_step(x, w, y)


def _torch(x: np.ndarray, w: np.ndarray, y: np.ndarray) -> tuple[Fn, Fn]:
    import torch
    import torch.nn.functional as F

    from lsoftmax_core.adapters.torch import lsoftmax

    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, w))
    ty = torch.from_numpy(y)

    def ours() -> object:
        return torch.autograd.grad(F.cross_entropy(lsoftmax(tx, tw, ty, margin=MARGIN, beta=BETA), ty), (tx, tw))

    def floor() -> object:
        return torch.autograd.grad(F.cross_entropy(F.linear(tx, tw), ty), (tx, tw))

    return ours, floor


def _jax(x: np.ndarray, w: np.ndarray, y: np.ndarray) -> tuple[Fn, Fn]:
    import jax
    import jax.numpy as jnp

    from lsoftmax_core.adapters.jax import lsoftmax

    jx, jw, jy = (jnp.asarray(a) for a in (x, w, y))

    def ce(logits: Any) -> Any:
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), jy])

    ours_grad = jax.jit(jax.grad(lambda x, w: ce(lsoftmax(x, w, jy, margin=MARGIN, beta=BETA)), argnums=(0, 1)))
    floor_grad = jax.jit(jax.grad(lambda x, w: ce(x @ w.T), argnums=(0, 1)))

    def ours() -> object:
        return jax.block_until_ready(ours_grad(jx, jw))

    def floor() -> object:
        return jax.block_until_ready(floor_grad(jx, jw))

    return ours, floor


def _cupy(x: np.ndarray, w: np.ndarray, g: np.ndarray, y: np.ndarray) -> tuple[Fn, Fn]:
    import cupy

    import lsoftmax_core as lsm

    cx, cw, cg = (cupy.asarray(a) for a in (x, w, g))
    cy = cupy.asarray(y)

    def ours() -> object:  # host time: no synchronisation inside the timed calls
        logits = lsm.forward(cx, cw, cy, margin=MARGIN, beta=BETA)
        return logits, lsm.backward(cg, cx, cw, cy, margin=MARGIN, beta=BETA)

    def floor() -> object:
        return cx @ cw.T, cg @ cw, cg.T @ cx

    return ours, floor


# A kernel of lsm_backward_rows's argument list (7 pointers, 4 long long, a double, 2
# pointers, a pointer-sized integer, a long long) that does nothing: CuPy's launch cost alone.
_EMPTY_KERNEL = r"""
extern "C" __global__ void lsm_probe_empty(const float* a, const float* b, const float* c, const long long* d,
    float* e, double* f, unsigned int* g, long long n, long long cc, long long dd, long long m, double beta,
    const double* t, unsigned long long* key, unsigned long long rec, long long serial) {}
"""


def cupy_steps(size_name: str = "mnist", dtype: str = "float32") -> list[tuple[str, Fn]]:
    """The CuPy backend's forward+backward cut into the public steps and the CuPy
    primitives it is made of, each a thunk whose host time ``--steps`` prints."""
    import cupy

    import lsoftmax_core as lsm
    from lsoftmax_core.checks import check_arrays, supported_dtypes

    (size,) = sizes_for("cpu", [size_name])
    rng = np.random.default_rng(0)
    x, w, g = (cupy.asarray(rng.standard_normal(s).astype(dtype)) for s in
               ((size.n, size.d), (size.c, size.d), (size.n, size.c)))  # fmt: skip
    y = cupy.asarray(rng.integers(0, size.c, size.n))
    logits, gx, gw = x @ w.T, g @ w, g.T @ x
    dtypes = supported_dtypes("cupy")
    kernel = cupy.RawKernel(_EMPTY_KERNEL, "lsm_probe_empty")
    ptrs = (x, w, g, y, gx, cupy.empty(4 * size.n), cupy.empty(3 * size.c, cupy.uint32))
    scalars = (np.int64(size.n), np.int64(size.c), np.int64(size.d), np.int64(MARGIN), np.float64(BETA),
               cupy.empty(8), cupy.empty(1, cupy.uint64), np.uint64(0), np.int64(1))  # fmt: skip
    kw = {"margin": MARGIN, "beta": BETA}
    return [
        ("forward+backward", lambda: (lsm.forward(x, w, y, **kw), lsm.backward(g, x, w, y, **kw))),
        ("forward", lambda: lsm.forward(x, w, y, **kw)),
        ("backward", lambda: lsm.backward(g, x, w, y, **kw)),
        ("add_margin (forward without its GEMM)", lambda: lsm.add_margin(logits, x, w, y, **kw)),
        ("add_margin_grad (backward without its GEMMs)", lambda: lsm.add_margin_grad(gx, gw, g, x, w, y, **kw)),
        ("checks.check_arrays (forward's)", lambda: check_arrays(x, w, y, MARGIN, BETA, dtypes=dtypes)),
        ("cupy.matmul x @ w.T", lambda: cupy.matmul(x, w.T)),
        ("cupy.matmul g @ w", lambda: cupy.matmul(g, w)),
        ("cupy.matmul g.T @ x", lambda: cupy.matmul(g.T, x)),
        ("cupy.empty (N, C)", lambda: cupy.empty((size.n, size.c), dtype)),
        ("RawKernel launch, 16 arguments, empty kernel", lambda: kernel((size.n,), (128,), ptrs + scalars)),
        ("cudaMemsetAsync", lambda: cupy.cuda.runtime.memsetAsync(gw.data.ptr, 0, 12 * size.c,
                                                                   cupy.cuda.get_current_stream().ptr)),
        ("cudaGetDevice", cupy.cuda.runtime.getDevice),
    ]


def _print_steps(size_name: str, repeat: int) -> None:
    from .overhead import _host_clock

    steps = cupy_steps(size_name)
    cases = [Case(name, "cupy", "overhead", steps[0][0], fn, _host_clock) for name, fn in steps]
    print("\n=== cupy steps: host time per call (median; no synchronisation inside the timed calls)")
    for m in measure(cases, repeat=repeat, warmup=2, min_time=0.02):
        print(f"{m.median * 1e6:9.2f} us  {m.case.name}" + (f"  ({m.error})" if m.error else ""))


def paths(size_name: str = "mnist", dtype: str = "float32") -> dict[str, tuple[Fn, Fn]]:
    """path name -> (ours, floor), each one forward+backward, for the paths available here."""
    (size,) = sizes_for("cpu", [size_name])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((size.n, size.d)).astype(dtype)
    w = (rng.standard_normal((size.c, size.d)) / np.sqrt(size.d)).astype(dtype)
    g = (rng.standard_normal((size.n, size.c)) / size.n).astype(dtype)
    y = rng.integers(0, size.c, size.n)
    out: dict[str, tuple[Fn, Fn]] = {"numpy": _numpy(x, w, g, y)}
    for name, make in (("torch", lambda: _torch(x, w, y)), ("jax", lambda: _jax(x, w, y))):
        try:
            out[name] = make()
        except ImportError:
            pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            out["cupy"] = _cupy(x, w, g, y)
    except Exception:  # noqa: BLE001, S110 - no CuPy, no driver, no device: no cupy path
        pass
    return out


def _after(before: Fn) -> Clock:
    """A clock that runs ``before`` ahead of every call and times the calls alone."""

    def clock(fn: Callable[[], object], inner: int) -> float:
        spent = 0.0
        for _ in range(inner):
            before()
            t0 = time.perf_counter()
            fn()
            spent += time.perf_counter() - t0
        return spent / inner

    return clock


def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _between(available: dict[str, tuple[Fn, Fn]], chosen: list[str], repeat: int) -> None:
    """``--between``: each chosen path's ours and floor after each of the ``before`` steps,
    all interleaved in one run."""
    befores: dict[str, Fn] = {
        "back to back": lambda: None,
        "1 ms busy wait": lambda: _busy_wait(1e-3),
        "1 ms sleep": lambda: time.sleep(1e-3),
    }
    if "torch" in available:
        befores["torch CE step"] = available["torch"][1]
    cases = [Case(f"{name} {who} | {label}", name, "overhead", f"{name} floor | {label}", fn, _after(before))
             for name in chosen for who, fn in zip(("ours", "floor"), available[name])
             for label, before in befores.items()]  # fmt: skip
    got = {m.case.name: m for m in measure(cases, repeat=repeat, warmup=2, min_time=0.02)}
    width = max(len(label) for label in befores)
    print(f"\n=== time per call (median of {repeat} interleaved samples) after each step; only the call is timed")
    print(f"{'before each call':{width}s}" + "".join(f"  {f'{n} ours':>11s}  {f'{n} floor':>11s}  {'ratio':>6s}"
                                                   for n in chosen))
    for label in befores:
        row = f"{label:{width}s}"
        for name in chosen:
            ours, floor = got[f"{name} ours | {label}"], got[f"{name} floor | {label}"]
            if ours.error or floor.error:
                row += f"  {'error':>11s}  {'error':>11s}  {'':>6s}"
                continue
            row += (f"  {ours.median * 1e6:8.1f} us  {floor.median * 1e6:8.1f} us"
                    f"  {paired_ratio(ours, floor):5.2f}x")  # fmt: skip
        print(row)


def _profile(fn: Fn, calls: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    total = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
    text.write(f"{total / calls:.0f} function calls per forward+backward\n")
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=[s.name for s in sizes_for("cpu")], default="mnist")
    p.add_argument("--paths", type=lambda v: [s for s in v.split(",") if s], default=None,
                   help="comma-separated: numpy, torch, jax, cupy (default: all available)")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--calls", type=int, default=2000, help="calls under cProfile per path")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--between", action="store_true",
                   help="time each path after other work before every call instead of profiling it")
    a = p.parse_args(argv)
    available = paths(a.size)
    chosen = a.paths or list(available)
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise SystemExit(f"path(s) {', '.join(missing)} not available here; available: {', '.join(available)}")
    (size,) = sizes_for("cpu", [a.size])
    print(f"{size.label} float32, margin {MARGIN}, beta {BETA}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if a.between:
        _between(available, chosen, a.repeat)
        return 0
    for name in chosen:
        ours, floor = available[name]
        cases = [Case(f"{name} floor", name, "overhead", f"{name} floor", floor, cpu_clock),
                 Case(f"{name} lsoftmax-core", name, "overhead", f"{name} floor", ours, cpu_clock)]
        m_floor, m_ours = measure(cases, repeat=a.repeat, warmup=2, min_time=0.02)
        ratio = float(np.median([s / f for s, f in zip(m_ours.samples, m_floor.samples)]))
        print(f"\n=== {name}: ours {m_ours.median * 1e6:.1f} us, floor {m_floor.median * 1e6:.1f} us, "
              f"ratio {ratio:.2f}x (median of {a.repeat} interleaved samples)")
        print(_profile(ours, max(1, a.calls if size.c <= 1000 else 20), a.top))
        if name == "cupy":
            _print_steps(a.size, a.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
