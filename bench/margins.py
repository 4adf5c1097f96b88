"""The margin family's suite: every kind of ``margin=`` against the plain layer, L-Softmax and PyTorch.

CPU, float32, beta 0, two comparisons, each one interleaved measurement per size:

* the layer (the "face" size of the layer table, 256x512x10k): the three NumPy GEMMs of a
  plain linear layer, ``x·Wᵀ, G·W, Gᵀ·x`` with a fixed upstream gradient G (the floor, as in
  the layer and overhead suites), against the core's ``forward`` + ``backward`` for each kind
  (:data:`KINDS`: margin=4, i.e. L-Softmax, SphereFace, CosFace, ArcFace, CombinedMargin);
* the fused loss (the loss table's "ce-small" 2048x256x10k and "ce-large" 2048x256x100k):
  the core's ``cross_entropy_with_grad`` at its defaults for each kind, the floor being
  L-Softmax's, plus ArcFace with ``subcenters=3`` on a (3C, D) weight, the three GEMMs of
  :func:`bench.loss.three_gemms` and PyTorch's own ``F.linear_cross_entropy`` with the
  default ``LinearCrossEntropyOptions()`` (the loss suite's peer), every one giving the mean
  loss and the gradients for X and W.

Threads as the loss suite: ``--threads N`` caps NumPy's BLAS and PyTorch at N, else the
libraries' default; the goals are at one thread (``python -m bench margins --threads 1``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np

import lsoftmax_core as lsm

from .harness import Case, cpu_clock
from .layer import NP_LINEAR
from .loss import GEMMS, TORCH_LCE, three_gemms
from .record import Goal, Options, Suite, ok, run_timed, table
from .sizes import BETA, MARGIN, Size, host_arrays

__all__ = ["KINDS", "SUBCENTERS", "SUITE", "cases", "fused_name", "layer_name", "subcenter_name"]

#: The kinds, with the papers' values (docs/margins.md): an int is L-Softmax's margin.
KINDS: tuple[int | lsm.Margin, ...] = (MARGIN, lsm.SphereFace(4), lsm.CosFace(0.35, 64.0), lsm.ArcFace(0.5, 64.0),
                                       lsm.CombinedMargin(1.0, 0.3, 0.2, 64.0))
#: Centres per class of the sub-centre row (SubCenter-ArcFace's k).
SUBCENTERS = 3
SUBCENTER_KIND = lsm.ArcFace(0.5, 64.0)


def _kind(kind: int | lsm.Margin) -> str:
    return f"margin={kind} (L-Softmax)" if isinstance(kind, int) else repr(kind)


def layer_name(kind: int | lsm.Margin) -> str:
    return f"lsoftmax-core numpy fwd+bwd, {_kind(kind)}"


def fused_name(kind: int | lsm.Margin) -> str:
    return f"lsoftmax-core numpy fused CE, {_kind(kind)}"


def subcenter_name() -> str:
    return f"{fused_name(SUBCENTER_KIND)}, subcenters={SUBCENTERS} on a ({SUBCENTERS}C, D) weight"


LSM_FUSED = fused_name(MARGIN)


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(t in name for t in exclude)


def _layer(size: Size, dtype: str) -> list[Case]:
    """The plain layer's three GEMMs (the floor) and the core's forward + backward per kind."""
    x64, w64, label64, g64 = host_arrays(size)
    assert g64 is not None  # the layer table's sizes have an upstream gradient
    x, w, g = (a.astype(dtype) for a in (x64, w64, g64))
    label = label64.copy()  # a writable array, like a user's

    def ours(kind: int | lsm.Margin) -> Callable[[], object]:
        def run() -> object:
            logits = lsm.forward(x, w, label, margin=kind, beta=BETA)
            return logits, lsm.backward(g, x, w, label, margin=kind, beta=BETA)

        return run

    group = [Case(NP_LINEAR, "numpy", NP_LINEAR, lambda: (x @ w.T, g @ w, g.T @ x), cpu_clock)]
    group += [Case(layer_name(k), "numpy", NP_LINEAR, ours(k), cpu_clock) for k in KINDS]
    return group


def _fused(x: Any, w: Any, label: Any, kind: int | lsm.Margin, subcenters: int = 1) -> Callable[[], object]:
    return lambda: lsm.cross_entropy_with_grad(x, w, label, margin=kind, beta=BETA, reduction="mean",
                                               subcenters=subcenters)


def _loss(size: Size, dtype: str, exclude: Sequence[str]) -> list[Case]:
    """The fused loss per kind (L-Softmax's is the floor), sub-centres, the three GEMMs and
    ``F.linear_cross_entropy``, on the same float32 inputs (NumPy views of the torch tensors)."""
    x64, w64, label64, _ = host_arrays(size)
    group = []
    if _excluded(TORCH_LCE, exclude):  # e.g. --exclude torch: PyTorch not imported
        x, w, label = x64.astype(dtype), w64.astype(dtype), label64.copy()
    else:
        import torch
        import torch.nn.functional as F

        tx, tw = (torch.tensor(a, dtype=getattr(torch, dtype), requires_grad=True) for a in (x64, w64))
        ty = torch.tensor(label64)
        options = torch.nn.LinearCrossEntropyOptions()
        group.append(Case(TORCH_LCE, "torch", LSM_FUSED, lambda: torch.autograd.grad(
            F.linear_cross_entropy(tx, tw, ty, options=options), (tx, tw)), cpu_clock))
        x, w, label = tx.detach().numpy(), tw.detach().numpy(), ty.numpy()
    group.append(Case(GEMMS, "numpy", LSM_FUSED, three_gemms(np, x, w), cpu_clock))
    group += [Case(fused_name(k), "numpy", LSM_FUSED, _fused(x, w, label, k), cpu_clock) for k in KINDS]
    if not _excluded(subcenter_name(), exclude):  # its own weight, drawn only when it runs
        rng = np.random.default_rng(1)
        centres = (rng.standard_normal((SUBCENTERS * size.c, size.d)) / math.sqrt(size.d)).astype(dtype)
        group.append(Case(subcenter_name(), "numpy", LSM_FUSED,
                          _fused(x, centres, label, SUBCENTER_KIND, SUBCENTERS), cpu_clock,
                          note=f"{SUBCENTERS}x the classes' rows, so {SUBCENTERS}x the GEMMs of the other rows: "
                               "no goal"))
    return group


def cases(size: Size, dtype: str, device: str, exclude: Sequence[str] = ()) -> list[list[Case]]:
    """One interleaved group per size: the layer's at a size of the layer table, the fused
    loss's at one of the loss table; without the contenders whose name contains a text of
    ``exclude`` (never the group's floor: ValueError)."""
    if device != "cpu":
        raise ValueError("the margins suite runs on the CPU only")
    group = _layer(size, dtype) if size.table == "layer" else _loss(size, dtype, exclude)
    floor = group[0].floor if size.table == "layer" else LSM_FUSED
    group = [c for c in group if not _excluded(c.name, exclude)]
    if floor not in {c.name for c in group}:
        raise ValueError(f"--exclude {','.join(exclude)} leaves out {floor}, which every ratio needs")
    return [group]


def _run(opts: Options) -> Iterator[list[dict[str, Any]]]:
    return run_timed(SUITE, opts, ("float32",))


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["size"], Size("", r["n"], r["d"], r["c"]).dims, str(r["threads"])), []).append(r)
    for (size, dims, count), here in groups.items():
        def vs(r: dict[str, Any], name: str, column: str = "ratio", here: list[Any] = here) -> str:
            ref = next((q for q in here if q["contender"] == name), None)
            a, b = r[column], None if ref is None else ref[column]
            return f"{a / b:.3f}x" if ok(a) and ok(b) and b else "n/a"

        def time(r: dict[str, Any]) -> str:
            return f"{r['median_ms']:.4g} ms" if ok(r["median_ms"]) else "skipped"

        def ratio(r: dict[str, Any]) -> str:
            return "**1**" if r["contender"] == r["floor"] else (f"{r['ratio']:.3f}x" if ok(r["ratio"]) else "n/a")

        def mib(r: dict[str, Any]) -> str:
            return f"{r['peak_mib']:.0f}" if ok(r["peak_mib"]) else "n/a"

        title = f"## {size} {dims}, {here[0]['dtype']}, threads: {count}"
        if here[0]["floor"] == NP_LINEAR:
            out += [f"{title}: forward + backward of the layer", "",
                    *table(["contender", "median time", "time / numpy linear", "peak MiB"],
                           [[r["contender"], time(r), ratio(r), mib(r)] for r in here]), ""]
        else:
            out += [f"{title}: the fused loss", "",
                    *table(["contender", "median time", "time / L-Softmax", "time / F.linear_cross_entropy",
                            "peak MiB", "memory / L-Softmax", "memory / F.linear_cross_entropy"],
                           [[r["contender"], time(r), ratio(r), vs(r, TORCH_LCE), mib(r),
                             vs(r, LSM_FUSED, "peak_mib"), vs(r, TORCH_LCE, "peak_mib")] for r in here]), ""]
    return out


