"""Benchmarks of lsoftmax-core against its peers, CPU and GPU (not installed; run from the repository root).

    python -m bench                        # the layer and LeNet suites on the CPU
    python -m bench loss --threads 1       # one suite (layer, loss, margins, overhead, lenet, class-parallel-memory)
    python -m bench layer loss --gpu       # on CUDA
    python -m bench --help

Each suite (:class:`bench.record.Suite`) writes ``DEVICE_SUITE.csv``, ``_env.json`` and the
generated ``.md`` table into ``bench/results/``, which docs/BENCHMARKS.md links to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .record import Suite

__all__ = ["suites"]


def suites() -> dict[str, Suite]:
    """Every suite by name, in the order ``python -m bench --help`` lists them."""
    from . import class_parallel_memory, class_parallel_sampling, layer, lenet, loss, margins, overhead

    return {s.name: s for s in (layer.SUITE, loss.SUITE, margins.SUITE, overhead.SUITE, lenet.SUITE,
                                class_parallel_memory.SUITE, class_parallel_sampling.SUITE)}
