"""The loss suite: the fused L-Softmax cross-entropy at sizes where the N x C logits are the memory.

Every contender computes a mean cross-entropy over the batch and its gradients for X and W
from the same inputs, in one interleaved measurement per size and dtype:

* ``torch linear + CE``: ``F.cross_entropy(F.linear(X, W), y)`` by autograd, the floor of
  every ratio (no margin); it is ``F.linear_cross_entropy(..., options=None)``, PyTorch's
  unchunked reference;
* ``F.linear_cross_entropy`` with the default ``LinearCrossEntropyOptions()``: PyTorch's
  own batch-chunked fused loss (plain softmax), the peer that never holds the logits;
* ``3 GEMMs``: ``x·Wᵀ``, ``G·W``, ``Gᵀ·x`` in class chunks of 64 MiB, nothing else (NumPy on
  CPU, PyTorch on GPU): the floor of any exact forward + backward;
* the unfused L-Softmax loss ``F.cross_entropy(lsoftmax(X, W, y))`` (holds the logits and
  their gradient), pytorch-metric-learning, the adapter's fused ``lsoftmax_cross_entropy``;
* the core's ``cross_entropy_with_grad`` (NumPy on CPU, CuPy on GPU) at its defaults and at
  a few chunkings and memory budgets; on CPU also the unfused loss written with the core's
  ``forward``/``backward`` and NumPy (same BLAS as the fused one).

On GPU the inputs are drawn on the device (PyTorch) and shared with CuPy through DLPack.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np

import lsoftmax_core as lsm

from .harness import Case, cpu_clock, cupy_clock, torch_cuda_clock
from .layer import TORCH_ADAPTER, TORCH_LINEAR, TORCH_PML, _raises, pml_case
from .record import Goal, Options, Suite, ok, run_timed, table
from .sizes import BETA, MARGIN, Size, device_arrays, host_arrays

__all__ = ["SUITE", "cases", "three_gemms"]

TORCH_LCE = "torch F.linear_cross_entropy, LinearCrossEntropyOptions()"
TORCH_FUSED = "lsoftmax-core torch lsoftmax_cross_entropy (fused)"
NP_UNFUSED = "lsoftmax-core numpy forward/backward + CE (unfused)"
GEMMS = "3 GEMMs (x·Wᵀ, G·W, Gᵀ·x), 64 MiB class chunks"
#: (chunking, budget MiB) of the core's fused loss beside its defaults, per device.
SETTINGS = {"cpu": (("rows", 64), ("rows", 256), ("classes", 64), ("classes", 256)),
            "gpu": (("rows", 64), ("rows", 1024), ("classes", 64), ("classes", 1024))}
REQUIRED = (TORCH_LINEAR, TORCH_ADAPTER)


def fused_name(library: str, chunking: str | None = None, budget_mib: int | None = None) -> str:
    what = "default" if chunking is None else f"{chunking}, {budget_mib} MiB"
    return f"lsoftmax-core {library} fused CE, {what}"


def three_gemms(xp: Any, x: Any, w: Any, chunk_bytes: int = 64 * 2**20) -> Callable[[], object]:
    """``xp`` (numpy or torch) computes Z = x·Wᵀ, grad_x += Z·W and grad_w = Zᵀ·x a class chunk
    of ``chunk_bytes`` of Z at a time: the three GEMMs of an exact forward + backward, with Z
    standing in for the logits' gradient."""
    n, c = x.shape[0], w.shape[0]
    step = max(1, chunk_bytes // (n * x.element_size() if hasattr(x, "element_size") else n * x.itemsize))

    def run() -> object:
        gx, gw = xp.zeros_like(x), xp.empty_like(w)
        for c0 in range(0, c, step):
            wc = w[c0:c0 + step]
            z = x @ wc.T
            gx += z @ wc
            xp.matmul(z.T, x, out=gw[c0:c0 + step])
        return gx, gw

    return run


def _fused(x: Any, w: Any, label: Any, chunking: str | None, budget_mib: int | None) -> Callable[[], object]:
    kw = {} if chunking is None else {"chunking": chunking, "memory_budget": budget_mib * 2**20}
    return lambda: lsm.cross_entropy_with_grad(x, w, label, margin=MARGIN, beta=BETA, reduction="mean", **kw)


def _core_cases(library: str, x: Any, w: Any, label: Any, device: str, clock: Any) -> list[Case]:
    n, c, itemsize = x.shape[0], w.shape[0], x.dtype.itemsize
    plan = lsm.plan_chunks(n, c, itemsize)
    note = (f"default plan at {lsm.DEFAULT_MEMORY_BUDGET // 2**20} MiB: {plan.mode} chunks of {plan.size} "
            f"({-(-(n if plan.mode == 'rows' else c) // plan.size)} chunks)")
    out = [Case(fused_name(library), library, TORCH_LINEAR, _fused(x, w, label, None, None), clock, note=note)]
    out += [Case(fused_name(library, m, b), library, TORCH_LINEAR, _fused(x, w, label, m, b), clock)
            for m, b in SETTINGS[device]]
    return out


def _numpy_unfused(x: np.ndarray, w: np.ndarray, label: np.ndarray) -> Callable[[], object]:
    """As a careful NumPy user would: the logits' buffer becomes their gradient."""
    n, rows = len(label), np.arange(len(label))

    def run() -> object:
        f = lsm.forward(x, w, label, margin=MARGIN, beta=BETA)
        target = f[rows, label].astype(np.float64)
        m = f.max(axis=1, keepdims=True)
        f -= m
        np.exp(f, out=f)
        s = f.sum(axis=1, keepdims=True, dtype=np.float64)
        loss = np.mean(np.log(s[:, 0]) + m[:, 0] - target)
        f *= (1.0 / (s * n)).astype(f.dtype)  # softmax / N: the gradient of the mean
        f[rows, label] -= f.dtype.type(1.0 / n)
        return loss, lsm.backward(f, x, w, label, margin=MARGIN, beta=BETA)

    return run


def cases(size: Size, dtype: str, device: str, exclude: Sequence[str] = ()) -> list[list[Case]]:
    """One interleaved group, without the contenders whose name contains a text of ``exclude``
    (never the floor or the unfused loss, which the ratios need: ValueError)."""
    import torch
    import torch.nn.functional as F

    from lsoftmax_core.adapters import torch as adapter

    if device == "gpu":
        x, w, label = device_arrays(size, dtype)
        clock: Any = torch_cuda_clock
    else:
        x64, w64, label64, _ = host_arrays(size)
        x, w, label = torch.tensor(x64, dtype=getattr(torch, dtype)), torch.tensor(w64, dtype=getattr(torch, dtype)), \
            torch.tensor(label64)
        clock = cpu_clock
    x.requires_grad_(True)
    w.requires_grad_(True)

    def grads(loss_of: Callable[[], Any]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(loss_of(), (x, w))

    lce = getattr(F, "linear_cross_entropy", None)
    group = [
        Case(TORCH_LINEAR, "torch", TORCH_LINEAR, grads(lambda: F.cross_entropy(F.linear(x, w), label)), clock),
        Case(TORCH_LCE, "torch", TORCH_LINEAR,
             _raises(NotImplementedError(f"torch {torch.__version__} has no F.linear_cross_entropy")) if lce is None
             else grads(lambda: lce(x, w, label, options=torch.nn.LinearCrossEntropyOptions())), clock),
        Case(TORCH_ADAPTER, "torch", TORCH_LINEAR,
             grads(lambda: F.cross_entropy(adapter.lsoftmax(x, w, label, margin=MARGIN, beta=BETA), label)), clock),
        pml_case(size, x, w, label, clock),
        Case(TORCH_FUSED, "torch", TORCH_LINEAR,
             grads(lambda: adapter.lsoftmax_cross_entropy(x, w, label, margin=MARGIN, beta=BETA)), clock),
    ]
    if device == "cpu":
        xn, wn, ln = x.detach().numpy(), w.detach().numpy(), label.numpy()
        group.append(Case(GEMMS, "numpy", TORCH_LINEAR, three_gemms(np, xn, wn), clock))
        group += _core_cases("numpy", xn, wn, ln, device, clock)
        group.append(Case(NP_UNFUSED, "numpy", TORCH_LINEAR, _numpy_unfused(xn, wn, ln), clock))
    else:
        xd, wd = x.detach(), w.detach()
        group.append(Case(GEMMS, "torch", TORCH_LINEAR, three_gemms(torch, xd, wd), clock))
        group += _cupy_cases(xd, wd, label, dtype)
    group = [c for c in group if not any(t in c.name for t in exclude)]
    if not set(REQUIRED) <= {c.name for c in group}:
        raise ValueError(f"--exclude {','.join(exclude)} leaves out the floor or the unfused loss, which every "
                         "ratio needs")
    return [group]


def _cupy_cases(x: Any, w: Any, label: Any, dtype: str) -> list[Case]:
    """The CuPy fused loss on the same device memory, or one skipped row saying why not."""
    try:
        import cupy

        if dtype not in {str(d) for d in lsm.supported_dtypes("cupy")}:
            raise TypeError(f"the CuPy backend takes no {dtype}")
        xc, wc, lc = (cupy.from_dlpack(t) for t in (x, w, label))
    except Exception as e:  # noqa: BLE001 - said in the row; the torch rows still come
        why = f"{type(e).__name__}: {e}".replace("\n", " ")[:160]
        return [Case(fused_name("cupy"), "cupy", TORCH_LINEAR, _raises(NotImplementedError(why)), cupy_clock,
                     note=f"not measured: {why}")]
    return _core_cases("cupy", xc, wc, lc, "gpu", cupy_clock)


def _run(opts: Options) -> Iterator[list[dict[str, Any]]]:
    return run_timed(SUITE, opts, ("float32",) if opts.device == "cpu" else ("float32", "bfloat16"))


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for (size, dims), here in _groups([r for r in rows if r["dtype"] == dtype]).items():
            def vs(r: dict[str, Any], name: str, column: str = "ratio", here: list[Any] = here) -> str:
                ref = next((q for q in here if q["contender"] == name), None)
                a, b = r[column], None if ref is None else ref[column]
                return f"{a / b:.2f}x" if ok(a) and ok(b) and b else "n/a"

            body = [[r["contender"], f"{r['median_ms']:.4g} ms" if ok(r["median_ms"]) else "skipped",
                     "**1**" if r["contender"] == r["floor"] else (f"{r['ratio']:.2f}x" if ok(r["ratio"]) else "n/a"),
                     vs(r, GEMMS), vs(r, TORCH_ADAPTER), f"{r['peak_mib']:.0f}" if ok(r["peak_mib"]) else "n/a",
                     vs(r, TORCH_ADAPTER, "peak_mib")] for r in here]
            out += [f"## {size} {dims}, {dtype}, threads: {here[0]['threads']}", "",
                    *table(["contender", "median time", "time / torch floor", "time / 3 GEMMs", "time / unfused",
                            "peak MiB", "memory / unfused"], body), ""]
    return out


def _groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["size"], Size("", r["n"], r["d"], r["c"]).dims), []).append(r)
    return out


