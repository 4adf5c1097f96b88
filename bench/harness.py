"""Timing, memory and environment records shared by every suite.

Timing.  Each contender is warmed up, then the contenders of one comparison run
round-robin, the order shuffled per repetition (fixed seed), so that a slow spell of a
shared machine hits all of them alike.  One sample is ``inner`` back-to-back calls
(calibrated so that a sample lasts about ``min_time``), divided by ``inner``.  Ratios are
taken per repetition against the floor's sample of the same repetition, then the median
(and quartiles) over repetitions: a ratio survives a noisy machine, an absolute time does
not.  CPU clock: ``time.perf_counter``; CUDA: events on the current stream after a device
synchronisation.  A sample includes the host-side Python of each call.

Memory.  CPU: the peak resident set size above the resident size just before one call,
after a warm-up call, in a separate process (:mod:`bench.memprobe`) started with glibc's
mmap threshold fixed at 64 KiB, so that every large freed block goes back to the OS and
the next call's peak is its own; it sees NumPy, BLAS and PyTorch allocations alike.  GPU:
the allocators' own peaks (PyTorch's ``max_memory_allocated``, a counting allocator over
CuPy's pool); library workspaces are not counted.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

__all__ = ["Case", "Measured", "cpu_clock", "cupy_clock", "cupy_peak", "environment", "measure", "paired_ratio",
           "paired_ratio_quartiles", "peak_rss_delta", "threads", "torch_cuda_clock", "torch_cuda_peak"]

Clock = Callable[[Callable[[], object], int], float]


@dataclass
class Case:
    """One contender prepared at one size; ``run()`` does one forward+backward.

    ``floor`` names the contender of the same comparison that the ratio is taken against
    (a floor names itself).  ``clock`` times ``inner`` calls and returns seconds per call;
    ``library`` says which allocator holds its GPU memory ("torch", "cupy").
    """

    name: str
    library: str
    floor: str
    run: Callable[[], object]
    clock: Clock
    note: str = ""


@dataclass
class Measured:
    """The samples of one case (seconds per call) and what went wrong, if anything."""

    case: Case
    samples: list[float] = field(default_factory=list)
    inner: int = 1
    error: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan


# --------------------------------------------------------------------------- clocks


def cpu_clock(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def torch_cuda_clock(fn: Callable[[], object], inner: int) -> float:
    import torch

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / inner  # elapsed_time is in ms


def cupy_clock(fn: Callable[[], object], inner: int) -> float:
    import cupy

    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    cupy.cuda.Device().synchronize()
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / inner  # ms


# --------------------------------------------------------------------------- timing


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def measure(cases: Sequence[Case], *, repeat: int, warmup: int, min_time: float, seed: int = 0) -> list[Measured]:
    """Warm up, calibrate and time ``cases`` round-robin (shuffled order per repetition); a case
    that raises (out of memory, a dtype its library lacks) keeps its error and no samples."""
    out = [Measured(c) for c in cases]
    for m in out:
        try:
            for i in range(max(warmup, 1)):  # at least one call: compiles, caches, checks it runs
                t = m.case.clock(m.case.run, 1)
                if t > max(0.5, min_time) and i + 1 >= warmup:
                    break  # a call of seconds (the loss suite) needs no calibration: inner = 1
            else:
                # The fastest of a few single calls: one descheduled call on a shared machine
                # must not set inner to 1 for a contender that takes microseconds.
                once, spent = math.inf, 0.0
                for _ in range(5):
                    t = m.case.clock(m.case.run, 1)
                    once, spent = min(once, t), spent + t
                    if spent > 0.5:
                        break
                m.inner = max(1, min(1000, math.ceil(min_time / max(once, 1e-9))))
        except Exception as e:  # noqa: BLE001 - recorded in the table, never hidden
            m.error = _short(e)
    live = [m for m in out if not m.error]
    rng = random.Random(seed)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one sample would be charged to one contender
    try:
        for _ in range(repeat):
            order = live[:]
            rng.shuffle(order)
            for m in order:
                if m.error:
                    continue
                try:
                    m.samples.append(m.case.clock(m.case.run, m.inner))
                except Exception as e:  # noqa: BLE001
                    m.error, m.samples = _short(e), []
    finally:
        if was_enabled:
            gc.enable()
    return out


def _pairs(m: Measured, floor: Measured) -> list[float]:
    return [a / b for a, b in zip(m.samples, floor.samples) if b > 0]


def paired_ratio(m: Measured, floor: Measured) -> float:
    """Median over repetitions of (this sample / the floor's sample of the same repetition)."""
    pairs = _pairs(m, floor)
    return statistics.median(pairs) if pairs else math.nan


def paired_ratio_quartiles(m: Measured, floor: Measured) -> tuple[float, float]:
    """The first and third quartiles of the same per-repetition ratios: how far one run's
    median may be trusted on a shared machine (NaN with fewer than two repetitions)."""
    pairs = _pairs(m, floor)
    if len(pairs) < 2:
        return math.nan, math.nan
    q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
    return q1, q3


# --------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_rss_delta(fn: Callable[[], object]) -> float:
    """Peak RSS above the current RSS during one call of ``fn``, in MiB (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM to the current RSS; see the module docstring)."""
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(peak - before, 0) / 1024.0


def torch_cuda_peak(fn: Callable[[], object]) -> float:
    """Peak bytes allocated by PyTorch's CUDA allocator during one call, above the start, in MiB."""
    import torch

    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return max(peak - base, 0) / 2**20


def cupy_peak(fn: Callable[[], object]) -> float:
    """Peak bytes live in CuPy allocations made during one call, in MiB: each allocation from
    CuPy's pool is wrapped in an owner whose lifetime CuPy ties to the memory."""
    import cupy

    pool = cupy.get_default_memory_pool()
    state = {"live": 0, "peak": 0}

    class _Owner:
        __slots__ = ("block", "size")

        def __init__(self, block: Any, size: int) -> None:
            self.block, self.size = block, size
            state["live"] += size
            state["peak"] = max(state["peak"], state["live"])

        def __del__(self) -> None:
            state["live"] -= self.size

    def allocate(size: int) -> Any:
        block = pool.malloc(size)
        mem = cupy.cuda.UnownedMemory(block.ptr, size, _Owner(block, size), block.device_id)
        return cupy.cuda.MemoryPointer(mem, 0)

    cupy.cuda.Device().synchronize()
    gc.collect()
    with cupy.cuda.using_allocator(allocate):
        result = fn()
        cupy.cuda.Device().synchronize()
    del result
    return state["peak"] / 2**20


# --------------------------------------------------------------------------- threads and environment


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Cap NumPy's BLAS and, if imported, PyTorch at ``count`` threads for the block (None: leave them)."""
    if not count:
        yield
        return
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        torch.set_num_threads(count)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the BLAS keeps its threads; the environment record says how many
        limits = None
    else:
        limits = threadpool_limits(limits=count, user_api="blas")
    try:
        yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)
        if limits is not None:
            limits.restore_original_limits()




