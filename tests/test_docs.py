"""Every code example runs, and every public name has a reference entry.

* The ``python`` blocks of the README and of every ``docs/**.md``: one test per block, run
  in order in one namespace per document, as a reader would type them.  A block that
  imports an optional library missing here is a skip naming the library, not a pass (the
  environment that has it runs it: ``tests`` PyTorch and JAX, ``mxnet`` MXNet).  A block
  whose first line is ``# requires: gpu`` runs only where CuPy sees a CUDA device, one with
  ``# requires: multi-process`` (a script for ``torchrun``) never here; both are skips
  with that reason.
* The ``>>>`` examples in the docstrings of every module of the installed package.
* The API reference (docs/api/, built by ``nox -s docs``) has an entry for every name of
  each documented module's ``__all__``.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lsoftmax_core

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
API = ROOT / "docs" / "api"
OPTIONAL = {"torch", "jax", "jaxlib", "mxnet", "cupy", "sklearn", "matplotlib", "tqdm", "ml_dtypes", "numba"}

#: What a block's first line may say it needs, and why it is skipped without it.
REQUIRES = {
    "gpu": "needs a CUDA GPU (scripts/gpu_check.sh runs the GPU checks)",
    "multi-process": "needs a multi-process launch (torchrun), which this test does not start",
}

#: Modules whose every public name (``__all__``) the API reference must document.
DOCUMENTED = [
    "lsoftmax_core",
    "lsoftmax_core.checks",
    "lsoftmax_core.schedule",
    "lsoftmax_core.backends",
    "lsoftmax_core.adapters.torch",
    "lsoftmax_core.adapters.jax",
    "lsoftmax_core.adapters.mxnet",
]

_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
_IMPORT = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][\w]*)", re.M)
_REQUIRES_LINE = re.compile(r"#\s*requires:\s*(.+?)\s*$")
# An API page's entry: ".. autofunction:: name", ".. py:class:: name" (in .. currentmodule:: M).
_DIRECTIVE = re.compile(
    r"^\.\. (?:auto|py:)(?:function|class|data|attribute|exception|module)::\s+(\S+)", re.M
)
_CURRENT = re.compile(r"^\.\. (?:currentmodule|module|automodule)::\s+(\S+)", re.M)


@dataclass(frozen=True)
class Block:
    doc: Path
    index: int  # the block's number in its document
    line: int  # its first line of code, 1-based
    code: str

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def requires(self) -> list[str]:
        first = self.code.split("\n", 1)[0]
        m = _REQUIRES_LINE.match(first.strip())
        return [r.strip() for r in m.group(1).split(",")] if m else []

    def missing(self) -> list[str]:
        """The optional libraries this block imports that are not installed here."""
        return [
            m
            for m in sorted(set(_IMPORT.findall(self.code)) & OPTIONAL)
            if importlib.util.find_spec(m) is None
        ]


def _blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    return [
        Block(path, i, text.count("\n", 0, m.start(1)) + 1, m.group(1))
        for i, m in enumerate(_FENCE.finditer(text))
    ]


BLOCKS = [b for doc in DOCS for b in _blocks(doc)]


def _gpu_present() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # no driver, no device: CuPy imports but cannot run
        return False


def _skip_reason(block: Block) -> str | None:
    for req in block.requires:
        if req == "gpu" and _gpu_present():
            continue
        return REQUIRES[req]
    missing = block.missing()
    return f"needs {', '.join(missing)}, not installed in this environment" if missing else None


class _Reader:
    """One document read from the top: its namespace, its working folder (a block may save
    a checkpoint that a later one loads), and how far it has run."""

    def __init__(self, folder: Path) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__doc_example__"}
        self.folder = folder
        self.done = 0
        self.failed: list[str] = []

    def run(self, block: Block) -> None:
        self.done = block.index + 1
        try:
            exec(compile(block.code, block.name, "exec"), self.namespace)
        except BaseException:
            self.failed.append(block.name)
            raise


_READERS: dict[Path, _Reader] = {}


def test_every_requires_marker_is_known() -> None:
    unknown = [(b.name, r) for b in BLOCKS for r in b.requires if r not in REQUIRES]
    assert not unknown, f"unknown '# requires:' values (known: {sorted(REQUIRES)}): {unknown}"


def test_blocks_that_need_a_gpu_say_so() -> None:
    """A block using CuPy cannot pass without a device (CuPy itself imports without one),
    so it must be marked and skipped with that reason, not fail or silently pass."""
    unmarked = [b.name for b in BLOCKS if "cupy" in _IMPORT.findall(b.code) and "gpu" not in b.requires]
    assert not unmarked, f"blocks importing cupy without '# requires: gpu' on their first line: {unmarked}"


def test_the_readme_has_examples_to_run() -> None:
    assert len(_blocks(ROOT / "README.md")) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_documented_example_runs(
    block: Block, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A document's blocks run in order in one namespace.  A block selected alone (``-k``)
    first runs the blocks above it, as its setup.  A skipped block must leave nothing that
    a later block needs: blocks importing an optional library are self-contained."""
    reason = _skip_reason(block)
    if reason is not None:
        pytest.skip(reason)
    reader = _READERS.get(block.doc)
    if reader is None or reader.done > block.index:  # first visit, or the same document again
        reader = _READERS[block.doc] = _Reader(tmp_path_factory.mktemp("doc"))
    monkeypatch.chdir(reader.folder)
    for earlier in _blocks(block.doc)[reader.done : block.index]:
        if _skip_reason(earlier) is None:
            try:
                reader.run(earlier)
            except Exception:
                pass  # its own test reports it
    try:
        reader.run(block)
    except Exception as e:
        earlier_failures = [n for n in reader.failed if n != block.name]
        if earlier_failures:
            raise AssertionError(
                f"{block.name} failed after earlier blocks failed: {earlier_failures}"
            ) from e
        raise


# --------------------------------------------------------------------------- docstrings


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


# --------------------------------------------------------------------------- API reference


def _public_names(module: str) -> list[str]:
    """A module's ``__all__``, read from its source without importing it (the adapters'
    frameworks need not be installed here)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} is not importable"
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return list(ast.literal_eval(value))
    raise AssertionError(f"{module} ({spec.origin}) has no literal __all__: the reference is built from it")


def _api_entries() -> set[str]:
    """The full names the API pages document: each directive's name, qualified by the page's
    current module where it is not already."""
    entries: set[str] = set()
    for page in sorted(API.glob("*.rst")):
        current = ""
        for line in page.read_text(encoding="utf-8").splitlines():
            if m := _CURRENT.match(line):
                current = m.group(1)
                entries.add(current)
            elif m := _DIRECTIVE.match(line):
                name = m.group(1).split("(", 1)[0]
                entries.add(name if name.startswith(f"{current}.") or not current else f"{current}.{name}")
    return entries


@pytest.mark.parametrize("module", DOCUMENTED)
def test_every_public_name_has_an_api_reference_entry(module: str) -> None:
    entries = _api_entries()
    assert module in entries, f"docs/api/ has no page for {module} (an '.. automodule:: {module}')"
    missing = [n for n in _public_names(module) if f"{module}.{n}" not in entries]
    assert not missing, f"public names of {module} without an entry in docs/api/*.rst: {missing}"


def test_the_api_reference_has_no_entry_for_a_name_that_is_gone() -> None:
    public = {f"{m}.{n}" for m in DOCUMENTED for n in _public_names(m)} | set(DOCUMENTED)
    stale = sorted(e for e in _api_entries() if e not in public)
    assert not stale, f"docs/api/*.rst documents names that are not in any __all__: {stale}"