_SHAPE = (2048, 256, 100_000)
SUITE = Suite(
    name="loss", title="Loss: the fused L-Softmax cross-entropy", devices=("cpu", "gpu"), table="loss",
    about=("Forward + backward of the whole mean cross-entropy (margin 4, beta 0 for L-Softmax), gradients for X "
           "and W. `time / torch floor`: median of the per-repetition ratios to `torch linear + CE` "
           "(`F.linear` + `F.cross_entropy`, PyTorch's unchunked reference, no margin); `time / 3 GEMMs` and "
           "`time / unfused` (against `F.cross_entropy(lsoftmax(...))`) are ratios of two such ratios. Memory: "
           "peak above the inputs of one call (CPU: resident set, in a separate process; GPU: the allocators' "
           "peaks); outputs count (grad_w alone is C x D). The core's rows at its defaults say their plan."),
    run=_run, markdown=markdown, cases=cases,
    settings={"cpu": (7, 1, 0.02), "gpu": (5, 1, 0.005)},
    goals={"cpu": (Goal("fused (defaults) peak memory vs unfused", _SHAPE, fused_name("numpy"), 0.125,
                        vs=TORCH_ADAPTER, column="peak_mib"),
                   Goal("fused (defaults) time vs 3 GEMMs", _SHAPE, fused_name("numpy"), 1.20, vs=GEMMS),
                   Goal("fused (defaults): times faster than pytorch-metric-learning", _SHAPE, TORCH_PML, 3.0,
                        vs=fused_name("numpy"), at_least=True),
                   Goal("torch lsoftmax_cross_entropy peak memory vs unfused", _SHAPE, TORCH_FUSED, 0.125,
                        vs=TORCH_ADAPTER, column="peak_mib"))},
)
