"""The CUDA device of JAX for the ``gpu``-marked JAX tests, or a skip where JAX has none."""

from __future__ import annotations

import jax
import pytest


def jax_gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no CUDA backend here (install jax[cuda12])")
