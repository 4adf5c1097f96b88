"""The one size table and the contenders, each prepared at one size as a :class:`bench.harness.Case`.

Two kinds of work are timed:

* ``layer``: forward + backward of the last layer alone, with a fixed random upstream
  gradient G: ``Y = X W^T``, ``dX = G W``, ``dW = G^T X`` for a plain linear layer (three
  GEMMs, the floor), ``lsoftmax_core.forward`` + ``lsoftmax_core.backward`` for ours.
  NumPy on CPU, CuPy on GPU: there the floor is the three cuBLAS GEMMs through CuPy, on
  the same device arrays, and the ratio is what the margin costs on top of a linear
  layer, i.e. the kernels of ``kernels/*.cu`` (O(N·D) work) plus the Python of
  ``forward``/``backward``.  At tiny sizes the GPU waits on the CPU, so the ratio there
  measures launch and Python overhead, which is what a user pays.  These are the only
  contenders of ``python -m bench --layer-only`` (no PyTorch needed).
* ``loss``: forward + backward of the whole loss, ``d loss / d(X, W)`` by
  ``torch.autograd.grad``: ``cross_entropy(F.linear(X, W))`` (the floor),
  ``cross_entropy(lsoftmax(X, W, y))`` through our PyTorch adapter,
  pytorch-metric-learning's ``LargeMarginSoftmaxLoss`` (scale 1, same margin; it has no
  beta, i.e. beta = 0, and it takes the mean like ``cross_entropy``), and a plain
  autograd version written here (acos and cos(m·theta)).
* the fused cross-entropy (the sizes of the ``loss`` suite, ``python -m bench --loss``):
  the whole L-Softmax loss, forward + backward, at sizes where the N×C logits are the
  memory: the core's ``cross_entropy_with_grad`` in row and class chunks at a few memory
  budgets, the PyTorch adapter's ``lsoftmax_cross_entropy`` where it exists (autograd),
  the unfused ``cross_entropy(lsoftmax(X, W, y))`` in PyTorch and in NumPy, the PyTorch
  floor and pytorch-metric-learning, all against the PyTorch floor (see
  :func:`loss_cases`).  On GPU the CuPy fused loss takes the NumPy one's place (skipped
  with a note where CuPy or a dtype is missing).

Every contender uses margin 4 (the seed's LeNet and pytorch-metric-learning's default)
and beta 0 (the only value pytorch-metric-learning has); neither changes our cost, which
is O(m) per sample.  Inputs are standard normal features and N(0, 1/D) weights, drawn
once per size in float64 and converted to each library and dtype, so no float32 value
is subnormal (in float16 about 1% of the upstream gradient is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np

import lsoftmax_core as lsm

from .harness import Case, Clock, cpu_clock, cupy_clock, torch_cuda_clock

__all__ = [
    "BETA",
    "CPU_SIZES",
    "DEVICES",
    "DTYPES",
    "FUSED",
    "GPU_SIZES",
    "LOSS_DTYPES",
    "MARGIN",
    "SIZES",
    "SUITES",
    "Size",
    "cupy_cases",
    "dtypes_for",
    "loss_cases",
    "naive_lsoftmax",
    "numpy_cases",
    "numpy_ce_step",
    "sizes_for",
    "torch_cases",
]

MARGIN = 4
BETA = 0.0


DEVICES = ("cpu", "gpu")

#: "main": the layer and loss contenders of the first tables (``python -m bench --cpu``);
#: "loss": the fused cross-entropy comparison (``python -m bench --cpu --loss``).
SUITES = ("main", "loss")


@dataclass(frozen=True)
class Size:
    """One N x D x C of the last layer, and the devices it is measured on.

    A name is unique per device and suite, not overall: "face" is the face-recognition
    scale of each device (10k classes on a 2-core CPU, 100k on a GPU), so that a goal or a
    table column keeps its name from one device to the other.  ``suite`` says which
    comparison the size belongs to (:data:`SUITES`).
    """

    name: str
    n: int
    d: int
    c: int
    devices: tuple[str, ...] = DEVICES
    suite: str = "main"

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}, not {self.suite!r}")

    @property
    def dims(self) -> str:
        c = f"{self.c // 1000}k" if self.c >= 1000 and self.c % 1000 == 0 else str(self.c)
        return f"{self.n}x{self.d}x{c}"

    @property
    def label(self) -> str:
        return f"{self.name} {self.dims}"


#: The one size table of ``python -m bench``, for every device.  "mnist" is the seed's
#: LeNet head (a 2-D embedding, 10 classes): there the GEMMs cost nothing and what is
#: measured is per-call overhead.  "cifar" is a small classifier head; "face" a large
#: one, where the three GEMMs dominate and the margin's O(N·D) work should vanish.
SIZES: tuple[Size, ...] = (
    Size("mnist", 256, 2, 10),
    Size("cifar", 256, 256, 100),
    Size("face", 256, 512, 10_000, devices=("cpu",)),
    Size("face", 512, 512, 100_000, devices=("gpu",)),
    # The fused cross-entropy (suite "loss"): N x C logits of 80 MB and 800 MB in float32
    # on CPU, 32 GB on GPU, where holding them is what the fused loss avoids.
    Size("ce-small", 2048, 256, 10_000, devices=("cpu",), suite="loss"),
    Size("ce-large", 2048, 256, 100_000, devices=("cpu",), suite="loss"),
    Size("ce-large", 8192, 512, 1_000_000, devices=("gpu",), suite="loss"),
)

#: The dtypes measured on each device (CPU: float32 only; the CuPy backend also float16).
DTYPES: dict[str, tuple[str, ...]] = {"cpu": ("float32",), "gpu": ("float32", "float16")}
#: The dtypes of the fused cross-entropy comparison (what the issue asks for on GPU).
LOSS_DTYPES: dict[str, tuple[str, ...]] = {"cpu": ("float32",), "gpu": ("float32", "bfloat16")}


def dtypes_for(device: str, suite: str = "main") -> tuple[str, ...]:
    return (LOSS_DTYPES if suite == "loss" else DTYPES)[device]


def sizes_for(device: str, names: Sequence[str] | None = None, suite: str = "main") -> tuple[Size, ...]:
    """The sizes of :data:`SIZES` of ``suite`` measured on ``device``, optionally only those ``names``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, not {suite!r}")
    sizes = tuple(s for s in SIZES if device in s.devices and s.suite == suite)
    if names is None:
        return sizes
    unknown = sorted(set(names) - {s.name for s in sizes})
    if unknown:
        where = f"{device}" + (" --loss" if suite == "loss" else "")
        raise ValueError(f"no size {', '.join(unknown)} on {where}; known: {', '.join(s.name for s in sizes)}")
    return tuple(s for s in sizes if s.name in names)