def _goals() -> tuple[Goal, ...]:
    # The goals: the loss at ce-large only (at ce-small, 10k classes, the logits are
    # no larger than the budget's chunk, and the rows are for information).
    face, losses = (256, 512, 10_000), ((2048, 256, 100_000),)
    goals = [Goal(f"{_kind(k)} fwd+bwd vs numpy linear", face, layer_name(k), 1.05, threads="1") for k in KINDS]
    for dims in losses:
        for k in KINDS:
            name = fused_name(k)
            if not isinstance(k, int):  # L-Softmax's own row is the floor
                goals += [Goal(f"{_kind(k)} fused CE time vs L-Softmax's", dims, name, 1.05, vs=LSM_FUSED,
                               threads="1"),
                          Goal(f"{_kind(k)} fused CE peak memory vs L-Softmax's", dims, name, 1.05, vs=LSM_FUSED,
                               column="peak_mib", threads="1")]
            goals += [Goal(f"{_kind(k)} fused CE time vs F.linear_cross_entropy", dims, name, 0.5, vs=TORCH_LCE,
                           threads="1"),
                      Goal(f"{_kind(k)} fused CE peak memory vs F.linear_cross_entropy", dims, name, 1.0,
                           vs=TORCH_LCE, column="peak_mib", threads="1")]
    return tuple(goals)


