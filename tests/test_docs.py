"""Every code example runs: the README's and docs/'s ``python`` blocks, and the ``>>>``
examples in the docstrings of every module of the installed package.

Examples that need an optional library (PyTorch, JAX, MXNet, ...) are skipped where it is
missing: the ``tests`` environment runs the PyTorch and JAX ones, the ``mxnet`` one MXNet's.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

import lsoftmax_core

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPTIONAL = {"torch", "jax", "jaxlib", "mxnet", "cupy", "sklearn", "matplotlib", "tqdm", "ml_dtypes", "numba"}

_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_IMPORT = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][\w]*)", re.M)


def _blocks(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    return [(f"{path.relative_to(ROOT)}[{i}]", m.group(1)) for i, m in enumerate(_FENCE.finditer(text))]


def _modules() -> list[str]:
    """Every module of lsoftmax_core, its mapped subpackages included (they live in other
    folders, so they are walked through their own __path__)."""
    names = ["lsoftmax_core"]
    packages = ["lsoftmax_core", "lsoftmax_core.adapters", "lsoftmax_core.kernels", "lsoftmax_core.demo"]
    while packages:
        pkg = packages.pop(0)
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.submodule_search_locations, pkg
        if pkg not in names:
            names.append(pkg)
        for info in pkgutil.iter_modules(list(spec.submodule_search_locations), prefix=f"{pkg}."):
            if info.ispkg:
                packages.append(info.name)  # e.g. lsoftmax_core.adapters.torch
            elif not info.name.endswith("__main__") and info.name not in names:
                names.append(info.name)
    return names


def test_the_readme_has_examples_to_run() -> None:
    assert len(_blocks(ROOT / "README.md")) >= 5


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_documented_examples_run_in_order(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A document's blocks run one after the other in one namespace, as a reader would
    type them; a block importing a library missing here is passed over (it must then be
    self-contained, which the environment that has the library checks)."""
    monkeypatch.chdir(tmp_path)  # an example may save a checkpoint
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for name, code in _blocks(doc):
        missing = [
            m for m in sorted(set(_IMPORT.findall(code)) & OPTIONAL) if importlib.util.find_spec(m) is None
        ]
        if not missing:
            exec(compile(code, name, "exec"), namespace)


@pytest.mark.parametrize("module", _modules())
def test_docstring_examples_run(module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if (e.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{module} needs {e.name}")
        raise
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(mod, module):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {module} failed (output above)"


def test_the_core_has_docstring_examples() -> None:
    found = sum(len(t.examples) for t in doctest.DocTestFinder().find(lsoftmax_core, "lsoftmax_core"))
    found += sum(
        len(t.examples)
        for t in doctest.DocTestFinder().find(lsoftmax_core.schedule, "lsoftmax_core.schedule")
    )
    assert found >= 4
