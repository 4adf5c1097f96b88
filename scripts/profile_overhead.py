"""Where one forward+backward's time goes, path by path: ``python scripts/profile_overhead.py``.

At N x D x C (default the seed's 256x2x10, where the GEMMs cost nothing) prints, for each
path, the median time per call of ours and of its floor (alternated) and a cProfile of a few
thousand calls of ours sorted by own time, with the function calls per forward+backward:

* ``numpy``: ``lsoftmax_core.forward`` + ``backward`` against the three NumPy GEMMs;
* ``torch``: ``F.cross_entropy(lsoftmax(...))`` through the adapter against ``F.cross_entropy(F.linear(...))``;
* ``cupy`` (a GPU visible): the CuPy backend's host time (no synchronisation inside) against CuPy's GEMMs.

cProfile roughly doubles the cost of each Python call: its times rank, the medians measure.
Cap the threads from outside (``OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1``) for one thread.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import lsoftmax_core as lsm

Fn = Callable[[], object]


def _paths(n: int, d: int, c: int, names: Sequence[str]) -> dict[str, tuple[Fn, Fn, Fn]]:
    """name -> (ours, floor, synchronise)."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((n, d)).astype(np.float32), (rng.standard_normal((c, d)) / d**0.5).astype(np.float32)
    g, y = (rng.standard_normal((n, c)) / n).astype(np.float32), rng.integers(0, c, n)
    out: dict[str, tuple[Fn, Fn, Fn]] = {}
    for name in names:
        if name in ("numpy", "cupy"):
            xp: Any = np
            if name == "cupy":
                import cupy as xp
            a, b, h, t = (xp.asarray(v) for v in (x, w, g, y))
            sync = xp.cuda.Device().synchronize if name == "cupy" else (lambda: None)
            out[name] = (lambda a=a, b=b, h=h, t=t: (lsm.forward(a, b, t, margin=4), lsm.backward(h, a, b, t, margin=4)),
                         lambda a=a, b=b, h=h: (a @ b.T, h @ b, h.T @ a), sync)
        elif name == "torch":
            import torch
            import torch.nn.functional as F

            from lsoftmax_core.adapters.torch import lsoftmax

            tx, tw = (torch.tensor(v, requires_grad=True) for v in (x, w))
            ty = torch.from_numpy(y)
            args = (tx, tw, ty)
            out[name] = (lambda a=args: torch.autograd.grad(F.cross_entropy(lsoftmax(*a, margin=4), a[2]), a[:2]),
                         lambda a=args: torch.autograd.grad(F.cross_entropy(F.linear(*a[:2]), a[2]), a[:2]),
                         lambda: None)
        else:
            raise SystemExit(f"unknown path {name!r}: numpy, torch or cupy")
    return out


def _per_call(fn: Fn, sync: Fn, calls: int) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = time.perf_counter() - t0
    sync()
    return t / calls


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256x2x10", help="N x D x C")
    p.add_argument("--paths", default="numpy,torch", help="comma-separated: numpy, torch, cupy")
    p.add_argument("--repeat", type=int, default=9, help="samples of each median")
    p.add_argument("--calls", type=int, default=2000, help="calls per profile")
    p.add_argument("--top", type=int, default=12, help="rows of each profile")
    a = p.parse_args(argv)
    n, d, c = (int(v) for v in a.size.lower().split("x"))
    for name, (ours, floor, sync) in _paths(n, d, c, [s for s in a.paths.split(",") if s]).items():
        ours(), floor()
        inner = max(1, min(1000, int(0.01 / max(_per_call(ours, sync, 1), 1e-7))))
        t_ours, t_floor = [], []
        for _ in range(a.repeat):
            t_ours.append(_per_call(ours, sync, inner))
            t_floor.append(_per_call(floor, sync, inner))
        ratio = statistics.median(o / f for o, f in zip(t_ours, t_floor))
        print(f"=== {name}: {n}x{d}x{c} float32, ours {statistics.median(t_ours) * 1e6:.1f} us, floor "
              f"{statistics.median(t_floor) * 1e6:.1f} us, ours / floor {ratio:.2f}x (median of {a.repeat})")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.calls):
            ours()
        prof.disable()
        sync()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        print(f"{stats.total_calls / a.calls:.0f} function calls per forward+backward")  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(a.top)
        lines = text.getvalue().splitlines()
        print("\n".join(lines[next(i for i, line in enumerate(lines) if "ncalls" in line):]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
