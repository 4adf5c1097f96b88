"""One command runs every test environment: `nox` (see the README).

* ``lint``: ruff over the whole tree; mypy over the installed package (adapters, kernels and
  demo included, with the frameworks absent, so only our own annotations are checked).
* ``tests``: the core (its NumPy backend with and without the opt-in Numba loops), the
  CuPy backend's CPU-side checks (NVRTC compilation of every kernel, the shared scalar
  header built for the host), the PyTorch and JAX adapters and the demo, on the current
  numpy.  GPU tests are marked ``gpu`` and skip without a device.
* ``mxnet``: MXNet 1.9.1 needs numpy < 1.24, so it gets its own environment; the whole
  suite runs there too, which also proves the core on numpy 1.23.
* ``docs``: the API reference (Sphinx autodoc over the installed package and its PyTorch
  and JAX adapters; MXNet's is mocked, see docs/api/conf.py) into build/docs/html, strict:
  any warning, an unresolved cross-reference included, fails it.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "mxnet", "docs"]
nox.options.error_on_missing_interpreters = True

# torch 2.13.0 is pinned for the CPU test environment: it is the CPU build that the
# project's CI machines hold locally (a newer release would pull a multi-GB CUDA build).
TORCH_CPU = "torch==2.13.0"


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6", "mypy>=1.10", "numpy", ".")
    session.run("ruff", "check", ".")
    # The installed copy, from a folder outside the checkout: there the top-level folders
    # are lsoftmax_core's subpackages (pyproject's package-dir), as users import them.
    config = str(Path("pyproject.toml").resolve())
    with session.chdir(session.create_tmp()):
        session.run("mypy", "--config-file", config, "-p", "lsoftmax_core")


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test,jax,cuda12,demo,bench,numba]", TORCH_CPU)
    session.run("python", "-m", "pytest", "-q", *session.posargs, env={"CI": "1"})


@nox.session
def mxnet(session: nox.Session) -> None:
    session.install("-e", ".[test,mxnet]")
    session.env["MXNET_CPU_WORKER_NTHREADS"] = "2"
    session.run("python", "-m", "pytest", "-q", *session.posargs, env={"CI": "1"})


@nox.session
def docs(session: nox.Session) -> None:
    session.install("-e", ".[docs,jax]", TORCH_CPU)
    session.run(
        "sphinx-build", "-E", "-W", "--keep-going", "-n", "-q", "-b", "html", "docs/api", "build/docs/html",
        *session.posargs,
    )
