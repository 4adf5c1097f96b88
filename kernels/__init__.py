"""CUDA C sources of the CuPy backend, shipped as package data (read with importlib.resources)."""

# One file, one module name: this folder is installed as lsoftmax_core.kernels and nothing else.
if __name__ != "lsoftmax_core.kernels":
    raise ImportError(f"import lsoftmax_core.kernels, not {__name__} (install the project: pip install -e .)")