CPU_SIZES = sizes_for("cpu")
GPU_SIZES = sizes_for("gpu")

# Contender names, used as keys in the CSV and the goals.
NP_LINEAR = "numpy linear"
NP_LSM = "lsoftmax-core numpy"
CP_LINEAR = "cupy linear (cuBLAS)"
CP_LSM = "lsoftmax-core cupy"
TORCH_LINEAR = "torch linear + CE"
TORCH_ADAPTER = "lsoftmax-core torch adapter + CE"
TORCH_PML = "pytorch-metric-learning LargeMarginSoftmaxLoss"
TORCH_NAIVE = "torch autograd (acos) + CE"
# The fused cross-entropy comparison (suite "loss"); the floor is TORCH_LINEAR, the
# unfused reference TORCH_ADAPTER (cross_entropy(lsoftmax(...)), the same op as above).
TORCH_FUSED = "lsoftmax-core torch lsoftmax_cross_entropy (fused)"
NP_UNFUSED = "lsoftmax-core numpy forward/backward + CE (unfused)"


@dataclass(frozen=True)
class Fused:
    """One setting of the core's fused loss: the library, ``chunking`` and ``memory_budget``."""

    library: str
    chunking: str
    budget_mib: int

    @property
    def name(self) -> str:
        return f"lsoftmax-core {self.library} fused CE, {self.chunking}, {self.budget_mib} MiB"


#: The fused loss's settings measured per library: each chunking at the core's default
#: budget (64 MiB) and two others.  On CPU rows go up to 1 GiB rather than down to 16 MiB:
#: each row chunk re-reads the C x D weights (packed by the BLAS for the logits and for
#: G·W) and adds a C x D product into grad_w, so at C=100k a 16 MiB chunk of 10 rows takes
#: minutes per call.  On GPU, where a row of 1M logits is 4 MB, larger budgets (the CuPy
#: fused loss, never measured yet).
FUSED: dict[str, tuple[Fused, ...]] = {
    "numpy": (*(Fused("numpy", "rows", b) for b in (64, 256, 1024)),
              *(Fused("numpy", "classes", b) for b in (16, 64, 256))),
    "cupy": tuple(Fused("cupy", m, b) for m in ("rows", "classes") for b in (64, 1024, 4096)),
}
CP_FUSED_MISSING = "lsoftmax-core cupy fused CE"


