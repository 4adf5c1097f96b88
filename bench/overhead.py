"""The per-call overhead suite: where the GEMMs cost little, what a call of ours costs on top.

CPU, at every layer size, at one thread and at the libraries' default, two interleaved
comparisons: NumPy (the three GEMMs, a whole NumPy linear + softmax-cross-entropy step, the
floor; the core's ``forward`` + ``backward``, the same with the forward's statistics handed
to the backward, and with ``set_cpu_kernels("numba")`` where Numba is installed) and
PyTorch (``F.cross_entropy(F.linear(...))``, the floor, against the adapter's, also with
the Numba kernels).

GPU, at the seed's 256x2x10: the CuPy backend's host time per forward + backward (first
call to last return, the device synchronised before and after each sample, outside the
clock), the same calls' device time, the host time of CuPy's three cuBLAS GEMMs, and the
host time with the small-problem kernels off (``lsoftmax_core.set_gpu_small_kernels``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Callable

import numpy as np

import lsoftmax_core as lsm

from .harness import Case, cpu_clock, cupy_clock
from .layer import NP_LINEAR, TORCH_ADAPTER, TORCH_LINEAR
from .record import Goal, Options, Suite, ok, run_timed, table
from .sizes import BETA, MARGIN, Size, host_arrays, sizes_for

__all__ = ["SUITE", "numpy_ce_step"]

NP_CE_STEP = "numpy linear + softmax CE step"
NP_FWD_BWD = "lsoftmax-core numpy forward+backward"
NP_STATS = "lsoftmax-core numpy, statistics handed to backward"
NP_NUMBA = "lsoftmax-core numpy forward+backward, numba kernels"
TORCH_NUMBA = "lsoftmax-core torch adapter + CE, numba kernels"
CP_HOST = "lsoftmax-core cupy forward+backward: host time"
CP_DEVICE = "lsoftmax-core cupy forward+backward: device time"
CP_GEMMS_HOST = "cupy 3 cuBLAS GEMMs: host time"
CP_GEMM_PLAN = "lsoftmax-core cupy forward+backward, GEMM plan (small-problem kernels off): host time"


def numpy_ce_step(x: np.ndarray, w: np.ndarray, label: np.ndarray) -> Callable[[], object]:
    """A whole NumPy linear + softmax-cross-entropy step as a careful user writes it: logits,
    softmax, mean loss, both gradients, the logits' buffer reused for their gradient."""
    n, rows = len(label), np.arange(len(label))

    def run() -> object:
        z = x @ w.T
        target = z[rows, label]
        m = z.max(axis=1, keepdims=True)
        z -= m
        np.exp(z, out=z)
        s = z.sum(axis=1, keepdims=True)
        loss = np.mean(np.log(s[:, 0]) + m[:, 0] - target)
        z /= s * n  # softmax / N: the gradient of the mean
        z[rows, label] -= z.dtype.type(1.0 / n)
        return loss, z @ w, z.T @ x

    return run


def _numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _with_kernels(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the NumPy backend's per-sample kernels ``name``: contenders alternate, so each sets its own."""
    def run() -> object:
        lsm.set_cpu_kernels(name)
        return fn()

    return run


def _ours(x: Any, w: Any, g: Any, label: Any, stats: bool = False) -> Callable[[], object]:
    def run() -> object:
        if not stats:
            return lsm.forward(x, w, label, margin=MARGIN, beta=BETA), \
                lsm.backward(g, x, w, label, margin=MARGIN, beta=BETA)
        logits, st = lsm.forward(x, w, label, margin=MARGIN, beta=BETA, return_stats=True)
        return logits, lsm.backward(g, x, w, label, margin=MARGIN, beta=BETA, stats=st)

    return run


def _host_clock(fn: Callable[[], object], inner: int) -> float:
    import cupy

    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    t = time.perf_counter() - t0
    cupy.cuda.Device().synchronize()
    return t / inner


def _gemm_plan(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        before = lsm.gpu_small_kernels()
        lsm.set_gpu_small_kernels(False)
        try:
            return fn()
        finally:
            lsm.set_gpu_small_kernels(before)

    return run


def cases(size: Size, dtype: str, device: str, exclude: Sequence[str] = ()) -> list[list[Case]]:
    x64, w64, label64, g64 = host_arrays(size)
    if device == "gpu":
        import cupy

        x, w, g = (cupy.asarray(a.astype(dtype)) for a in (x64, w64, g64))
        ours = _ours(x, w, g, cupy.asarray(label64.copy()))
        return [[Case(CP_GEMMS_HOST, "cupy", CP_GEMMS_HOST, lambda: (x @ w.T, g @ w, g.T @ x), _host_clock),
                 Case(CP_HOST, "cupy", CP_GEMMS_HOST, ours, _host_clock),
                 Case(CP_DEVICE, "cupy", CP_GEMMS_HOST, ours, cupy_clock),
                 Case(CP_GEMM_PLAN, "cupy", CP_GEMMS_HOST, _gemm_plan(ours), _host_clock)]]
    import torch
    import torch.nn.functional as F

    from lsoftmax_core.adapters.torch import lsoftmax

    x, w, g = (a.astype(dtype) for a in (x64, w64, g64))
    label = label64.copy()
    numpy = [Case(NP_LINEAR, "numpy", NP_CE_STEP, lambda: (x @ w.T, g @ w, g.T @ x), cpu_clock),
             Case(NP_CE_STEP, "numpy", NP_CE_STEP, numpy_ce_step(x, w, label), cpu_clock),
             Case(NP_FWD_BWD, "numpy", NP_CE_STEP, _with_kernels("numpy", _ours(x, w, g, label)), cpu_clock),
             Case(NP_STATS, "numpy", NP_CE_STEP, _with_kernels("numpy", _ours(x, w, g, label, True)), cpu_clock)]
    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, w))
    ty = torch.tensor(label)

    def adapter() -> object:
        return torch.autograd.grad(F.cross_entropy(lsoftmax(tx, tw, ty, margin=MARGIN, beta=BETA), ty), (tx, tw))

    pytorch = [Case(TORCH_LINEAR, "torch", TORCH_LINEAR,
                    lambda: torch.autograd.grad(F.cross_entropy(F.linear(tx, tw), ty), (tx, tw)), cpu_clock),
               Case(TORCH_ADAPTER, "torch", TORCH_LINEAR, _with_kernels("numpy", adapter), cpu_clock)]
    if _numba():
        numpy.append(Case(NP_NUMBA, "numpy", NP_CE_STEP, _with_kernels("numba", _ours(x, w, g, label)), cpu_clock))
        pytorch.append(Case(TORCH_NUMBA, "torch", TORCH_LINEAR, _with_kernels("numba", adapter), cpu_clock))
    return [[c for c in grp if not any(t in c.name for t in exclude)] for grp in (numpy, pytorch)]


