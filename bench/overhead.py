"""The per-call overhead table: ``python -m bench --cpu --overhead`` (and ``--gpu --overhead``).

CPU: at every CPU size of the one size table, once at one thread and once at the
libraries' default, two interleaved comparisons (see :mod:`bench.harness`):

* NumPy: the three GEMMs of a linear layer, a whole NumPy linear + softmax-cross-entropy
  step (:func:`bench.contenders.numpy_ce_step`: logits, softmax, loss, both gradients),
  the core's ``forward`` + ``backward``, and the same with the forward's statistics handed
  to the backward (``return_stats`` / ``stats``); each lsoftmax-core row gets its paired
  ratio to both floors;
* PyTorch: ``F.cross_entropy(F.linear(x, w))`` and ``F.cross_entropy(lsoftmax(x, w, y))``
  through the adapter, forward + backward by ``torch.autograd.grad``.

GPU (the seed's 256x2x10 head only): the CuPy backend's host time per forward+backward,
from the first call to the return of the last one without synchronising (a device
synchronisation before and after each sample, outside the clock), which is what bounds a
small GPU step; next to it the same calls' device time (CUDA events), the host time of
CuPy's three cuBLAS GEMMs, and the host time of the backend with its small-problem kernels
off (cuBLAS GEMMs + margin kernels, the plan above the small-problem limits).

Each ratio also gets the first and third quartiles of its per-repetition ratios (columns
``ratio_*_q1`` / ``ratio_*_q3``), shown next to the goals: on a shared machine a median on
the target's edge is a coin toss, and the quartiles say how wide the toss is.

Files: ``DEVICE_overhead.csv`` and ``DEVICE_overhead_env.json`` in the results
folder, and the section ``DEVICE-overhead`` of docs/BENCHMARKS.md (or
``DEVICE_overhead.md`` in ``--out`` with ``--no-doc``), goals included.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import lsoftmax_core as lsm

from .contenders import (
    BETA,
    MARGIN,
    NP_LINEAR,
    TORCH_ADAPTER,
    TORCH_LINEAR,
    Size,
    _data,
    numpy_ce_step,
    sizes_for,
)
from .harness import (
    Case,
    Measured,
    cpu_clock,
    cupy_clock,
    environment,
    measure,
    paired_ratio,
    paired_ratio_quartiles,
)

__all__ = ["COLUMNS", "GOALS", "goals", "markdown", "run_overhead"]

NP_CE_STEP = "numpy linear + softmax CE step"
NP_FWD_BWD = "lsoftmax-core numpy forward+backward"
NP_STATS = "lsoftmax-core numpy, statistics handed to backward"
NP_NUMBA = "lsoftmax-core numpy forward+backward, numba kernels"
TORCH_NUMBA = "lsoftmax-core torch adapter + CE, numba kernels"
CP_HOST = "lsoftmax-core cupy forward+backward: host time"
CP_DEVICE = "lsoftmax-core cupy forward+backward: device time"
CP_GEMMS_HOST = "cupy 3 cuBLAS GEMMs: host time"
CP_GEMM_PLAN = "lsoftmax-core cupy forward+backward, GEMM plan (small-problem kernels off): host time"

#: Paired ratios of each row: to the three NumPy GEMMs, to the NumPy CE step, to torch's floor.
FLOORS = {"ratio_gemms": NP_LINEAR, "ratio_ce_step": NP_CE_STEP, "ratio_torch_floor": TORCH_LINEAR}
#: Each ratio's first and third quartiles over the repetitions ("ratio_gemms_q1", ...).
QUARTILES = tuple(f"{column}_{q}" for column in FLOORS for q in ("q1", "q3"))
COLUMNS = ("device", "threads", "size", "n", "d", "c", "dtype", "contender", "median_us", *FLOORS,
           "repeats", "inner", "note", *QUARTILES)

#: Issue 13's goals: (what, threads (None: the default), size name, contender, ratio column or
#: "median_us", target, test).
GOALS: dict[str, list[tuple[str, int | None, str, str, str, str, Callable[[float], bool]]]] = {
    "cpu": [
        ("NumPy backend fwd+bwd vs NumPy linear + softmax-CE step", 1, "mnist", NP_FWD_BWD, "ratio_ce_step",
         "<= 2x", lambda v: v <= 2.0),
        ("the same, statistics handed to the backward", 1, "mnist", NP_STATS, "ratio_ce_step",
         "<= 2x", lambda v: v <= 2.0),
        ("torch adapter + CE vs F.cross_entropy(F.linear(...))", 1, "mnist", TORCH_ADAPTER, "ratio_torch_floor",
         "<= 2x", lambda v: v <= 2.0),
        ("NumPy backend fwd+bwd with set_cpu_kernels('numba') vs the CE step", 1, "mnist", NP_NUMBA,
         "ratio_ce_step", "<= 2x", lambda v: v <= 2.0),
        ("torch adapter + CE with set_cpu_kernels('numba') vs F.cross_entropy(F.linear(...))", 1, "mnist",
         TORCH_NUMBA, "ratio_torch_floor", "<= 2x", lambda v: v <= 2.0),
        *((f"NumPy backend fwd+bwd vs 3 NumPy GEMMs, {t or 'default'} thread(s)", t, "face", NP_FWD_BWD,
           "ratio_gemms", "<= 1.03x", lambda v: v <= 1.03) for t in (1, None)),
        *((f"torch adapter + CE vs torch linear + CE, {t or 'default'} thread(s)", t, "face", TORCH_ADAPTER,
           "ratio_torch_floor", "<= 1.05x", lambda v: v <= 1.05) for t in (1, None)),
    ],
    "gpu": [
        ("CuPy backend host time per fwd+bwd", None, "mnist", CP_HOST, "median_us", "<= 60 us",
         lambda v: v <= 60.0),
    ],
}


def _row(device: str, threads: int | None, size: Size, dtype: str, m: Measured,
         by_name: dict[str, Measured]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "device": device, "threads": threads or "default", "size": size.name, "n": size.n, "d": size.d,
        "c": size.c, "dtype": dtype, "contender": m.case.name,
        "median_us": m.median * 1e6 if m.samples else math.nan,
    }
    for column, floor_name in FLOORS.items():
        floor = by_name.get(floor_name)
        ok = floor is not None and bool(floor.samples) and bool(m.samples) and floor is not m
        row[column] = paired_ratio(m, floor) if ok and floor is not None else math.nan
        q1, q3 = paired_ratio_quartiles(m, floor) if ok and floor is not None else (math.nan, math.nan)
        row[f"{column}_q1"], row[f"{column}_q3"] = q1, q3
    row.update(repeats=len(m.samples), inner=m.inner, note=m.error or m.case.note)
    return row


def _numba_version() -> str:
    try:
        import numba
    except ImportError:
        return "not installed (no numba-kernel rows)"
    return str(numba.__version__)


def _numba_available() -> bool:
    return not _numba_version().startswith("not installed")


def _with_kernels(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the NumPy backend's per-sample kernels ``name`` (the interleaved
    measurement alternates contenders, so each one sets its own; a dict update)."""

    def run() -> object:
        lsm.set_cpu_kernels(name)
        return fn()

    return run