SUITE = Suite(
    name="margins", title="Margins: every kind of margin= against the plain layer, L-Softmax and PyTorch",
    devices=("cpu",), table="layer:face,loss",
    about=("Float32, beta 0; the kinds: margin=4 (L-Softmax), SphereFace(4), CosFace(0.35, 64), ArcFace(0.5, 64), "
           "CombinedMargin(1.0, 0.3, 0.2, 64). The layer (256x512x10k): the core's `forward` + `backward` with a "
           "fixed upstream gradient against the three GEMMs of a plain linear layer (`numpy linear`). The fused "
           "loss: `cross_entropy_with_grad` at its defaults (mean loss, gradients for X and W) against "
           "L-Softmax's (the floor of the ratios), PyTorch's `F.linear_cross_entropy` with "
           "`LinearCrossEntropyOptions()` (no margin) and the three GEMMs of any exact forward + backward; "
           "the sub-centre row has a (3C, D) weight. Ratios to the floor: medians of per-repetition ratios of "
           "one interleaved run; to `F.linear_cross_entropy`: ratios of two such ratios. Memory: peak resident "
           "set above the inputs of one call, in a separate process; outputs count (grad_w is C x D)."),
    run=_run, markdown=markdown, cases=cases,
    settings={"cpu": (7, 1, 0.02)},
    goals={"cpu": _goals()},
)
