"""The layer suite: lsoftmax-core's forward + backward against a plain linear layer and its peers.

* The backend pair, on NumPy (CPU) or CuPy (GPU): ``Y = X Wᵀ, dX = G W, dW = Gᵀ X`` with
  a fixed upstream gradient G (three GEMMs, the floor) against ``lsoftmax_core.forward`` +
  ``backward``: what the margin costs on top of a linear layer.
* PyTorch, the whole loss by ``torch.autograd.grad``: ``cross_entropy(F.linear(X, W))``
  (the floor), ``cross_entropy(lsoftmax(X, W, y))`` through the adapter,
  pytorch-metric-learning's ``LargeMarginSoftmaxLoss`` (scale 1; beta 0) and a plain
  autograd version written here (acos and cos(m·theta)).  ``--exclude torch`` leaves the
  backend pair alone (PyTorch is then not imported).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import lsoftmax_core as lsm

from .harness import Case, Clock, cpu_clock, cupy_clock, torch_cuda_clock
from .record import Goal, Options, Suite, ok, run_timed, table
from .sizes import BETA, MARGIN, Size, host_arrays

__all__ = ["SUITE", "backend_cases", "naive_lsoftmax", "pml_case", "torch_cases"]

NP_LINEAR, NP_LSM = "numpy linear", "lsoftmax-core numpy"
CP_LINEAR, CP_LSM = "cupy linear (cuBLAS)", "lsoftmax-core cupy"
TORCH_LINEAR = "torch linear + CE"
TORCH_ADAPTER = "lsoftmax-core torch adapter + CE"
TORCH_PML = "pytorch-metric-learning LargeMarginSoftmaxLoss"
TORCH_NAIVE = "torch autograd (acos) + CE"


def backend_cases(size: Size, dtype: str, device: str, seed: int = 0) -> list[Case]:
    """The three GEMMs and the core's forward+backward on NumPy (``cpu``) or CuPy (``gpu``)."""
    if device == "cpu":
        import numpy as xp

        names, clock, library = (NP_LINEAR, NP_LSM), cpu_clock, "numpy"
    else:
        import cupy as xp

        names, clock, library = (CP_LINEAR, CP_LSM), cupy_clock, "cupy"
    x64, w64, label64, g64 = host_arrays(size, seed)
    x, w, g = (xp.asarray(a.astype(dtype)) for a in (x64, w64, g64))
    label = xp.asarray(label64.copy())  # a writable array, like a user's

    def ours() -> object:
        logits = lsm.forward(x, w, label, margin=MARGIN, beta=BETA)
        return logits, lsm.backward(g, x, w, label, margin=MARGIN, beta=BETA)

    return [Case(names[0], library, names[0], lambda: (x @ w.T, g @ w, g.T @ x), clock),
            Case(names[1], library, names[0], ours, clock)]


def naive_lsoftmax(x: Any, w: Any, label: Any, margin: int, beta: float) -> Any:
    """L-Softmax logits as a user would write them in autograd: acos, then cos(m·theta); the
    cosine kept a machine epsilon inside ±1, where acos's derivative is infinite."""
    import torch

    logits = x @ w.t()
    target = label[:, None]
    xw = logits.gather(1, target).squeeze(1)
    ab = x.norm(dim=1) * w[label].norm(dim=1)
    eps = torch.finfo(x.dtype).eps
    theta = torch.acos((xw / ab).clamp(-1 + eps, 1 - eps))
    k = torch.floor(theta * (margin / math.pi)).detach()
    psi = (1 - 2 * torch.remainder(k, 2)) * torch.cos(margin * theta) - 2 * k
    return logits.scatter(1, target, ((beta * xw + ab * psi) / (1 + beta))[:, None])


def pml_case(size: Size, x: Any, w: Any, label: Any, clock: Clock) -> Case:
    """pytorch-metric-learning's LargeMarginSoftmaxLoss on the classes of ``w``; a skipped row if missing."""
    import torch

    try:
        from pytorch_metric_learning.losses import LargeMarginSoftmaxLoss
    except ImportError:
        return Case(TORCH_PML, "torch", TORCH_LINEAR, _raises(ImportError("pytorch-metric-learning not installed")),
                    clock, note="pytorch-metric-learning not installed: skipped")
    pml = LargeMarginSoftmaxLoss(num_classes=size.c, embedding_size=size.d, margin=MARGIN, scale=1)
    pml = pml.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        pml.W.copy_(w.detach().t())  # its W is (D, C)
    return Case(TORCH_PML, "torch", TORCH_LINEAR, lambda: torch.autograd.grad(pml(x, label), (x, pml.W)), clock)


def _raises(error: Exception) -> Callable[[], object]:
    def run() -> object:
        raise error

    return run


