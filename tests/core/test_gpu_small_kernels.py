"""``set_gpu_small_kernels`` / ``gpu_small_kernels``: the CuPy backend's one-kernel path for
small problems can be forbidden and allowed again, without CuPy (the choice is the launch
plan's, which is plain Python)."""

from __future__ import annotations

import numpy as np
import pytest

import lsoftmax_core as lsm
from lsoftmax_core import _cupy_plan as plan
from lsoftmax_core.checks import check_arrays


def _small_problem():
    x, w, y = np.ones((4, 3)), np.ones((5, 3)), np.zeros(4, dtype=np.int64)
    return check_arrays(x, w, y, 3, 0.0, dtypes=lsm.supported_dtypes("numpy"))


def test_forbidding_the_small_kernels_sends_small_problems_to_the_gemm_plan() -> None:
    p = _small_problem()
    assert lsm.gpu_small_kernels() and plan.small(p)
    try:
        lsm.set_gpu_small_kernels(False)
        assert not lsm.gpu_small_kernels() and not plan.small(p)
    finally:
        lsm.set_gpu_small_kernels(True)
    assert lsm.gpu_small_kernels() and plan.small(p)


@pytest.mark.parametrize("bad", [0, 1, "yes", None])
def test_the_switch_takes_only_a_bool(bad) -> None:
    with pytest.raises(TypeError, match="enabled="):
        lsm.set_gpu_small_kernels(bad)
    assert lsm.gpu_small_kernels()
