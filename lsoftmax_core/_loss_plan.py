"""How the fused cross-entropy walks the N×C logits: by rows or by classes, in chunks
sized from a memory budget.  Plain Python, shared by every backend.

Rows (Liger-Kernel's way): a chunk of R rows holds all C logits, so the softmax of each
row is complete inside the chunk and the gradients can be formed at once: three GEMMs in
all (logits, G·W, Gᵀ·X), the last one accumulated into grad_w once per chunk.  Classes
(Cut Cross-Entropy's way): a chunk of K classes for all N rows; a first pass builds each
row's log-sum-exp online, the gradient pass recomputes the chunk's logits: four GEMMs, but
the chunk never needs a whole row, so it fits any C.  The maths: docs/derivatives.md,
"Cross-entropy".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .checks import check_integer

__all__ = ["CHUNKINGS", "DEFAULT_BUDGET", "ChunkPlan", "plan_chunks"]

#: Bytes the chunk's temporaries may take by default; the environment variable
#: LSOFTMAX_CE_BUDGET (bytes) or the ``memory_budget`` argument override it.
DEFAULT_BUDGET = 64 * 2**20

CHUNKINGS = ("rows", "classes")

#: Bytes per logit held at once: the chunk's logits (input dtype), its exponentials /
#: gradient (input dtype, in place) and a float64 row or column statistic share.
_PER_ELEMENT_EXTRA = 8

#: Most row chunks worth the three-GEMM path: each row chunk adds its Gᵀ·X (C×D) into
#: grad_w, re-reading and re-writing all of grad_w, and its GEMMs have only R rows, which
#: costs more than the class path's fourth GEMM once there are many chunks (CPU,
#: 2048x256x100k float32, docs/BENCHMARKS.md run E: 50 row chunks took 1.31x the unfused
#: loss, 13 chunks 0.92x, 49 class chunks 1.06x).
_MAX_ROW_CHUNKS = 8


@dataclass(frozen=True)
class ChunkPlan:
    """``mode`` 'rows' or 'classes', and the chunk's length along that axis."""

    mode: str
    size: int


def plan_chunks(
    n: int, c: int, itemsize: int, *, chunk_size: object = None, chunking: object = None, memory_budget: object = None
) -> ChunkPlan:
    """The chunking for an (N, C) problem; explicit ``chunking``/``chunk_size`` win.

    Default: rows when the batch fits the budget in at most 8 chunks of whole rows (the
    three-GEMM path), else classes, as many as fit for all N rows.
    """
    if chunking is not None and chunking not in CHUNKINGS:
        raise ValueError(f"chunking={chunking!r} must be one of {CHUNKINGS} or None")
    if memory_budget is None:
        env = os.environ.get("LSOFTMAX_CE_BUDGET", "").strip()
        if not env:
            budget = DEFAULT_BUDGET
        elif env.isdigit():
            budget = check_integer("LSOFTMAX_CE_BUDGET", int(env), 1)
        else:
            raise ValueError(f"LSOFTMAX_CE_BUDGET={env!r} must be a whole number of bytes")
    else:
        budget = check_integer("memory_budget", memory_budget, 1)
    size = None if chunk_size is None else check_integer("chunk_size", chunk_size, 1)
    per_element = itemsize * 2 + _PER_ELEMENT_EXTRA
    rows_fit = budget // max(1, c * per_element)
    if chunking is None:
        row_chunks = -(-max(n, 1) // rows_fit) if rows_fit else None
        chunking = "rows" if row_chunks is not None and row_chunks <= _MAX_ROW_CHUNKS else "classes"
    if size is None:
        if chunking == "rows":
            size = max(1, rows_fit)
        else:
            size = max(1, budget // max(1, n * per_element))
    return ChunkPlan(str(chunking), size)
