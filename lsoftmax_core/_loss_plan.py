"""The fused cross-entropy's options and how it walks the N×C logits: by rows or by classes,
in chunks sized from a memory budget.  Plain Python, shared by every backend.

:class:`LossOptions` holds the seven options of every loss call, checked once where the
public functions build it.  :func:`plan_chunks` turns a memory budget into a
:class:`ChunkPlan`:

* rows (Liger-Kernel's way): a chunk of R rows holds all C logits, so each row's softmax is
  complete inside the chunk and the gradients are formed at once: three GEMMs in all
  (logits, G·W, Gᵀ·X), the last one accumulated into grad_w once per chunk;
* classes (Cut Cross-Entropy's way): a chunk of K classes for all N rows; a first pass
  builds each row's log-sum-exp online and the gradient pass recomputes the chunk's logits:
  four GEMMs, but a chunk never needs a whole row, so it fits any C.

The maths: docs/derivatives.md, "Cross-entropy".
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from .checks import check_beta, check_integer, check_margin, check_reduction, split_margin
from .margins import Margin

__all__ = ["BUDGET_ENV", "CHUNKINGS", "DEFAULT_MEMORY_BUDGET", "ChunkPlan", "LossOptions", "plan_chunks"]

#: Bytes the chunk of logits may take when neither ``memory_budget`` nor the environment
#: variable :data:`BUDGET_ENV` says otherwise.
DEFAULT_MEMORY_BUDGET = 32 * 2**20

#: The environment variable that sets the default budget: a whole number of bytes, ASCII digits.
BUDGET_ENV = "LSOFTMAX_CE_BUDGET"

CHUNKINGS = ("rows", "classes")

#: Fewest rows per chunk for which the default plan takes rows.  A row chunk reads all of w
#: for its logits and for G·W and reads and writes all of grad_w for Gᵀ·X: about 4·C·D
#: elements of memory traffic per chunk, against the class path's fourth GEMM of 2·N·C·D
#: flops.  Rows win while N/R·4·itemsize/bandwidth < 2·N/flop rate, i.e. for R above a
#: few tens on a CPU core (~10 GB/s, ~85 GFLOP/s in float32) as on a GPU: R decides, not N.
#: Measured at 2048x256x100k float32 (scripts/bench_fused_loss.py, 32 MiB): 25 chunks of 82
#: rows took 1.14x the three GEMMs' time on one thread against 1.29x for 25 chunks of 4096
#: classes (1.50x and 1.49x on two threads of a shared machine).
MIN_ROWS = 64


@dataclass(frozen=True)
class LossOptions:
    """The options of one fused cross-entropy call, checked when built (a ``ValueError`` or
    ``TypeError`` naming the bad one); see :func:`lsoftmax_core.cross_entropy` for their
    meaning.  Frozen: one object can serve many calls.

    >>> from lsoftmax_core import LossOptions
    >>> LossOptions(margin=3, reduction="sum")
    LossOptions(margin=3, beta=0.0, reduction='sum', ignore_index=-100, chunk_size=None, chunking=None, memory_budget=None, subcenters=1)
    """

    margin: int | Margin = 2
    beta: float = 0.0
    reduction: str = "mean"
    ignore_index: int = -100
    chunk_size: int | None = None
    chunking: str | None = None
    memory_budget: int | None = None
    subcenters: int = 1

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: the checked values replace the given ones once
        m, family = split_margin(self.margin)  # LSoftmax(m) is kept as the int m: the same path
        put(self, "margin", check_margin(m) if family is None else family)
        put(self, "beta", check_beta(self.beta))
        put(self, "reduction", check_reduction(self.reduction))
        put(self, "ignore_index", check_integer("ignore_index", self.ignore_index, -(2**63), 2**63 - 1))
        if self.chunk_size is not None:
            put(self, "chunk_size", check_integer("chunk_size", self.chunk_size, 1))
        if self.chunking is not None:
            put(self, "chunking", _check_chunking(self.chunking))
        if self.memory_budget is not None:
            put(self, "memory_budget", check_integer("memory_budget", self.memory_budget, 1))
        put(self, "subcenters", check_integer("subcenters", self.subcenters, 1, 1024))
        if self.subcenters > 1 and not isinstance(self.margin, Margin):
            raise ValueError(
                f"subcenters={self.subcenters} needs a margin kind that normalises the weights (SphereFace, "
                f"CosFace, ArcFace, CombinedMargin), whose class cosine is the largest of its centres'; got "
                f"margin={self.margin!r} (L-Softmax)"
            )


@dataclass(frozen=True)
class ChunkPlan:
    """How one call walks the logits: ``mode`` "rows" or "classes", and ``size``, the chunk's
    length along that axis (rows or classes per chunk)."""

    mode: str
    size: int


def _check_chunking(chunking: object) -> str:
    if chunking not in CHUNKINGS:
        raise ValueError(f"chunking={chunking!r} must be one of {CHUNKINGS} or None")
    return str(chunking)


@functools.lru_cache(maxsize=4)
def _parse_budget(raw: str) -> int:
    # ASCII digits only: str.isdigit() alone admits "²" and other digits int() rejects.
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"{BUDGET_ENV}={raw!r} must be a whole number of bytes >= 1 (ASCII digits)")
    return int(text)


def default_memory_budget() -> int:
    """The budget when a call gives none: :data:`BUDGET_ENV` if set and not empty, else
    :data:`DEFAULT_MEMORY_BUDGET`; a malformed value raises a ValueError naming the variable."""
    raw = os.environ.get(BUDGET_ENV, "")
    return _parse_budget(raw) if raw.strip() else DEFAULT_MEMORY_BUDGET


def _even(total: int, most: int) -> int:
    """The chunk length that splits ``total`` into as few chunks of at most ``most`` as
    possible, of lengths differing by at most one (no short last chunk)."""
    chunks = -(-max(total, 1) // max(most, 1))
    return -(-max(total, 1) // chunks)


def plan_chunks(
    n: int, c: int, itemsize: int, *, chunk_size: object = None, chunking: object = None, memory_budget: object = None
) -> ChunkPlan:
    """The chunking of an (N, C) problem whose logits have ``itemsize`` bytes each.

    The budget (``memory_budget`` bytes, else the environment variable LSOFTMAX_CE_BUDGET,
    else :data:`DEFAULT_MEMORY_BUDGET`) bounds the chunk of logits, which the backends
    overwrite in place with its exponentials and then its gradient: R·C·itemsize bytes for
    R rows, N·K·itemsize for K classes (a few float64 vectors of N entries come on top).
    Default: rows when at least 64 rows (or all N) fit, else classes; either way as few
    chunks as fit, of even lengths.  An explicit ``chunking`` or ``chunk_size`` wins.

    >>> from lsoftmax_core import plan_chunks
    >>> plan_chunks(2048, 100_000, 4)  # float32: 83 rows of 100k logits fit in 32 MiB
    ChunkPlan(mode='rows', size=82)
    >>> plan_chunks(2048, 1_000_000, 4)  # 8 rows would fit: classes, 245 chunks of <= 4096
    ChunkPlan(mode='classes', size=4082)
    """
    mode = None if chunking is None else _check_chunking(chunking)
    budget = default_memory_budget() if memory_budget is None else check_integer("memory_budget", memory_budget, 1)
    size = None if chunk_size is None else check_integer("chunk_size", chunk_size, 1)
    rows_fit = budget // max(1, c * itemsize)
    if mode is None:
        mode = "rows" if rows_fit >= min(max(n, 1), MIN_ROWS) else "classes"
    if size is None:
        if mode == "rows":
            size = _even(n, rows_fit)
        else:
            size = _even(c, budget // max(1, n * itemsize))
    return ChunkPlan(mode, size)