def torch_cases(size: Size, dtype: str, device: str, seed: int = 0) -> list[Case]:
    import torch
    import torch.nn.functional as F

    from lsoftmax_core.adapters.torch import lsoftmax

    where = "cuda" if device == "gpu" else "cpu"
    x64, w64, label64, _ = host_arrays(size, seed)
    x, w = (torch.tensor(a, dtype=getattr(torch, dtype), device=where, requires_grad=True) for a in (x64, w64))
    label = torch.tensor(label64, device=where)
    clock = torch_cuda_clock if device == "gpu" else cpu_clock

    def grads(loss_of: Callable[[], Any]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(loss_of(), (x, w))

    return [
        Case(TORCH_LINEAR, "torch", TORCH_LINEAR, grads(lambda: F.cross_entropy(F.linear(x, w), label)), clock),
        Case(TORCH_ADAPTER, "torch", TORCH_LINEAR,
             grads(lambda: F.cross_entropy(lsoftmax(x, w, label, margin=MARGIN, beta=BETA), label)), clock),
        Case(TORCH_NAIVE, "torch", TORCH_LINEAR,
             grads(lambda: F.cross_entropy(naive_lsoftmax(x, w, label, MARGIN, BETA), label)), clock),
        pml_case(size, x, w, label, clock),
    ]


def cases(size: Size, dtype: str, device: str, exclude: Sequence[str]) -> list[list[Case]]:
    """NumPy's pair and PyTorch's four in two measurements on CPU (interleaving them would
    only set the two thread pools spinning against each other); one on GPU."""
    groups = [backend_cases(size, dtype, device)]
    if "torch" not in exclude:
        groups.append(torch_cases(size, dtype, device))
    groups = [[c for c in g if not any(t in c.name for t in exclude)] for g in groups]
    return [sum(groups, [])] if device == "gpu" else groups


def _run(opts: Options) -> Iterator[list[dict[str, Any]]]:
    return run_timed(SUITE, opts, ("float32",) if opts.device == "cpu" else ("float32", "float16"))


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    sizes = list(dict.fromkeys((r["size"], Size("", r["n"], r["d"], r["c"]).dims) for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        def cell(name: str, size: str, what: str, dtype: str = dtype) -> str:
            r = next((r for r in rows if r["contender"] == name and r["size"] == size and r["dtype"] == dtype), None)
            if r is None or not ok(r["median_ms"]):
                return "" if r is None else "skipped"
            if what == "mem":
                return f"{r['peak_mib']:.1f}" if ok(r["peak_mib"]) else "n/a"
            return f"{r['ratio']:.2f}x ({r['median_ms']:.3g} ms)" if r["contender"] != r["floor"] \
                else f"**1** ({r['median_ms']:.3g} ms)"

        header = ["contender", *(f"{s} {dims}" for s, dims in sizes)]
        out += [f"## {dtype}: time ratio to the floor (median time)", "",
                *table(header, [[n, *(cell(n, s, "time") for s, _ in sizes)] for n in names]), "",
                f"## {dtype}: peak MiB of one forward+backward above its inputs", "",
                *table(header, [[n, *(cell(n, s, "mem") for s, _ in sizes)] for n in names]), ""]
    return out


SUITE = Suite(
    name="layer", title="Layer: lsoftmax-core against a plain linear layer and its peers", devices=("cpu", "gpu"),
    about=("Forward + backward, margin 4, beta 0. The backend rows: the core's `forward` + `backward` with a fixed "
           "upstream gradient against the three GEMMs of a linear layer in the same library (NumPy or CuPy's "
           "cuBLAS). The PyTorch rows: the whole cross-entropy loss by `torch.autograd.grad`, against "
           "`F.cross_entropy(F.linear(x, w), y)`. Ratio: median of the per-repetition ratios to the floor "
           "measured in the same interleaved run. Memory: peak above the inputs (CPU: resident set, in a "
           "separate process; GPU: the allocator's peak)."),
    run=_run, markdown=markdown, cases=cases,
    goals={"cpu": (Goal("NumPy backend fwd+bwd vs NumPy linear", (256, 512, 10_000), NP_LSM, 1.05),
                   Goal("torch adapter + CE: times faster than pytorch-metric-learning", (256, 512, 10_000),
                        TORCH_PML, 3.0, vs=TORCH_ADAPTER, at_least=True)),
           "gpu": (Goal("CuPy backend fwd+bwd vs 3 cuBLAS GEMMs", (512, 512, 100_000), CP_LSM, 1.03),
                   Goal("CuPy backend fwd+bwd vs 3 cuBLAS GEMMs", (256, 2, 10), CP_LSM, 1.5),
                   Goal("torch adapter + CE: times faster than pytorch-metric-learning", (512, 512, 100_000),
                        TORCH_PML, 3.0, vs=TORCH_ADAPTER, at_least=True))},
)
