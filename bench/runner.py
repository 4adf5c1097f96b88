"""The CPU and GPU runs: every contender at every size of the one table, LeNet, memory, files.

Both devices go through the same steps: for each size of :data:`bench.contenders.SIZES`
marked for the device and each of its dtypes, one interleaved measurement per comparison
(on CPU the NumPy pair, then PyTorch's four; on GPU the CuPy pair and PyTorch's four
together; see :mod:`bench.harness`), then the seed's LeNet table, then the files
(``DEVICE.csv``, ``DEVICE_lenet.csv``, ``DEVICE_env.json``) and, through
:func:`bench.report.publish`, the doc section.  The rows carry the median time, the
paired ratio to the library's floor and the peak memory.  ``layer_only`` keeps the
backend against its linear floor alone (NumPy or CuPy; no PyTorch, no LeNet): that is
what ``scripts/gpu_check.sh`` runs within its time budget.

The fused cross-entropy comparison (the sizes of the ``loss`` suite, ``--loss``) is
:func:`run_loss`, the same steps for either device with the contenders of
:func:`bench.contenders.loss_cases` in one interleaved measurement per size and dtype,
into its own files (``DEVICE_loss.csv``, ``DEVICE_loss_env.json``) and doc section.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import report
from .contenders import DTYPES, Size, cupy_cases, dtypes_for, loss_cases, numpy_cases, sizes_for, torch_cases
from .harness import Case, Measured, cupy_peak, environment, measure, paired_ratio, torch_cuda_peak
from .lenet import lenet_rows

__all__ = ["Settings", "run_cpu", "run_gpu", "run_loss"]

REPO = Path(__file__).resolve().parents[1]


class Settings:
    """Repetitions and sample length; ``quick`` ones for development and the smoke test."""

    def __init__(self, repeat: int, warmup: int, min_time: float, lenet_batches: tuple[int, ...]) -> None:
        self.repeat, self.warmup, self.min_time, self.lenet_batches = repeat, warmup, min_time, lenet_batches


CPU_FULL = Settings(repeat=15, warmup=2, min_time=0.02, lenet_batches=(128, 256))
GPU_FULL = Settings(repeat=30, warmup=3, min_time=0.005, lenet_batches=(128, 256))
#: The loss suite: one call lasts 0.1-10 s on CPU (about 1 s on GPU at 8192x512x1M), so
#: fewer repetitions of one call each.
CPU_LOSS = Settings(repeat=7, warmup=1, min_time=0.02, lenet_batches=())
GPU_LOSS = Settings(repeat=10, warmup=2, min_time=0.005, lenet_batches=())


def _rows(device: str, size: Size, dtype: str, measured: Sequence[Measured],
          memory: dict[str, float]) -> list[dict[str, Any]]:
    by_name = {m.case.name: m for m in measured}
    rows = []
    for m in measured:
        floor = by_name.get(m.case.floor)
        ok = bool(m.samples) and floor is not None and bool(floor.samples)
        rows.append({
            "device": device, "size": size.name, "n": size.n, "d": size.d, "c": size.c, "dtype": dtype,
            "contender": m.case.name, "library": m.case.library, "kind": m.case.kind, "floor": m.case.floor,
            "median_ms": m.median * 1e3 if m.samples else math.nan,
            "ratio_to_floor": paired_ratio(m, floor) if ok and floor is not None else math.nan,
            "peak_mib": memory.get(m.case.name, math.nan),
            "repeats": len(m.samples), "inner": m.inner,
            "note": m.error or m.case.note,
        })
    return rows


#: Started by :func:`cpu_memory` with ``python -P -c``: the probe gets this process's
#: sys.path (so it imports the same lsoftmax_core, whether laid out, installed or
#: editable) with bench's parent at the end, never the repository root first.
_PROBE = "import json, sys; sys.path[:] = json.loads(sys.argv.pop(1)); from bench.memprobe import main; sys.exit(main(sys.argv[1:]))"


def cpu_memory(sizes: Sequence[Size], dtype: str, threads: int | None = None,
               layer_only: bool = False, loss: bool = False,
               exclude: Sequence[str] = ()) -> dict[tuple[str, str], float]:
    """(size name, contender) -> peak MiB, from :mod:`bench.memprobe` in a fresh process.

    ``loss``: the contenders of :func:`bench.contenders.loss_cases` (the loss suite),
    without those ``exclude`` names.
    """
    args = [str(v) for s in sizes for v in (s.name, s.n, s.d, s.c, dtype)]
    if layer_only:
        args.insert(0, "--layer-only")
    if loss:
        args.insert(0, "--loss" + ("=" + ",".join(exclude) if exclude else ""))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    if threads:
        env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    path = [p for p in sys.path if p] + ([] if str(REPO) in sys.path else [str(REPO)])
    try:
        out = subprocess.run([sys.executable, "-P", "-c", _PROBE, json.dumps(path), *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=1800 if loss else 600, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or "").strip().splitlines()[-1:]
        print(f"memory probe failed, no memory figures: {e} {' '.join(detail)}", file=sys.stderr)
        return {}
    result = {}
    for line in out.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            result[(rec["size"], rec["contender"])] = rec["peak_mib"]
    return result


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def _threads(threads: int | None, torch_too: bool = True) -> Iterator[None]:
    """Cap NumPy's BLAS (and PyTorch, unless not ``torch_too``) at ``threads`` threads for the block (None: leave them)."""
    if not threads:
        yield
        return
    torch: Any = None
    if torch_too:
        import torch
    before = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the BLAS keeps its threads; the environment record says how many
        limits = None
    else:
        limits = threadpool_limits(limits=threads, user_api="blas")
    try:
        yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)
        if limits is not None:
            limits.restore_original_limits()


