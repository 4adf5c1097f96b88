"""Shared test helpers: the float64 reference, the tolerance table, hypothesis strategies
and the host builds of the CUDA code (imported as ``support.*``; pyproject's pytest
``pythonpath`` puts tests/ on sys.path)."""