def numpy_overhead_cases(size: Size, dtype: str = "float32", seed: int = 0) -> list[Case]:
    """The NumPy floors and the NumPy backend, with the NumPy code's kernels and, where
    Numba is installed, with the compiled ones (``set_cpu_kernels("numba")``)."""
    x64, w64, g64, label64 = _data(size, seed)
    assert g64 is not None
    x, w, g = (a.astype(dtype) for a in (x64, w64, g64))
    label = label64.copy()

    def ours() -> object:
        logits = lsm.forward(x, w, label, margin=MARGIN, beta=BETA)
        return logits, lsm.backward(g, x, w, label, margin=MARGIN, beta=BETA)

    def ours_stats() -> object:
        logits, stats = lsm.forward(x, w, label, margin=MARGIN, beta=BETA, return_stats=True)
        return logits, lsm.backward(g, x, w, label, margin=MARGIN, beta=BETA, stats=stats)

    cases = [
        Case(NP_LINEAR, "numpy", "layer", NP_LINEAR, lambda: (x @ w.T, g @ w, g.T @ x), cpu_clock),
        Case(NP_CE_STEP, "numpy", "loss", NP_CE_STEP, numpy_ce_step(x, w, label), cpu_clock),
        Case(NP_FWD_BWD, "numpy", "layer", NP_CE_STEP, _with_kernels("numpy", ours), cpu_clock),
        Case(NP_STATS, "numpy", "layer", NP_CE_STEP, _with_kernels("numpy", ours_stats), cpu_clock),
    ]
    if _numba_available():
        cases.append(Case(NP_NUMBA, "numpy", "layer", NP_CE_STEP, _with_kernels("numba", ours), cpu_clock))
    return cases


