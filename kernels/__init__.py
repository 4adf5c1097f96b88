"""CUDA C sources of the CuPy backend, shipped as package data (read with importlib.resources)."""
