"""Benchmarks of lsoftmax-core against its peers, CPU and GPU (see docs/BENCHMARKS.md).

    python -m bench --cpu        # NumPy backend, PyTorch adapter, pytorch-metric-learning, autograd, LeNet
    python -m bench --gpu        # the same on CUDA, plus the CuPy backend against cuBLAS

Not part of the installed package; run from the repository root.
"""

__all__: list[str] = []
