"""Import ``bench`` (not installed) from the checkout for the tests in tests/bench/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_bench() -> None:
    """Make ``import bench`` find the checkout's bench/ without putting the repository root
    on sys.path: the root first on sys.path would shadow the installed lsoftmax_core with
    the source folder, which has no ``adapters`` (see scripts/gpu_check.sh); only ``bench``
    is exposed."""
    loaded = sys.modules.get("bench")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent == ROOT / "bench":
        return
    spec = importlib.util.spec_from_file_location(
        "bench", ROOT / "bench" / "__init__.py", submodule_search_locations=[str(ROOT / "bench")]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
