"""Multi-device JAX cases run in a subprocess (its CPU device count is fixed at start-up):
the script runs with tests/ on its path, and a hang past the timeout, or a failed exit,
fails the test instead of stalling the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

__all__ = ["run_cases", "run_script"]

_TESTS = str(Path(__file__).resolve().parents[1])


def run_script(script: Path | str, timeout: float, *args: str) -> subprocess.CompletedProcess[str]:
    """``python script *args`` with tests/ on its path; a hang past ``timeout`` fails the test."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)}
    try:
        return subprocess.run(
            [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        pytest.fail(f"{Path(script).name} did not finish within {timeout} s; its stderr ends:\n{tail!r}")


def run_cases(script: Path | str, out: Path, timeout: float, devices: int) -> dict[str, Any]:
    """The results ``python script out`` writes to ``out`` as JSON, one entry per case, after
    checking that it saw ``devices`` CPU devices (its ``"devices"`` entry, removed)."""
    done = run_script(script, timeout, str(out))
    if done.returncode != 0:
        pytest.fail(f"{Path(script).name} exited with {done.returncode}; its stderr ends:\n{done.stderr[-5000:]}")
    results: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert results.pop("devices") == devices, f"the subprocess must see {devices} CPU devices"
    return results
