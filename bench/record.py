"""The suite record, the one runner of timed suites and the one publish path.

Every suite is a :class:`Suite`.  A run writes three files per suite and device into the
results folder (``bench/results`` by default): ``DEVICE_SUITE.csv`` (one row per
contender, size, dtype and thread count), ``DEVICE_SUITE_env.json`` (machine, libraries,
command, date) and ``DEVICE_SUITE.md``, the table generated from the CSV alone, which
docs/BENCHMARKS.md links to.  The files are rewritten after every size, so a run cut
short (a GPU call's time limit) keeps what it measured; ``--render`` regenerates the
markdown of a folder's runs from their CSV and env files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import (
    Case,
    Measured,
    cupy_peak,
    measure,
    paired_ratio,
    paired_ratio_quartiles,
    threads,
    torch_cuda_peak,
)
from .sizes import Size

__all__ = ["COLUMNS", "Goal", "Options", "Suite", "publish", "read_csv", "render", "run_timed", "table"]

REPO = Path(__file__).resolve().parents[1]
#: The columns of every timed suite (layer, loss, overhead).  ``ratio`` is the median of the
#: per-repetition ratios to ``floor``; ``ratio_q1``/``ratio_q3`` their quartiles.
COLUMNS = ("device", "size", "n", "d", "c", "dtype", "threads", "contender", "library", "floor", "median_ms",
           "ratio", "ratio_q1", "ratio_q3", "peak_mib", "repeats", "inner", "note")


@dataclass(frozen=True)
class Options:
    """What one run measures: repetitions, sample length, sizes, threads, exclusions."""

    device: str = "cpu"
    repeat: int = 15
    warmup: int = 2
    min_time: float = 0.02
    sizes: tuple[Size, ...] = ()
    threads: int | None = None
    exclude: tuple[str, ...] = ()
    memory: bool = True


@dataclass(frozen=True)
class Goal:
    """A target on one row: ``contender``'s ``column`` (over ``vs``'s, if given) at N x D x C,
    float32 (at ``threads``, if given), compared with ``limit`` (``at_least``: >=, else <=)."""

    text: str
    dims: tuple[int, int, int]
    contender: str
    limit: float
    vs: str | None = None
    column: str = "ratio"
    at_least: bool = False
    threads: str | None = None

    def check(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        def value(name: str) -> float:
            for r in rows:
                if (r["n"], r["d"], r["c"]) == self.dims and r["dtype"] == "float32" and r["contender"] == name \
                        and self.threads in (None, str(r["threads"])):
                    return float(r[self.column]) if ok(r[self.column]) else math.nan
            return math.nan

        v = value(self.contender) / (value(self.vs) if self.vs else 1.0)
        fmt = (lambda t: f"{t * 1e3:.3g} us") if self.column == "median_ms" else (lambda t: f"{t:.3f}x")
        status = "not measured" if not ok(v) else ("met" if (v >= self.limit if self.at_least else v <= self.limit)
                                                   else "MISSED")
        n, d, c = self.dims
        where = f"{Size('', n, d, c).dims} float32" + (f", threads {self.threads}" if self.threads else "")
        return [f"{self.text}, {where}", (">= " if self.at_least else "<= ") + fmt(self.limit),
                fmt(v) if ok(v) else "unverified: not measured", status]


@dataclass(frozen=True)
class Suite:
    """One comparison: its name (``python -m bench NAME``), the devices it runs on, how it
    runs (``run`` yields the rows of each size as they are measured), its CSV columns, the
    markdown of its rows, its goals.  Timed suites also give ``cases`` (the contenders of one
    size in interleaved groups), which the CPU memory probe builds in its own process."""

    name: str
    title: str
    about: str
    devices: tuple[str, ...]
    run: Callable[[Options], Iterator[list[dict[str, Any]]]]
    markdown: Callable[[Sequence[dict[str, Any]]], list[str]]
    columns: tuple[str, ...] = COLUMNS
    table: str | None = "layer"  # the size table (None: the suite has its own, e.g. LeNet's batches)
    goals: dict[str, tuple[Goal, ...]] = field(default_factory=dict)
    cases: Callable[[Size, str, str, Sequence[str]], list[list[Case]]] | None = None
    #: device -> (repetitions, warm-up calls, seconds per sample) of a full run.
    settings: dict[str, tuple[int, int, float]] = field(
        default_factory=lambda: {"cpu": (15, 2, 0.02), "gpu": (30, 3, 0.005)})


def ok(v: Any) -> bool:
    try:
        return not math.isnan(float(v))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- timed suites


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_timed(suite: Suite, opts: Options, dtypes: Sequence[str],
              thread_counts: Sequence[int | None] = (None,)) -> Iterator[list[dict[str, Any]]]:
    """Every size x dtype x thread count of ``suite``: its groups measured one after the
    other, memory from the probe (CPU) or the allocators (GPU)."""
    assert suite.cases is not None
    for count in (opts.threads,) if opts.threads else thread_counts:
        with threads(count):
            for dtype in dtypes:
                mem: dict[tuple[str, str], float] = {}
                if opts.memory and opts.device == "cpu":
                    mem = cpu_memory(suite.name, opts.sizes, dtype, count, opts.exclude)
                for size in opts.sizes:
                    _progress(f"{opts.device} {suite.name} {size.name} {size.dims} {dtype}, threads {count or 'default'}")
                    rows = []
                    for group in suite.cases(size, dtype, opts.device, opts.exclude):
                        measured = measure(group, repeat=opts.repeat, warmup=opts.warmup, min_time=opts.min_time)
                        peaks = {k[1]: v for k, v in mem.items() if k[0] == size.name}
                        if opts.memory and opts.device == "gpu":
                            peaks = _gpu_memory(measured)
                        rows += _rows(opts.device, size, dtype, count, measured, peaks)
                        del group, measured
                    yield rows
                    if opts.device == "gpu":
                        _free_gpu_memory()


def _rows(device: str, size: Size, dtype: str, count: int | None, measured: Sequence[Measured],
          peaks: dict[str, float]) -> list[dict[str, Any]]:
    by_name = {m.case.name: m for m in measured}
    out = []
    for m in measured:
        floor = by_name.get(m.case.floor)
        both = bool(m.samples) and floor is not None and bool(floor.samples)
        q1, q3 = paired_ratio_quartiles(m, floor) if both and floor is not None else (math.nan, math.nan)
        out.append({"device": device, "size": size.name, "n": size.n, "d": size.d, "c": size.c, "dtype": dtype,
                    "threads": count or "default", "contender": m.case.name, "library": m.case.library,
                    "floor": m.case.floor, "median_ms": m.median * 1e3,
                    "ratio": paired_ratio(m, floor) if both and floor is not None else math.nan,
                    "ratio_q1": q1, "ratio_q3": q3, "peak_mib": peaks.get(m.case.name, math.nan),
                    "repeats": len(m.samples), "inner": m.inner, "note": m.error or m.case.note})
    return out


def _gpu_memory(measured: Sequence[Measured]) -> dict[str, float]:
    peaks = {}
    for m in measured:
        if not m.error:
            try:
                peaks[m.case.name] = (cupy_peak if m.case.library == "cupy" else torch_cuda_peak)(m.case.run)
            except Exception as e:  # noqa: BLE001 - out of memory: the row keeps its time, no memory
                _progress(f"  memory of {m.case.name} not measured: {type(e).__name__}")
    return peaks


def _free_gpu_memory() -> None:
    """Hand the cached blocks of the last size back, so that the next one has the whole device."""
    import gc

    gc.collect()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()
    if "cupy" in sys.modules:
        sys.modules["cupy"].get_default_memory_pool().free_all_blocks()


#: The probe's command (``python -P -c``): this process's sys.path, so that it imports the same
#: lsoftmax_core, with bench's parent at the end, never the repository root first.
_PROBE = ("import json, sys; sys.path[:] = json.loads(sys.argv.pop(1)); "
          "from bench.memprobe import main; sys.exit(main(sys.argv[1:]))")


def cpu_memory(suite: str, sizes: Sequence[Size], dtype: str, count: int | None,
               exclude: Sequence[str]) -> dict[tuple[str, str], float]:
    """(size name, contender) -> peak MiB, from :mod:`bench.memprobe` in a fresh process."""
    args = [suite, dtype, ",".join(exclude)] + [str(v) for s in sizes for v in (s.name, s.n, s.d, s.c, s.table)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    if count:
        env.update(OPENBLAS_NUM_THREADS=str(count), OMP_NUM_THREADS=str(count))
    path = [p for p in sys.path if p] + [str(REPO)]
    try:
        out = subprocess.run([sys.executable, "-P", "-c", _PROBE, json.dumps(path), *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=3600, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        tail = (getattr(e, "stderr", None) or "").strip().splitlines()[-1:]
        _progress(f"memory probe failed, no memory figures: {e} {' '.join(tail)}")
        return {}
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {(r["size"], r["contender"]): r["peak_mib"] for r in recs}


# --------------------------------------------------------------------------- files and markdown


def _cell(v: Any) -> str:
    return ("nan" if math.isnan(v) else f"{v:.6g}") if isinstance(v, float) else str(v)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows with numbers back as int/float."""
    def parse(k: str, v: str) -> Any:
        for t in (int, float):
            try:
                return v if k in ("note", "size", "dtype", "contender") else t(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: parse(k, v) for k, v in r.items()} for r in csv.DictReader(f)]