def torch_overhead_cases(size: Size, dtype: str = "float32", seed: int = 0) -> list[Case]:
    """The PyTorch floor and the adapter, as in :func:`bench.contenders.torch_cases`."""
    import torch
    import torch.nn.functional as F

    from lsoftmax_core.adapters.torch import lsoftmax

    x64, w64, _, label64 = _data(size, seed)
    x, w = (torch.tensor(a, dtype=getattr(torch, dtype), requires_grad=True) for a in (x64, w64))
    label = torch.tensor(label64)

    def floor() -> object:
        return torch.autograd.grad(F.cross_entropy(F.linear(x, w), label), (x, w))

    def ours() -> object:
        return torch.autograd.grad(F.cross_entropy(lsoftmax(x, w, label, margin=MARGIN, beta=BETA), label), (x, w))

    cases = [Case(TORCH_LINEAR, "torch", "loss", TORCH_LINEAR, floor, cpu_clock),
             Case(TORCH_ADAPTER, "torch", "loss", TORCH_LINEAR, _with_kernels("numpy", ours), cpu_clock)]
    if _numba_available():
        cases.append(Case(TORCH_NUMBA, "torch", "loss", TORCH_LINEAR, _with_kernels("numba", ours), cpu_clock))
    return cases


def _host_clock(fn: Callable[[], object], inner: int) -> float:
    """Host seconds per call: from the first call to the last return, devices synchronised
    before and after (outside the clock), never inside."""
    import time

    import cupy

    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    t = time.perf_counter() - t0
    cupy.cuda.Device().synchronize()
    return t / inner


def cupy_overhead_cases(size: Size, dtype: str = "float32", seed: int = 0) -> list[Case]:
    import cupy

    from lsoftmax_core import _cupy_plan as plan

    x64, w64, g64, label64 = _data(size, seed)
    assert g64 is not None
    x, w, g = (cupy.asarray(a.astype(dtype)) for a in (x64, w64, g64))
    label = cupy.asarray(label64.copy())

    def ours() -> object:
        logits = lsm.forward(x, w, label, margin=MARGIN, beta=BETA)
        return logits, lsm.backward(g, x, w, label, margin=MARGIN, beta=BETA)

    def gemms() -> object:
        return x @ w.T, g @ w, g.T @ x

    def ours_gemm_plan() -> object:
        # The plan the backend takes above its small-problem limits (cuBLAS GEMMs + margin
        # kernels), at this size: what the small-problem kernels replace.
        saved = plan.SMALL_MAX_MACS
        plan.SMALL_MAX_MACS = 0
        try:
            return ours()
        finally:
            plan.SMALL_MAX_MACS = saved

    return [
        Case(CP_GEMMS_HOST, "cupy", "layer", CP_GEMMS_HOST, gemms, _host_clock),
        Case(CP_HOST, "cupy", "layer", CP_GEMMS_HOST, ours, _host_clock),
        Case(CP_DEVICE, "cupy", "layer", CP_GEMMS_HOST, ours, cupy_clock),
        Case(CP_GEMM_PLAN, "cupy", "layer", CP_GEMMS_HOST, ours_gemm_plan, _host_clock),
    ]


