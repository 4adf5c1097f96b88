"""Where the CPU time of lsoftmax-core goes beyond the plain layer: ``python -m bench.profile_cpu``.

Splits one forward+backward of the NumPy backend at a CPU size of the one size table
(``--size``, default the face-recognition one, N=256, D=512, C=10,000; ``--n/--d/--c``
override it), float32, into

* the three GEMMs alone (NumPy's BLAS, then PyTorch's for the same shapes: the PyTorch
  adapter and the PyTorch floor both run PyTorch's on CPU);
* the whole backend call, and the same call at C=10, where the GEMMs cost nothing and
  what is left is the O(N·D) work around them;
* the minor page faults per call (fresh float64 temporaries of N·D elements are mapped
  and unmapped by glibc on every call; on a VM each fault is expensive).

Medians over ``--repeat`` samples taken round-robin like ``python -m bench`` (see
:mod:`bench.harness`), so that the rows can be compared with each other on a shared machine.
Cap the threads from outside (``OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1``) to match a
``--threads 1`` run.
"""

from __future__ import annotations

import argparse
import resource
from collections.abc import Sequence
from typing import Callable

import numpy as np

import lsoftmax_core as lsm

from .contenders import BETA, MARGIN, sizes_for
from .harness import Case, cpu_clock, measure

__all__ = ["main"]


def _faults(fn: Callable[[], object], repeat: int) -> float:
    """Minor page faults per call (after one warm-up call)."""
    fn()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeat):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / repeat


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [s.name for s in sizes_for("cpu")]
    p.add_argument("--size", choices=names, default="face", help="a CPU size of bench.contenders.SIZES")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--c", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=15)
    a = p.parse_args(argv)
    (size,) = sizes_for("cpu", [a.size])
    a.n, a.d, a.c = a.n or size.n, a.d or size.d, a.c or size.c
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.n, a.d)).astype(a.dtype)
    w = (rng.standard_normal((a.c, a.d)) / np.sqrt(a.d)).astype(a.dtype)
    g = (rng.standard_normal((a.n, a.c)) / a.n).astype(a.dtype)
    y = rng.integers(0, a.c, a.n)
    ws, gs, ys = w[:10], g[:, :10].copy(), y % 10

    def ours(w: np.ndarray, g: np.ndarray, y: np.ndarray) -> Callable[[], object]:
        return lambda: (lsm.forward(x, w, y, margin=MARGIN, beta=BETA), lsm.backward(g, x, w, y, margin=MARGIN, beta=BETA))

    rows: list[tuple[str, Callable[[], object]]] = [
        ("numpy x @ w.T", lambda: x @ w.T),
        ("numpy g @ w", lambda: g @ w),
        ("numpy g.T @ x", lambda: g.T @ x),
        ("numpy 3 GEMMs (the floor)", lambda: (x @ w.T, g @ w, g.T @ x)),
        ("lsoftmax-core numpy fwd+bwd", ours(w, g, y)),
        ("lsoftmax-core numpy fwd+bwd at C=10 (O(N*D) part)", ours(ws, gs, ys)),
        ("lsoftmax_core.forward alone at C=10", lambda: lsm.forward(x, ws, ys, margin=MARGIN, beta=BETA)),
        ("lsoftmax_core.backward alone at C=10", lambda: lsm.backward(gs, x, ws, ys, margin=MARGIN, beta=BETA)),
    ]
    try:
        import torch

        tx, tw, tg = (torch.from_numpy(v) for v in (x, w, g))
        rows.append(("torch 3 GEMMs (the PyTorch floor's BLAS)", lambda: (tx @ tw.T, tg @ tw, tg.T @ tx)))
    except ImportError:
        pass
    cases = [Case(name, "cpu", "profile", rows[0][0], fn, cpu_clock) for name, fn in rows]
    measured = measure(cases, repeat=a.repeat, warmup=1, min_time=0.01)
    print(f"N={a.n} D={a.d} C={a.c} {a.dtype}, margin {MARGIN}; median of {a.repeat} interleaved samples")
    for m in measured:
        faults = _faults(m.case.run, 3)
        print(f"{m.case.name:52s} {m.median * 1e3:9.3f} ms  {faults:7.0f} minor page faults/call {m.error}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