def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def _markdown(suite: Suite, device: str, rows: Sequence[dict[str, Any]], env: dict[str, Any]) -> str:
    out = [f"# {suite.title} ({device.upper()})", "",
           f"_Generated from `{device}_{suite.name}.csv` by `{env.get('command', '?')}` on {env.get('date_utc', '?')}"
           f" ({env.get('gpu') or env.get('cpu_model', '?')}); load average {env.get('loadavg_start', '?')} at the"
           f" start, {env.get('loadavg_end', '?')} at the end._", "", suite.about, "", *suite.markdown(rows)]
    goals = suite.goals.get(device, ())
    if goals:
        out += ["## Goals", "", *table(["goal", "target", "measured", "status"], [g.check(rows) for g in goals]), ""]
    notes = dict.fromkeys(f"- {r.get('contender', r.get('head', ''))} ({r.get('size', '')}, {r.get('dtype', '')}):"
                          f" {r['note']}" for r in rows if r.get("note"))
    if notes:
        out += ["## Notes from the run", "", *notes, ""]
    out += ["## Machine and libraries", "", *(f"- {k}: {v}" for k, v in sorted(env.items()))]
    return "\n".join(out) + "\n"


def publish(suite: Suite, device: str, rows: Sequence[dict[str, Any]], env: dict[str, Any], out: Path) -> Path:
    """Write ``DEVICE_SUITE.csv``, ``_env.json`` and the ``.md`` generated from the CSV (as ``--render`` reads it)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{device}_{suite.name}"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(suite.columns)
        w.writerows([_cell(r.get(c, "")) for c in suite.columns] for r in rows)
    env = dict(env, suite=suite.name, device=device, loadavg_end=" ".join(f"{v:.2f}" for v in os.getloadavg()))
    Path(f"{stem}_env.json").write_text(json.dumps(env, indent=1, sort_keys=True) + "\n")
    md = Path(f"{stem}.md")
    md.write_text(_markdown(suite, device, read_csv(Path(f"{stem}.csv")), env))
    return md


def render(folder: Path, suites: dict[str, Suite]) -> list[Path]:
    """Regenerate the markdown of every run in ``folder`` from its CSV and env files."""
    done = []
    for env_path in sorted(folder.glob("*_env.json")):
        env = json.loads(env_path.read_text())
        suite, device = suites[env["suite"]], env["device"]
        rows = read_csv(folder / f"{device}_{suite.name}.csv")
        md = folder / f"{device}_{suite.name}.md"
        md.write_text(_markdown(suite, device, rows, env))
        done.append(md)
    return done
