"""The size table of every suite and the inputs drawn for one size.

A size name is unique per device and table, not overall: "face" is the face-recognition
scale of each device (10k classes on a 2-core CPU, 100k on a GPU), so that a goal or a
column keeps its name from one device to the other.  Inputs are standard normal features
and N(0, 1/D) weights (no float32 value is subnormal), drawn once per size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["MARGIN", "BETA", "SIZES", "Size", "device_arrays", "host_arrays", "sizes_for"]

#: Every contender uses margin 4 (the seed's LeNet and pytorch-metric-learning's default)
#: and beta 0 (the only value pytorch-metric-learning has); neither changes our cost.
MARGIN = 4
BETA = 0.0


@dataclass(frozen=True)
class Size:
    """One N x D x C, its devices, its table and whether a run without ``--sizes`` takes it."""

    name: str
    n: int
    d: int
    c: int
    devices: tuple[str, ...] = ("cpu", "gpu")
    table: str = "layer"
    default: bool = True

    @property
    def dims(self) -> str:
        c = next((f"{self.c // k}{u}" for k, u in ((10**6, "M"), (1000, "k")) if self.c >= k and self.c % k == 0),
                 str(self.c))
        return f"{self.n}x{self.d}x{c}"


#: "layer": the layer, overhead and LeNet-sized work: "mnist" is the seed's 2-D embedding
#: head (the GEMMs cost nothing: per-call overhead), "cifar" a small classifier head,
#: "face" a large one.  "loss": where the N x C logits are the memory the fused loss avoids
#: (80 MB and 800 MB in float32 on CPU; 8 GB at 256k and 32 GB at 1M classes on GPU).
#: "class-parallel": N is the global batch, split over the ranks.
SIZES: tuple[Size, ...] = (
    Size("mnist", 256, 2, 10),
    Size("cifar", 256, 256, 100),
    Size("face", 256, 512, 10_000, devices=("cpu",)),
    Size("face", 512, 512, 100_000, devices=("gpu",)),
    Size("ce-small", 2048, 256, 10_000, devices=("cpu",), table="loss"),
    Size("ce-large", 2048, 256, 100_000, devices=("cpu",), table="loss"),
    Size("ce-256k", 8192, 512, 256_000, devices=("gpu",), table="loss"),
    Size("ce-1m", 8192, 512, 1_000_000, devices=("gpu",), table="loss", default=False),
    # The class-parallel head's memory: a global batch of 64 over 1M classes of 128 features.
    Size("cp-1m", 64, 128, 1_000_000, devices=("cpu",), table="class-parallel"),
)


def sizes_for(device: str, table: str, names: Sequence[str] | None = None) -> tuple[Size, ...]:
    """The sizes of ``table`` on ``device``: the default ones, or exactly ``names``."""
    known = tuple(s for s in SIZES if device in s.devices and s.table == table)
    if names is None:
        return tuple(s for s in known if s.default)
    unknown = sorted(set(names) - {s.name for s in known})
    if unknown:
        raise ValueError(f"no size {', '.join(unknown)} for the {table} table on {device}; "
                         f"known: {', '.join(s.name for s in known)}")
    return tuple(s for s in known if s.name in names)


@lru_cache(maxsize=1)
def host_arrays(size: Size, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """float64 x (N, D), w (C, D), int64 labels (N,) and, for the layer table, an upstream
    gradient (N, C); read-only, the last size's kept so that every library and dtype
    converts the same ones."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size.n, size.d))
    w = rng.standard_normal((size.c, size.d)) / math.sqrt(size.d)
    label = rng.integers(0, size.c, size.n)
    g = rng.standard_normal((size.n, size.c)) / size.n if size.table == "layer" else None
    for a in (x, w, label, g):
        if a is not None:
            a.flags.writeable = False
    return x, w, label, g


def device_arrays(size: Size, dtype: str, seed: int = 0) -> tuple[Any, Any, Any]:
    """x, w (PyTorch tensors of ``dtype``) and labels drawn on the current CUDA device: at
    8192x512x1M the host draw and copy of float64 inputs would take most of a GPU call."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(size.n, size.d, generator=gen, device="cuda")
    w = torch.randn(size.c, size.d, generator=gen, device="cuda") / math.sqrt(size.d)
    label = torch.randint(0, size.c, (size.n,), generator=gen, device="cuda")
    return x.to(getattr(torch, dtype)), w.to(getattr(torch, dtype)), label