def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return "not installed"


def environment(gpu: bool) -> dict[str, Any]:
    """What the figures depend on: machine, libraries, threads, BLAS kernel, date."""
    import numpy as np

    import lsoftmax_core

    env: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "numpy": np.__version__,
        "lsoftmax_core": lsoftmax_core.__version__,
        "torch": _version("torch"),
        "pytorch_metric_learning": _version("pytorch-metric-learning"),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "(unset)"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
    }
    try:
        from threadpoolctl import threadpool_info

        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        env["numpy_blas"] = "; ".join(
            f"{p.get('internal_api')} {p.get('version')} kernel={p.get('architecture')} threads={p.get('num_threads')}"
            for p in blas
        ) or "none found"
    except ImportError:
        env["numpy_blas"] = "threadpoolctl not installed"
    if "torch" in sys.modules:  # imported by the run: not imported here only to be described
        try:
            import torch

            env["torch_threads"] = torch.get_num_threads()
            env["torch_cuda"] = str(torch.version.cuda)
        except ImportError:
            pass
    if gpu:
        try:
            import cupy

            env["cupy"] = cupy.__version__
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"]
            env["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
            env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
            env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        except Exception as e:  # noqa: BLE001
            env["gpu"] = f"unavailable ({_short(e)})"
    return env
