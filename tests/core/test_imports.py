"""`import lsoftmax_core` imports no framework and no CuPy; the public names are explicit."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lsoftmax_core

OPTIONAL = ["cupy", "torch", "jax", "jaxlib", "mxnet", "tensorflow", "sklearn", "matplotlib", "numba"]


def test_core_import_pulls_in_no_optional_library() -> None:
    code = (
        "import sys, json, lsoftmax_core, lsoftmax_core.schedule, lsoftmax_core.adapters;"
        "import numpy as np;"
        "lsoftmax_core.forward(np.ones((2, 3)), np.ones((4, 3)), np.array([0, 3]), margin=3);"
        "lsoftmax_core.check_labels(); lsoftmax_core.supported_dtypes('numpy');"  # no CuPy needed
        f"print(json.dumps(sorted(m for m in {OPTIONAL!r} if m in sys.modules)))"
    )
    # The default kernels, whatever this process was started with (LSOFTMAX_CPU_KERNELS=numba
    # imports Numba, by request).
    env = {k: v for k, v in os.environ.items() if k != "LSOFTMAX_CPU_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_all_is_explicit_and_sorted() -> None:
    names = lsoftmax_core.__all__
    assert names == sorted(names)
    for n in names:
        assert hasattr(lsoftmax_core, n)


def test_core_imports_no_adapter_and_not_the_demo() -> None:
    code = (
        "import sys, json, lsoftmax_core, lsoftmax_core.checks, lsoftmax_core.schedule;"
        "import numpy as np;"
        "lsoftmax_core.backward(np.ones((2, 4)), np.ones((2, 3)), np.ones((4, 3)), np.array([0, 3]), margin=3);"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('lsoftmax_core.adapters', "
        "'lsoftmax_core.demo', 'lsoftmax_core.kernels')))))"
    )
    # The default kernels, whatever this process was started with (LSOFTMAX_CPU_KERNELS=numba
    # imports Numba, by request).
    env = {k: v for k, v in os.environ.items() if k != "LSOFTMAX_CPU_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


ROOT = Path(__file__).resolve().parents[2]


def _private_core_imports(path: Path) -> list[str]:
    """Imports of lsoftmax_core's private modules (``lsoftmax_core._x`` or ``from
    lsoftmax_core import _x``), absolute or relative to a subpackage, in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("lsoftmax_core" if node.level >= 2 else "") if node.level else (node.module or "")
            if node.level and node.module:
                base = f"{base}.{node.module}" if base else node.module
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        found += [n for n in names if n.startswith("lsoftmax_core.") and n.split(".")[1].startswith("_")]
    return found


@pytest.mark.parametrize("folder", ["adapters", "demo"])
def test_adapters_and_the_demo_use_only_the_public_contract(folder: str) -> None:
    # Every file, those of the adapters' own packages (torch/, jax/, mxnet/) included.
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    if folder == "adapters":
        assert {"jax", "mxnet", "torch"} <= {f.parent.name for f in files}
    offenders = {str(f.relative_to(ROOT)): _private_core_imports(f) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_private_import_finder_finds_each_spelling(tmp_path: Path) -> None:
    # The test above must be able to fail: absolute and relative private imports are caught.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import lsoftmax_core._chebyshev\nfrom lsoftmax_core import _numpy_backend\n"
        "from .._validate import x\nfrom . import _own_private_module\n",
        encoding="utf-8",
    )
    assert _private_core_imports(probe) == [
        "lsoftmax_core._chebyshev", "lsoftmax_core._numpy_backend", "lsoftmax_core._validate.x", "lsoftmax_core._validate",
    ]  # fmt: skip


def test_the_public_contract_is_what_checks_exports() -> None:
    from lsoftmax_core import checks

    assert checks.__all__ == sorted(checks.__all__)
    for name in ("check_arrays", "check_beta", "check_margin", "check_label_values", "check_out", "supported_dtypes"):
        assert callable(getattr(checks, name))
    assert lsoftmax_core.supported_dtypes() == checks.supported_dtypes("numpy")
    with pytest.raises(ValueError, match=r"library='tpu' must be one of \['cupy', 'numpy'\]"):
        checks.supported_dtypes("tpu")
