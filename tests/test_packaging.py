"""The installed layout: the top-level folders become lsoftmax_core's subpackages, under one
module name each, in a non-editable install as in the editable one the README uses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import lsoftmax_core

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("adapters", "kernels", "demo")
#: The adapters' own packages, found without importing their framework.
ADAPTERS = ("adapters.jax", "adapters.mxnet", "adapters.torch")

# Run in a fresh process from a folder outside the checkout: reports where each package
# came from (each adapter's package found, not imported), whether the kernel sources are
# found, and whether the torch adapter imports.
PROBE = """
import importlib, importlib.util, json, sys
import lsoftmax_core, lsoftmax_core.adapters, lsoftmax_core.kernels, lsoftmax_core.demo
from lsoftmax_core import _cupy_plan
out = {"core": lsoftmax_core.__file__, "kernel_source": len(_cupy_plan.kernel_source())}
for sub in ("adapters", "kernels", "demo"):
    out[sub] = importlib.import_module("lsoftmax_core." + sub).__file__
for sub in sys.argv[1:]:  # the adapters' packages
    spec = importlib.util.find_spec("lsoftmax_core." + sub)
    out[sub] = None if spec is None else spec.origin
try:
    import torch  # noqa: F401
except ImportError:
    out["torch"] = None
else:
    import lsoftmax_core.adapters.torch as t
    out["torch"] = t.__file__
print(json.dumps(out))
"""


def _probe(python: str, cwd: Path, env: dict[str, str] | None = None) -> dict[str, object]:
    done = subprocess.run([python, "-c", PROBE, *ADAPTERS], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_no_symlinks_in_the_source_tree() -> None:
    tracked = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    links = [line.split("\t")[1] for line in tracked.stdout.splitlines() if line.startswith("120000")]
    assert links == []


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_a_source_folder_cannot_be_imported_under_a_second_name(sub: str) -> None:
    # With the repository root on sys.path, adapters/ would otherwise also be `adapters`
    # (and the torch operators would be registered twice).
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {sub}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"import lsoftmax_core.{sub}, not {sub}" in done.stderr


def test_the_editable_install_maps_the_top_level_folders(tmp_path: Path) -> None:
    found = _probe(sys.executable, tmp_path)
    for sub in SUBPACKAGES:
        assert Path(str(found[sub])).parent == ROOT / sub
    for sub in ADAPTERS:
        assert Path(str(found[sub])) == ROOT.joinpath(*sub.split("."), "__init__.py")
    assert int(str(found["kernel_source"])) > 10_000


def test_a_non_editable_install_into_a_fresh_venv_has_every_subpackage(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    # Built from a copy: an in-tree build would leave build/ in the checkout, and files
    # left there by an older build would go into the wheel.
    src = tmp_path / "src"
    for name in ("lsoftmax_core", *SUBPACKAGES):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("lsoftmax_core-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    # numpy (and torch, where this environment has it) come from this environment's
    # site-packages, appended after the fresh venv's own: lsoftmax_core must come from the wheel.
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    found = _probe(python, tmp_path, env)
    core = Path(str(found["core"]))
    assert core.is_relative_to(env_dir), core
    for sub in (*SUBPACKAGES, *ADAPTERS):
        assert Path(str(found[sub])).is_relative_to(core.parent), found[sub]
    assert int(str(found["kernel_source"])) > 10_000
    if found["torch"] is not None:
        assert Path(str(found["torch"])).is_relative_to(core.parent)
    assert lsoftmax_core.__version__  # the package under test is the same version
