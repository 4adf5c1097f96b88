"""Benchmarks of lsoftmax-core against its peers, CPU and GPU: one harness (see docs/BENCHMARKS.md).

    python -m bench --cpu               # NumPy backend, PyTorch adapter, pytorch-metric-learning, autograd, LeNet
    python -m bench --gpu               # the same on CUDA, plus the CuPy backend against three cuBLAS GEMMs
    python -m bench --gpu --layer-only  # the CuPy backend against cuBLAS alone (scripts/gpu_check.sh runs this)
    python -m bench --cpu --loss        # the fused cross-entropy against the unfused loss and its peers

One size table for both devices (``bench.contenders.SIZES``), one timing method
(``bench.harness``), one doc section per device (``bench.report``).  Not part of the
installed package; run from the repository root.
"""

__all__: list[str] = []
