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

from .harness import Case, cpu_clock, cupy_clock, torch_cuda_clock

__all__ = [
    "BETA",
    "CPU_SIZES",
    "DEVICES",
    "DTYPES",
    "GPU_SIZES",
    "MARGIN",
    "SIZES",
    "Size",
    "cupy_cases",
    "naive_lsoftmax",
    "numpy_cases",
    "sizes_for",
    "torch_cases",
]

MARGIN = 4
BETA = 0.0


DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class Size:
    """One N x D x C of the last layer, and the devices it is measured on.

    A name is unique per device, not overall: "face" is the face-recognition scale of
    each device (10k classes on a 2-core CPU, 100k on a GPU), so that a goal or a table
    column keeps its name from one device to the other.
    """

    name: str
    n: int
    d: int
    c: int
    devices: tuple[str, ...] = DEVICES

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
)

#: The dtypes measured on each device (CPU: float32 only; the CuPy backend also float16).
DTYPES: dict[str, tuple[str, ...]] = {"cpu": ("float32",), "gpu": ("float32", "float16")}


def sizes_for(device: str, names: Sequence[str] | None = None) -> tuple[Size, ...]:
    """The sizes of :data:`SIZES` measured on ``device``, optionally only those ``names``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    sizes = tuple(s for s in SIZES if device in s.devices)
    if names is None:
        return sizes
    unknown = sorted(set(names) - {s.name for s in sizes})
    if unknown:
        raise ValueError(f"no size {', '.join(unknown)} on {device}; known: {', '.join(s.name for s in sizes)}")
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


@lru_cache(maxsize=1)
def _data(size: Size, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float64 x (N, D), w (C, D), upstream gradient (N, C) and int64 labels (N,).

    The last size's arrays are kept (read-only): every library and dtype at one size
    converts the same ones, and at 512x512x100k drawing them takes seconds.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size.n, size.d))
    w = rng.standard_normal((size.c, size.d)) / math.sqrt(size.d)
    g = rng.standard_normal((size.n, size.c)) / size.n
    label = rng.integers(0, size.c, size.n)
    for a in (x, w, g, label):
        a.flags.writeable = False
    return x, w, g, label


# --------------------------------------------------------------------------- NumPy / CuPy


def _layer_cases(xp: Any, library: str, linear_name: str, lsm_name: str, clock: Any,
                 size: Size, dtype: str, seed: int) -> list[Case]:
    x64, w64, g64, label64 = _data(size, seed)
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
    try:
        from pytorch_metric_learning.losses import LargeMarginSoftmaxLoss
    except ImportError:
        cases.append(Case(TORCH_PML, "torch", "loss", TORCH_LINEAR, _missing, clock,
                          note="pytorch-metric-learning not installed: skipped"))
        return cases
    pml = LargeMarginSoftmaxLoss(num_classes=size.c, embedding_size=size.d, margin=MARGIN, scale=1)
    pml = pml.to(device=device, dtype=tdtype)
    with torch.no_grad():
        pml.W.copy_(w.detach().t())  # its W is (D, C): the same classes as ours
    cases.append(Case(TORCH_PML, "torch", "loss", TORCH_LINEAR, grads(lambda: pml(x, label), (x, pml.W)), clock))
    return cases


def _missing() -> object:
    raise ImportError("pytorch-metric-learning not installed")