def _run(opts: Options) -> Iterator[list[dict[str, Any]]]:
    if opts.device == "gpu" and opts.sizes == sizes_for("gpu", "layer"):  # the seed's head alone by default
        opts = replace(opts, sizes=sizes_for("gpu", "layer", ["mnist"]))
    kernels = lsm.cpu_kernels()
    try:
        yield from run_timed(SUITE, replace(opts, memory=False), ("float32",),
                             (1, None) if opts.device == "cpu" else (None,))
    finally:
        lsm.set_cpu_kernels(kernels)


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    sizes = list(dict.fromkeys((r["size"], Size("", r["n"], r["d"], r["c"]).dims) for r in rows))
    out = []
    for count in dict.fromkeys(str(r["threads"]) for r in rows):
        part = [r for r in rows if str(r["threads"]) == count]

        def cell(name: str, size: str, part: list[dict[str, Any]] = part) -> str:
            r = next((r for r in part if r["contender"] == name and r["size"] == size), None)
            if r is None or not ok(r["median_ms"]):
                return "" if r is None else "skipped"
            gemms = next((q for q in part if q["contender"] == NP_LINEAR and q["size"] == size), None)
            short = {NP_CE_STEP: "CE step", TORCH_LINEAR: "floor", CP_GEMMS_HOST: "GEMMs"}.get(r["floor"], r["floor"])
            shown = [] if r["contender"] == r["floor"] or not ok(r["ratio"]) else [f"{r['ratio']:.3g}x {short}"]
            if r["library"] == "numpy" and gemms is not None and r is not gemms and ok(gemms["ratio"]):
                shown.append(f"{r['ratio'] / gemms['ratio']:.3g}x GEMMs")
            us = r["median_ms"] * 1e3
            return (f"{us:.4g} us" if us < 1e4 else f"{us / 1e3:.4g} ms") + (f" ({', '.join(shown)})" if shown else "")

        names = list(dict.fromkeys(r["contender"] for r in part))
        out += [f"## threads: {count}", "", *table(["contender", *(f"{s} {d}" for s, d in sizes)],
                                                  [[n, *(cell(n, s) for s, _ in sizes)] for n in names]), ""]
    return out


_MNIST, _FACE = (256, 2, 10), (256, 512, 10_000)
SUITE = Suite(
    name="overhead", title="Per-call overhead", devices=("cpu", "gpu"),
    about=("Median time per forward + backward, float32, margin 4, beta 0; in parentheses the median of the "
           "per-repetition ratios to the floor of the same interleaved run (`CE step`: a whole NumPy linear + "
           "softmax-CE step; `floor`: `F.cross_entropy(F.linear(x, w), y)`; `GEMMs`: CuPy's three cuBLAS "
           "GEMMs, host time) and, for NumPy rows, that ratio over the three NumPy GEMMs' (`x GEMMs`)."),
    run=_run, markdown=markdown, cases=cases,
    goals={"cpu": (Goal("NumPy fwd+bwd vs NumPy CE step", _MNIST, NP_FWD_BWD, 2.0, threads="1"),
                   Goal("the same, statistics handed to the backward", _MNIST, NP_STATS, 2.0, threads="1"),
                   Goal("torch adapter + CE vs torch floor", _MNIST, TORCH_ADAPTER, 2.0, threads="1"),
                   *(Goal("NumPy fwd+bwd vs 3 NumPy GEMMs", _FACE, NP_FWD_BWD, 1.03, vs=NP_LINEAR, threads=t)
                     for t in ("1", "default")),
                   *(Goal("torch adapter + CE vs torch floor", _FACE, TORCH_ADAPTER, 1.05, threads=t)
                     for t in ("1", "default"))),
           "gpu": (Goal("CuPy backend host time per fwd+bwd", _MNIST, CP_HOST, 0.060, column="median_ms"),)},
)
