"""Where the CPU time of lsoftmax-core goes beyond the plain layer: ``python -m bench.profile_cpu``.

Splits one forward+backward of the NumPy backend at a size (default the face-recognition
one, N=256, D=512, C=10,000, float32) into

* the three GEMMs alone (NumPy's BLAS, then PyTorch's for the same shapes: the PyTorch
  adapter runs NumPy's on CPU, the PyTorch floor PyTorch's);
* the whole backend call, and the same call at C=10, where the GEMMs cost nothing and
  what is left is the O(N·D) work around them;
* the minor page faults per call (fresh float64 temporaries of N·D elements are mapped
  and unmapped by glibc on every call; on a VM each fault is expensive).

Medians over ``--repeat`` calls, each alone (not interleaved: this is a profile, the
table in docs/BENCHMARKS.md comes from ``python -m bench``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Sequence
from typing import Callable

import numpy as np

import lsoftmax_core as lsm

from .contenders import BETA, MARGIN

__all__ = ["main"]


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median ms per call and minor page faults per call."""
    fn()
    times = []
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / repeat
    return statistics.median(times) * 1e3, faults


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--c", type=int, default=10_000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=15)
    a = p.parse_args(argv)
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
    print(f"N={a.n} D={a.d} C={a.c} {a.dtype}, margin {MARGIN}, median of {a.repeat}")
    for name, fn in rows:
        ms, faults = _time(fn, a.repeat)
        print(f"{name:52s} {ms:9.3f} ms  {faults:9.0f} minor faults/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