def goals(device: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for what, threads, size, contender, column, target, test in GOALS[device]:
        found = [r for r in rows if r["size"] == size and r["contender"] == contender and r["dtype"] == "float32"
                 and str(r["threads"]) == str(threads or "default")]
        value = float(found[0][column]) if found and _ok(found[0][column]) else math.nan
        dims = next(s for s in sizes_for(device) if s.name == size).dims
        shown = f"{value:.3g} us" if column == "median_us" else f"{value:.3f}x"  # 2.004x is not "2x"
        q1, q3 = (found[0].get(f"{column}_{q}", math.nan) for q in ("q1", "q3")) if found else (math.nan, math.nan)
        if _ok(q1) and _ok(q3):  # older files have no quartiles
            shown += f" ({float(q1):.3f}-{float(q3):.3f})"
        out.append({"goal": f"{what}, {dims} float32", "target": target,
                    "measured": shown if _ok(value) else "not measured",
                    "status": ("met" if test(value) else "MISSED") if _ok(value) else "not measured"})
    return out


def _ok(v: Any) -> bool:
    try:
        return not math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if not _ok(r["median_us"]):
        return f"failed: {r['note']}" if r.get("note") else "n/a"
    ratios = []
    for column, floor in (("ratio_ce_step", "CE step"), ("ratio_gemms", "GEMMs"), ("ratio_torch_floor", "floor")):
        if _ok(r[column]) and not (r["contender"] == NP_LINEAR and column == "ratio_ce_step"):
            ratios.append(f"{float(r[column]):.3g}x {floor}")
    return f"{float(r['median_us']):.4g} us" + (f" ({', '.join(ratios)})" if ratios else "")


def markdown(device: str, rows: Sequence[dict[str, Any]], env: dict[str, Any]) -> str:
    out = [(f"_Generated by `{env.get('command', '?')}` on {env.get('date_utc', '?')}; load average "
            f"{env.get('loadavg_start', '?')} at the start, {env.get('loadavg_end', '?')} at the end._"), ""]
    out += [("Median time per forward+backward over the repetitions, float32, margin 4, beta 0; in parentheses "
             "the median of the per-repetition ratios to the floors measured in the same interleaved run: "
             "`CE step` = a whole NumPy linear + softmax-cross-entropy step (logits, softmax, loss, both "
             "gradients), `GEMMs` = the three NumPy GEMMs of a linear layer, `floor` = "
             "`F.cross_entropy(F.linear(x, w), y)` forward+backward."), ""]
    sizes: list[tuple[str, str]] = []
    for r in rows:
        label = f"{r['size']} {Size(r['size'], int(r['n']), int(r['d']), int(r['c'])).dims}"
        if (r["size"], label) not in sizes:
            sizes.append((r["size"], label))
    for threads in dict.fromkeys(str(r["threads"]) for r in rows):
        part = [r for r in rows if str(r["threads"]) == threads]
        names = list(dict.fromkeys(r["contender"] for r in part))
        out += [f"#### {'CPU' if device == 'cpu' else 'GPU'}, threads: {threads}", "",
                "| contender | " + " | ".join(label for _, label in sizes) + " |",
                "|---|" + "---|" * len(sizes)]
        for name in names:
            cells = [_cell(next((r for r in part if r["contender"] == name and r["size"] == s), None))
                     for s, _ in sizes]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["#### Goals (issue 13)", "",
            "The measured ratio is the median of the per-repetition ratios; in parentheses their first and "
            "third quartiles, the spread of this one run. The status compares the median alone.", "",
            "| goal | target | measured | status |", "|---|---|---|---|"]
    out += [f"| {g['goal']} | {g['target']} | {g['measured']} | {g['status']} |" for g in goals(device, rows)]
    out += ["", "Machine and libraries:", ""]
    out += [f"- {k}: {v}" for k, v in sorted(env.items())]
    return "\n".join(out) + "\n"


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from .report import write_csv

    write_csv(path, rows, COLUMNS)


def run_overhead(device: str, settings: Any, *, out_dir: Path, doc: Path | None, sizes: Sequence[Size] | None,
                 threads: int | None, command: str) -> list[dict[str, Any]]:
    """Measure, write ``DEVICE_overhead.csv``/``_env.json`` into ``out_dir`` and the section
    into ``doc`` (or ``DEVICE_overhead.md`` into ``out_dir`` when ``doc`` is None).

    CPU: at ``threads`` only if given, else at one thread and then at the default."""
    from .report import HOWTO, update_doc
    from .runner import _progress, _threads

    rows: list[dict[str, Any]] = []
    if device == "cpu":
        import torch  # noqa: F401 - imported before the environment record, which then lists its threads

        sizes = sizes_for("cpu") if sizes is None else sizes
        env = environment(gpu=False)
        env["numba"] = _numba_version()
        kernels = lsm.cpu_kernels()  # the contenders choose their own; restored after
        try:
            for t in ((threads,) if threads else (1, None)):
                with _threads(t):
                    for size in sizes:
                        _progress(f"cpu overhead {size.label}, threads: {t or 'default'}")
                        for cases in (numpy_overhead_cases(size), torch_overhead_cases(size)):
                            measured = measure(cases, repeat=settings.repeat, warmup=settings.warmup,
                                               min_time=settings.min_time)
                            by_name = {m.case.name: m for m in measured}
                            rows += [_row("cpu", t, size, "float32", m, by_name) for m in measured]
        finally:
            lsm.set_cpu_kernels(kernels)
    else:
        from .runner import _cupy_device

        _cupy_device()
        sizes = sizes_for("gpu", ["mnist"]) if sizes is None else sizes
        env = environment(gpu=True)
        for size in sizes:
            _progress(f"gpu overhead {size.label}")
            measured = measure(cupy_overhead_cases(size), repeat=settings.repeat, warmup=settings.warmup,
                               min_time=settings.min_time)
            by_name = {m.case.name: m for m in measured}
            rows += [_row("gpu", None, size, "float32", m, by_name) for m in measured]
    env["command"] = command
    env["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / f"{device}_overhead.csv", rows)
    (out_dir / f"{device}_overhead_env.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
    # The section from the CSV's figures, as --render makes it: a ratio near a rounding edge
    # could otherwise print one way here and the other way when rendered.
    from .report import read_csv

    text = markdown(device, read_csv(out_dir / f"{device}_overhead.csv"), env)
    if doc is None:
        (out_dir / f"{device}_overhead.md").write_text(text)
    else:
        title = "CPU" if device == "cpu" else "GPU"
        update_doc(doc, "howto", "## How to run", HOWTO)
        update_doc(doc, f"{device}-overhead", f"## {title} results: per-call overhead", text)
    _progress(f"wrote {out_dir / f'{device}_overhead.csv'}")
    return rows


def render(device: str, source: Path, doc: Path | None, out_dir: Path) -> str:
    """The section from a run's files (``--render DEVICE --overhead``)."""
    import shutil

    from .report import read_csv, update_doc

    names = [f"{device}_overhead.csv", f"{device}_overhead_env.json"]
    if source.resolve() != out_dir.resolve():  # the run's files join the results, as other renders do
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            if (source / name).exists():
                shutil.copyfile(source / name, out_dir / name)
    rows = read_csv(source / names[0])
    env_path = source / names[1]
    env = json.loads(env_path.read_text()) if env_path.exists() else {"command": f"python -m bench --{device} --overhead"}
    text = markdown(device, rows, env)
    if doc is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{device}_overhead.md").write_text(text)
    else:
        update_doc(doc, f"{device}-overhead", f"## {'CPU' if device == 'cpu' else 'GPU'} results: per-call overhead",
                   text)
    return text