@lru_cache(maxsize=1)
def _data(size: Size, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """float64 x (N, D), w (C, D), upstream gradient (N, C) and int64 labels (N,).

    The last size's arrays are kept (read-only): every library and dtype at one size
    converts the same ones, and at 512x512x100k drawing them takes seconds.  The sizes
    of the loss suite have no upstream gradient (None): a loss's is a scalar, and an
    N x C one in float64 would be 64 GB at 8192x1M.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size.n, size.d))
    w = rng.standard_normal((size.c, size.d)) / math.sqrt(size.d)
    g = None if size.suite == "loss" else rng.standard_normal((size.n, size.c)) / size.n
    label = rng.integers(0, size.c, size.n)
    for a in (x, w, g, label):
        if a is not None:
            a.flags.writeable = False
    return x, w, g, label


# --------------------------------------------------------------------------- NumPy / CuPy


def _layer_cases(xp: Any, library: str, linear_name: str, lsm_name: str, clock: Any,
                 size: Size, dtype: str, seed: int) -> list[Case]:
    x64, w64, g64, label64 = _data(size, seed)
    if g64 is None:
        raise ValueError(f"{size.label} is a size of the loss suite: no layer contenders there")
    x, w, g = (xp.asarray(a.astype(dtype)) for a in (x64, w64, g64))
    label = xp.asarray(label64.copy())  # a writable array of the library, like a user's

    def linear() -> object:
        return x @ w.T, g @ w, g.T @ x

    def ours() -> object:
        logits = lsm.forward(x, w, label, margin=MARGIN, beta=BETA)
        return logits, lsm.backward(g, x, w, label, margin=MARGIN, beta=BETA)

    return [
        Case(linear_name, library, "layer", linear_name, linear, clock),
        Case(lsm_name, library, "layer", linear_name, ours, clock),
    ]


def numpy_ce_step(x: np.ndarray, w: np.ndarray, label: np.ndarray) -> Callable[[], object]:
    """A whole NumPy linear + softmax-cross-entropy step, as a careful NumPy user writes it:
    logits, softmax, the mean loss and both gradients (three GEMMs and the O(N·C) softmax),
    the logits' buffer reused for their gradient.  The floor of the per-call overhead table."""
    n = len(label)
    rows = np.arange(n)

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


def numpy_cases(size: Size, dtype: str, seed: int = 0) -> list[Case]:
    return _layer_cases(np, "numpy", NP_LINEAR, NP_LSM, cpu_clock, size, dtype, seed)


def cupy_cases(size: Size, dtype: str, seed: int = 0) -> list[Case]:
    import cupy

    return _layer_cases(cupy, "cupy", CP_LINEAR, CP_LSM, cupy_clock, size, dtype, seed)


# --------------------------------------------------------------------------- PyTorch


def naive_lsoftmax(x: Any, w: Any, label: Any, margin: int, beta: float) -> Any:
    """L-Softmax logits as a user would write them in autograd: acos, then cos(m·theta).

    acos has an infinite derivative at cos = ±1, so the cosine is kept a machine epsilon
    inside; k is piecewise constant and carries no gradient.
    """
    import torch

    logits = x @ w.t()
    target = label[:, None]
    xw = logits.gather(1, target).squeeze(1)
    ab = x.norm(dim=1) * w[label].norm(dim=1)
    eps = torch.finfo(x.dtype).eps
    theta = torch.acos((xw / ab).clamp(-1 + eps, 1 - eps))
    k = torch.floor(theta * (margin / math.pi)).detach()
    psi = (1 - 2 * torch.remainder(k, 2)) * torch.cos(margin * theta) - 2 * k
    f_y = (beta * xw + ab * psi) / (1 + beta)
    return logits.scatter(1, target, f_y[:, None])


def torch_cases(size: Size, dtype: str, device: str, seed: int = 0) -> list[Case]:
    """The loss contenders on ``device``; pytorch-metric-learning is skipped with a note if missing."""
    import torch
    import torch.nn.functional as F

    from lsoftmax_core.adapters.torch import lsoftmax

    tdtype = getattr(torch, dtype)
    x64, w64, _, label64 = _data(size, seed)
    x = torch.tensor(x64, dtype=tdtype, device=device, requires_grad=True)
    w = torch.tensor(w64, dtype=tdtype, device=device, requires_grad=True)
    label = torch.tensor(label64, device=device)
    clock = torch_cuda_clock if device.startswith("cuda") else cpu_clock

    def grads(loss_of: Callable[[], Any], params: tuple[Any, ...]) -> Callable[[], object]:
        def run() -> object:
            return torch.autograd.grad(loss_of(), params)

        return run

    cases = [
        Case(TORCH_LINEAR, "torch", "loss", TORCH_LINEAR,
             grads(lambda: F.cross_entropy(F.linear(x, w), label), (x, w)), clock),
        Case(TORCH_ADAPTER, "torch", "loss", TORCH_LINEAR,
             grads(lambda: F.cross_entropy(lsoftmax(x, w, label, margin=MARGIN, beta=BETA), label), (x, w)),
             clock),
        Case(TORCH_NAIVE, "torch", "loss", TORCH_LINEAR,
             grads(lambda: F.cross_entropy(naive_lsoftmax(x, w, label, MARGIN, BETA), label), (x, w)), clock),
    ]
    cases.append(_pml_case(size, x, w, label, device, clock))
    return cases


def _pml_case(size: Size, x: Any, w: Any, label: Any, device: str, clock: Clock) -> Case:
    """pytorch-metric-learning's LargeMarginSoftmaxLoss on the same classes as ``w``; skipped if missing."""
    import torch

    try:
        from pytorch_metric_learning.losses import LargeMarginSoftmaxLoss
    except ImportError:
        return Case(TORCH_PML, "torch", "loss", TORCH_LINEAR, _missing, clock,
                    note="pytorch-metric-learning not installed: skipped")
    pml = LargeMarginSoftmaxLoss(num_classes=size.c, embedding_size=size.d, margin=MARGIN, scale=1)
    pml = pml.to(device=device, dtype=w.dtype)
    with torch.no_grad():
        pml.W.copy_(w.detach().t())  # its W is (D, C): the same classes as ours

    def run() -> object:
        return torch.autograd.grad(pml(x, label), (x, pml.W))

    return Case(TORCH_PML, "torch", "loss", TORCH_LINEAR, run, clock)


def _missing() -> object:
    raise ImportError("pytorch-metric-learning not installed")


# --------------------------------------------------------------------------- fused cross-entropy


def loss_cases(size: Size, dtype: str, device: str, seed: int = 0, exclude: Sequence[str] = ()) -> list[Case]:
    """The fused cross-entropy comparison on ``device`` ("cpu" or "cuda"), all against the PyTorch floor.

    ``exclude``: leave out the contenders whose name contains one of these texts (never
    the floor or the unfused loss, which the ratios need: ValueError).

    Every contender computes the mean L-Softmax cross-entropy over the batch and its
    gradients for X and W (margin 4, beta 0), from the same inputs:

    * ``torch linear + CE``: ``cross_entropy(F.linear(X, W), y)`` by autograd, the floor
      (no margin: three GEMMs and the softmax);
    * ``lsoftmax-core torch adapter + CE``: ``cross_entropy(lsoftmax(X, W, y), y)``, the
      unfused loss, which holds the N×C logits and their gradient;
    * pytorch-metric-learning's ``LargeMarginSoftmaxLoss`` (scale 1);
    * ``lsoftmax_cross_entropy`` of the PyTorch adapter by autograd, where it exists;
    * CPU: the core's ``cross_entropy_with_grad`` on NumPy arrays (loss, grad_x, grad_w in
      one call) at each setting of :data:`FUSED`, and the unfused loss written with the
      core's ``forward``/``backward`` and a NumPy log-softmax (same library as the fused
      one: separates what fusing saves from NumPy's BLAS against PyTorch's);
    * GPU: the same on CuPy arrays, skipped with a note where CuPy is missing.

    The NumPy contenders run in the same interleaved measurement as the PyTorch ones: at
    these sizes one call lasts 0.1-10 s, so the two thread pools' hand-over costs nothing.
    """
    import torch
    import torch.nn.functional as F

    from lsoftmax_core.adapters import torch as adapter

    on_gpu = device.startswith("cuda")
    x64, w64, _, label64 = _data(size, seed)
    tdtype = getattr(torch, dtype)
    x = torch.tensor(x64, dtype=tdtype, device=device, requires_grad=True)
    w = torch.tensor(w64, dtype=tdtype, device=device, requires_grad=True)
    label = torch.tensor(label64, device=device)
    clock = torch_cuda_clock if on_gpu else cpu_clock

    def grads(loss_of: Callable[[], Any]) -> Callable[[], object]:
        def run() -> object:
            return torch.autograd.grad(loss_of(), (x, w))

        return run

    cases = [
        Case(TORCH_LINEAR, "torch", "loss", TORCH_LINEAR,
             grads(lambda: F.cross_entropy(F.linear(x, w), label)), clock),
        Case(TORCH_ADAPTER, "torch", "loss", TORCH_LINEAR,
             grads(lambda: F.cross_entropy(adapter.lsoftmax(x, w, label, margin=MARGIN, beta=BETA), label)), clock),
        _pml_case(size, x, w, label, device, clock),
    ]
    fused_op = getattr(adapter, "lsoftmax_cross_entropy", None)
    if fused_op is None:
        cases.append(Case(TORCH_FUSED, "torch", "loss", TORCH_LINEAR,
                          _raises(NotImplementedError("lsoftmax_core.adapters.torch has no lsoftmax_cross_entropy yet")),
                          clock))
    else:
        cases.append(Case(TORCH_FUSED, "torch", "loss", TORCH_LINEAR,
                          grads(lambda: fused_op(x, w, label, margin=MARGIN, beta=BETA, reduction="mean")), clock))
    cases += _cupy_fused_cases(size, dtype, seed) if on_gpu else _numpy_fused_cases(size, dtype, seed)
    out = [c for c in cases if not any(text in c.name for text in exclude)]
    if not {TORCH_LINEAR, TORCH_ADAPTER} <= {c.name for c in out}:
        raise ValueError(f"--exclude {','.join(exclude)} leaves out the floor or the unfused loss, which every "
                         "ratio needs")
    return out


def _raises(error: Exception) -> Callable[[], object]:
    def run() -> object:
        raise error

    return run


def _fused_run(xa: Any, wa: Any, label: Any, setting: Fused) -> Callable[[], object]:
    def run() -> object:
        return lsm.cross_entropy_with_grad(xa, wa, label, margin=MARGIN, beta=BETA, reduction="mean",
                                           chunking=setting.chunking, memory_budget=setting.budget_mib * 2**20)

    return run


def _numpy_fused_cases(size: Size, dtype: str, seed: int) -> list[Case]:
    x64, w64, _, label64 = _data(size, seed)
    x, w = x64.astype(dtype), w64.astype(dtype)
    label = label64.copy()
    cases = [Case(f.name, "numpy", "loss", TORCH_LINEAR, _fused_run(x, w, label, f), cpu_clock)
             for f in FUSED["numpy"]]

    def unfused() -> object:  # as a careful NumPy user would: the logits' buffer becomes their gradient
        n = len(label)
        f = lsm.forward(x, w, label, margin=MARGIN, beta=BETA)
        rows = np.arange(n)
        target = f[rows, label].astype(np.float64)
        m = f.max(axis=1, keepdims=True)
        f -= m
        np.exp(f, out=f)
        s = f.sum(axis=1, keepdims=True, dtype=np.float64)
        loss = np.mean(np.log(s[:, 0]) + m[:, 0] - target)
        f *= (1.0 / (s * n)).astype(f.dtype)  # softmax / N: the gradient of the mean
        f[rows, label] -= f.dtype.type(1.0 / n)
        return loss, lsm.backward(f, x, w, label, margin=MARGIN, beta=BETA)

    cases.append(Case(NP_UNFUSED, "numpy", "loss", TORCH_LINEAR, unfused, cpu_clock))
    return cases


def _cupy_fused_cases(size: Size, dtype: str, seed: int) -> list[Case]:
    """The CuPy fused loss at each GPU setting, or one skipped row saying why not."""
    def skipped(why: str) -> list[Case]:
        return [Case(CP_FUSED_MISSING, "cupy", "loss", TORCH_LINEAR, _raises(NotImplementedError(why)), cupy_clock)]

    try:
        import cupy
    except ImportError:
        return skipped("CuPy not installed: the CuPy fused loss is not measured")
    try:
        if dtype not in {str(d) for d in lsm.supported_dtypes("cupy")}:
            return skipped(f"the CuPy backend takes no {dtype}: not measured")
        # A tiny call says whether the core has a CuPy fused loss at all.
        lsm.cross_entropy_with_grad(cupy.ones((2, 2), dtype), cupy.ones((3, 2), dtype), cupy.zeros(2, np.int64),
                                    margin=MARGIN, beta=BETA)
    except NotImplementedError:
        return skipped("the core has no CuPy fused cross-entropy yet (lsoftmax_core.cross_entropy_with_grad "
                       "takes NumPy arrays only): skipped, not measured")
    except Exception as e:  # noqa: BLE001 - no driver, no device: said in the row, the torch rows still come
        text = f"{type(e).__name__}: {e}".replace("\n", " ")[:120]
        return skipped(f"CuPy unusable here ({text}): not measured")
    x64, w64, _, label64 = _data(size, seed)
    x, w = (cupy.asarray(a.astype(dtype)) for a in (x64, w64))
    label = cupy.asarray(label64.copy())
    return [Case(f.name, "cupy", "loss", TORCH_LINEAR, _fused_run(x, w, label, f), cupy_clock)
            for f in FUSED["cupy"]]