def run_cpu(settings: Settings, *, out_dir: Path, doc: Path | None, plot_dir: Path | None,
            sizes: Sequence[Size] | None = None, memory: bool = True, threads: int | None = None,
            layer_only: bool = False, command: str | None = None) -> list[dict[str, Any]]:
    """Measure the CPU contenders; write ``cpu.csv``, ``cpu_lenet.csv``, ``cpu_env.json`` and the doc.

    ``sizes`` default to the CPU sizes of the one table; ``threads`` caps NumPy's BLAS
    and PyTorch (default: the libraries' own choice, one per core).
    """
    with _threads(threads, torch_too=not layer_only):
        return _run_cpu(settings, out_dir, doc, plot_dir, sizes_for("cpu") if sizes is None else sizes,
                        memory, threads, layer_only, command)


def _run_cpu(settings: Settings, out_dir: Path, doc: Path | None, plot_dir: Path | None,
             sizes: Sequence[Size], memory: bool, threads: int | None, layer_only: bool,
             command: str | None) -> list[dict[str, Any]]:
    if not layer_only:
        import torch  # noqa: F401 - imported before the environment record, which then lists its threads

    env = environment(gpu=False)
    env["threads_requested"] = threads or "library default"
    env["command"] = command or "python -m bench --cpu" + (f" --threads {threads}" if threads else "")
    rows: list[dict[str, Any]] = []
    for dtype in DTYPES["cpu"]:
        mem = cpu_memory(sizes, dtype, threads, layer_only) if memory else {}
        for size in sizes:
            _progress(f"cpu {size.label} {dtype}")
            # One interleaved measurement per comparison: NumPy's pair, then PyTorch's four.
            # Interleaving NumPy with PyTorch calls would only add the two thread pools
            # (OpenBLAS's pthreads, PyTorch's OpenMP) waking and spinning against each other.
            comparisons = [numpy_cases(size, dtype)]
            if not layer_only:
                comparisons.append(torch_cases(size, dtype, "cpu"))
            measured: list[Measured] = []
            for cases in comparisons:
                measured += measure(cases, repeat=settings.repeat, warmup=settings.warmup,
                                    min_time=settings.min_time)
            rows += _rows("cpu", size, dtype, measured, {k[1]: v for k, v in mem.items() if k[0] == size.name})
            del comparisons, measured
    lenet: list[dict[str, Any]] = []
    if not layer_only:
        _progress("cpu LeNet")
        lenet = lenet_rows("cpu", settings.lenet_batches, repeat=settings.repeat, warmup=settings.warmup,
                           min_time=settings.min_time)
    env["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    if "torch" in sys.modules:
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    _write(out_dir, "cpu", rows, lenet, env)
    report.publish(doc, plot_dir, "cpu", rows, lenet, env, out_dir)
    return rows


def _cupy_device() -> None:
    """Raise SystemExit unless CuPy imports and sees a CUDA device."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return
        problem = "no CUDA device"
    except Exception as e:  # noqa: BLE001 - CuPy missing, no driver, ...
        problem = f"{type(e).__name__}: {e}"
    raise SystemExit(f"CuPy sees no usable GPU ({problem}): nothing to measure with --layer-only")


def run_gpu(settings: Settings, *, out_dir: Path, doc: Path | None, plot_dir: Path | None,
            sizes: Sequence[Size] | None = None, dtypes: Sequence[str] | None = None,
            layer_only: bool = False, command: str | None = None) -> list[dict[str, Any]]:
    """Measure the GPU contenders; write ``gpu.csv``, ``gpu_lenet.csv``, ``gpu_env.json`` and, if asked, the doc.

    ``sizes`` and ``dtypes`` default to the GPU sizes and dtypes of the one table.  With
    ``layer_only`` only the CuPy pair runs (CuPy's three cuBLAS GEMMs, the CuPy backend)
    and PyTorch is not imported.
    """
    sizes = sizes_for("gpu") if sizes is None else sizes
    dtypes = DTYPES["gpu"] if dtypes is None else dtypes
    torch: Any = None
    if layer_only:
        _cupy_device()
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible to PyTorch: nothing to measure on GPU")
    env = environment(gpu=True)
    env["command"] = command or "python -m bench --gpu" + (" --layer-only" if layer_only else "")
    if torch is not None:
        env["torch_matmul_tf32"] = str(torch.backends.cuda.matmul.allow_tf32)
    env["CUPY_TF32"] = os.environ.get("CUPY_TF32", "(unset)")
    rows: list[dict[str, Any]] = []
    for size in sizes:  # size outer: every dtype converts the same drawn arrays
        for dtype in dtypes:
            _progress(f"gpu {size.label} {dtype}")
            cases: list[Case] = []
            try:
                cases += cupy_cases(size, dtype)
            except Exception as e:  # noqa: BLE001 - CuPy missing or broken: the torch rows still come
                if layer_only:
                    raise
                _progress(f"  CuPy contenders skipped: {e}")
            if not layer_only:
                cases += torch_cases(size, dtype, "cuda")
            measured = measure(cases, repeat=settings.repeat, warmup=settings.warmup, min_time=settings.min_time)
            rows += _rows("gpu", size, dtype, measured, _gpu_memory(measured))
            del cases, measured
            _free_gpu_memory(torch)
            # What is measured so far, in case the run is cut short (gpu_check.sh's timeout):
            # the files --render reads, and the section when no doc is written.
            _write(out_dir, "gpu", rows, [], env, quiet=True)
            if doc is None:
                report.publish(None, None, "gpu", rows, [], env, out_dir)
    lenet: list[dict[str, Any]] = []
    if not layer_only:
        _progress("gpu LeNet")
        lenet = lenet_rows("cuda", settings.lenet_batches, repeat=settings.repeat, warmup=settings.warmup,
                           min_time=settings.min_time)
    env["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    _write(out_dir, "gpu", rows, lenet, env)
    report.publish(doc, plot_dir, "gpu", rows, lenet, env, out_dir)
    return rows


def _free_gpu_memory(torch: Any) -> None:
    """Hand the cached blocks of the last size back, so that the next one has the whole device."""
    import gc

    gc.collect()
    if torch is not None:
        torch.cuda.empty_cache()
    if "cupy" in sys.modules:
        sys.modules["cupy"].get_default_memory_pool().free_all_blocks()


def _write(out_dir: Path, device: str, rows: list[dict[str, Any]], lenet: list[dict[str, Any]] | None,
           env: dict[str, Any], quiet: bool = False) -> None:
    """``DEVICE.csv``, ``DEVICE_lenet.csv`` (not for ``lenet=None``), ``DEVICE_env.json``;
    ``device`` is the file stem: "cpu", "gpu", or "cpu_loss", "gpu_loss" for the loss suite."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_csv(out_dir / f"{device}.csv", rows, report.COLUMNS)
    if lenet is not None:
        report.write_csv(out_dir / f"{device}_lenet.csv", lenet, report.LENET_COLUMNS)
    (out_dir / f"{device}_env.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
    if not quiet:
        _progress(f"wrote {out_dir / f'{device}.csv'}" + ("" if lenet is None else f", {device}_lenet.csv")
                  + f", {device}_env.json")


# --------------------------------------------------------------------------- the loss suite


def run_loss(device: str, settings: Settings, *, out_dir: Path, doc: Path | None, plot_dir: Path | None,
             sizes: Sequence[Size] | None = None, dtypes: Sequence[str] | None = None, memory: bool = True,
             threads: int | None = None, command: str | None = None,
             exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The fused cross-entropy comparison on ``device`` ("cpu" or "gpu"), without the
    contenders whose name contains a text of ``exclude``.

    Writes ``DEVICE_loss.csv`` and ``DEVICE_loss_env.json`` (after every size and dtype,
    so that a run cut short keeps what it measured) and, through
    :func:`bench.report.publish_loss`, ``DEVICE_loss.md`` / the doc section.  Memory: on
    CPU the separate-process peak-RSS probe (:func:`cpu_memory`), on GPU the allocators'
    peaks.  ``sizes``/``dtypes`` default to the loss suite's of the one table.
    """
    import torch

    sizes = sizes_for(device, suite="loss") if sizes is None else sizes
    dtypes = dtypes_for(device, "loss") if dtypes is None else dtypes
    if exclude and sizes:
        loss_cases(Size("check", 2, 2, 3, suite="loss"), "float32", "cpu", exclude=exclude)  # refuse early
    if device == "gpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to PyTorch: nothing to measure on GPU")
    with _threads(threads if device == "cpu" else None):
        env = environment(gpu=device == "gpu")
        env["command"] = command or f"python -m bench --{device} --loss"
        if device == "cpu":
            env["threads_requested"] = threads or "library default"
        else:
            env["torch_matmul_tf32"] = str(torch.backends.cuda.matmul.allow_tf32)
        stem = f"{device}_loss"
        rows: list[dict[str, Any]] = []
        for dtype in dtypes:
            mem_cpu: dict[tuple[str, str], float] = {}
            if device == "cpu" and memory:
                _progress(f"cpu loss memory probe {dtype} ({', '.join(s.label for s in sizes)})")
                mem_cpu = cpu_memory(sizes, dtype, threads, loss=True, exclude=exclude)
            for size in sizes:
                _progress(f"{device} loss {size.label} {dtype}")
                cases = loss_cases(size, dtype, "cpu" if device == "cpu" else "cuda", exclude=exclude)
                measured = measure(cases, repeat=settings.repeat, warmup=settings.warmup, min_time=settings.min_time)
                if device == "cpu":
                    mem = {k[1]: v for k, v in mem_cpu.items() if k[0] == size.name}
                else:
                    mem = _gpu_memory(measured) if memory else {}
                rows += _rows(device, size, dtype, measured, mem)
                del cases, measured
                if device == "gpu":
                    _free_gpu_memory(torch)
                _write(out_dir, stem, rows, None, env, quiet=True)
                if doc is None:
                    report.publish_loss(None, None, device, report.read_csv(out_dir / f"{stem}.csv"), env, out_dir)
        env["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        if device == "cpu":
            env["torch_threads"] = torch.get_num_threads()
    _write(out_dir, stem, rows, None, env)
    # The section from the CSV's figures (6 digits), as --render makes it: ratios of ratios
    # computed from the unrounded ones could differ in the last digit shown.
    report.publish_loss(doc, plot_dir, device, report.read_csv(out_dir / f"{stem}.csv"), env, out_dir)
    return rows


def _gpu_memory(measured: Sequence[Measured]) -> dict[str, float]:
    mem = {}
    for m in measured:
        if m.error:
            continue
        try:
            mem[m.case.name] = (cupy_peak if m.case.library == "cupy" else torch_cuda_peak)(m.case.run)
        except Exception as e:  # noqa: BLE001
            _progress(f"  memory of {m.case.name} not measured: {_one_line(e)}")
    return mem


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
