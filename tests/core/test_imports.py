"""`import lsoftmax_core` imports no framework and no CuPy; the public names are explicit."""

from __future__ import annotations

import json
import subprocess
import sys

import lsoftmax_core

OPTIONAL = ["cupy", "torch", "jax", "jaxlib", "mxnet", "tensorflow", "sklearn", "matplotlib"]


def test_core_import_pulls_in_no_optional_library() -> None:
    code = (
        "import sys, json, lsoftmax_core, lsoftmax_core.schedule, lsoftmax_core.adapters;"
        "import numpy as np;"
        "lsoftmax_core.forward(np.ones((2, 3)), np.ones((4, 3)), np.array([0, 3]), margin=3);"
        f"print(json.dumps(sorted(m for m in {OPTIONAL!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_all_is_explicit_and_sorted() -> None:
    names = lsoftmax_core.__all__
    assert names == sorted(names)
    for n in names:
        assert hasattr(lsoftmax_core, n)
