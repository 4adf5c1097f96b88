"""GPU benchmark of the CuPy backend against the plain linear layer it extends.

One step = forward + backward.  lsoftmax-core: ``forward`` then ``backward`` (three cuBLAS
GEMMs plus the L-Softmax kernels and the Python around them).  Baseline: the same three
GEMMs a linear layer needs, ``x @ w.T``, ``G @ w`` and ``G.T @ x``, through CuPy.  The ratio
is what the margin costs on top of a linear layer.

Method: data on the device, both contenders warmed up (kernels compiled, cuBLAS plans
made), then ``reps`` repetitions alternating which contender goes first; one sample is
``inner`` back-to-back steps between two CUDA events on the current stream, recorded after
a device synchronisation, divided by ``inner`` (``inner`` calibrated so a sample lasts
about 2 ms).  Reported: median milliseconds per step and the median of the per-repetition
ratios.  Times include the host-side Python of each call: for tiny shapes the GPU waits on
the CPU and the ratio measures launch and Python overhead, which is what a user pays.

Usage: ``python bench/bench_cupy.py [--quick] [--markdown FILE]``; importable:
``rows = run()`` returns one dict per case.  Needs only NumPy and CuPy (no pytest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["CASES", "main", "markdown", "run"]

try:  # run as a script from the repository root without installing
    import lsoftmax_core
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import lsoftmax_core


#: n, d, c, dtype, margin, goal (the ratio to stay under, or None).
CASES: list[dict[str, Any]] = [
    {"n": 512, "d": 512, "c": 100_000, "dtype": "float32", "margin": 4, "goal": 1.03},
    {"n": 256, "d": 2, "c": 10, "dtype": "float32", "margin": 4, "goal": 1.5},
    {"n": 512, "d": 512, "c": 100_000, "dtype": "float16", "margin": 4, "goal": None},
    {"n": 256, "d": 2, "c": 10, "dtype": "float16", "margin": 4, "goal": None},
]


def _sample(cupy: Any, step: Callable[[], object], inner: int) -> float:
    cupy.cuda.runtime.deviceSynchronize()
    stream = cupy.cuda.get_current_stream()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for _ in range(inner):
        step()
    end.record(stream)
    end.synchronize()
    return float(cupy.cuda.get_elapsed_time(start, end)) / inner


def _case(cupy: Any, case: dict[str, Any], reps: int, warmup: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    n, d, c, dtype, m = case["n"], case["d"], case["c"], case["dtype"], case["margin"]
    x = cupy.asarray(rng.standard_normal((n, d)).astype(dtype))
    w = cupy.asarray((rng.standard_normal((c, d)) / np.sqrt(d)).astype(dtype))
    g = cupy.asarray((rng.standard_normal((n, c)) / c).astype(dtype))
    label = cupy.asarray(rng.integers(0, c, n))

    def plain() -> object:
        return x @ w.T, g @ w, g.T @ x

    def ours() -> object:
        return (
            lsoftmax_core.forward(x, w, label, margin=m, beta=0.0),
            lsoftmax_core.backward(g, x, w, label, margin=m, beta=0.0),
        )

    for _ in range(warmup):
        plain()
        ours()
    one = max(_sample(cupy, plain, 1), 1e-3)
    inner = max(1, min(200, round(2.0 / one)))
    t_plain, t_ours, ratios = [], [], []
    for r in range(reps):
        first, second = (plain, ours) if r % 2 == 0 else (ours, plain)
        a, b = _sample(cupy, first, inner), _sample(cupy, second, inner)
        tp, to = (a, b) if first is plain else (b, a)
        t_plain.append(tp)
        t_ours.append(to)
        ratios.append(to / tp)
    ratio = statistics.median(ratios)
    goal = case["goal"]
    return {
        **case,
        "plain_ms": statistics.median(t_plain),
        "lsm_ms": statistics.median(t_ours),
        "ratio": ratio,
        "inner": inner,
        "met": None if goal is None else ratio <= goal,
    }


def run(
    cases: list[dict[str, Any]] | None = None, *, reps: int = 30, warmup: int = 5
) -> list[dict[str, Any]]:
    """Time every case; one dict per case (inputs plus plain_ms, lsm_ms, ratio, met)."""
    import cupy

    return [_case(cupy, case, reps, warmup) for case in (CASES if cases is None else cases)]


def _device(cupy: Any) -> str:
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return f"{name}, CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"


def markdown(rows: list[dict[str, Any]], device: str = "") -> str:
    lines = [
        f"GPU: {device}" if device else "",
        "",
        "| N x D x C | dtype | m | linear, 3 GEMMs (ms) | lsoftmax-core fwd+bwd (ms) | ratio | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = "-" if r["goal"] is None else f"<= {r['goal']:.2f}x ({'met' if r['met'] else 'NOT met'})"
        lines.append(
            f"| {r['n']} x {r['d']} x {r['c']} | {r['dtype']} | {r['margin']} | {r['plain_ms']:.4f} "
            f"| {r['lsm_ms']:.4f} | {r['ratio']:.3f}x | {goal} |"
        )
    return "\n".join(lines).lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    import cupy

    rows = run(reps=5 if args.quick else 30, warmup=2 if args.quick else 5)
    table = markdown(rows, _device(cupy))
    if args.markdown is not None:
        args.markdown.write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
