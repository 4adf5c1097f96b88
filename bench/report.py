"""CSV files, the goals, the markdown section and the plot written into docs/BENCHMARKS.md.

The generated parts of docs/BENCHMARKS.md sit between ``<!-- bench:NAME:begin -->`` and
``<!-- bench:NAME:end -->`` markers (NAME = howto, cpu, gpu, and cpu-loss, gpu-loss for the
fused cross-entropy comparison); :func:`update_doc` re-reads
the file and replaces only what lies between one pair, so other sections of the file
(another author's, hand-written notes) are never touched.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable

from .contenders import (
    CP_FUSED_MISSING,
    CP_LINEAR,
    CP_LSM,
    FUSED,
    NP_LINEAR,
    NP_LSM,
    NP_UNFUSED,
    TORCH_ADAPTER,
    TORCH_FUSED,
    TORCH_LINEAR,
    TORCH_NAIVE,
    TORCH_PML,
    Fused,
    Size,
)

__all__ = [
    "COLUMNS",
    "LENET_COLUMNS",
    "goals",
    "loss_goals",
    "loss_markdown",
    "markdown",
    "plot",
    "publish",
    "publish_loss",
    "read_csv",
    "update_doc",
    "write_csv",
]

COLUMNS = ("device", "size", "n", "d", "c", "dtype", "contender", "library", "kind", "floor",
           "median_ms", "ratio_to_floor", "peak_mib", "repeats", "inner", "note")
LENET_COLUMNS = ("device", "batch", "head", "samples_per_s", "ratio_to_plain", "seed_samples_per_s",
                 "seed_ratio", "repeats", "inner", "note")

ORDER = (NP_LINEAR, NP_LSM, CP_LINEAR, CP_LSM, TORCH_LINEAR, TORCH_ADAPTER, TORCH_PML, TORCH_NAIVE)
UNMEASURED = "unverified: not measured"


# --------------------------------------------------------------------------- CSV


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(columns)
        for r in rows:
            out.writerow([_cell(r.get(c, "")) for c in columns])


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows with numbers back as int/float (for re-rendering a GPU run's files here)."""
    def parse(v: str) -> Any:
        for t in (int, float):
            try:
                return t(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: (v if k in ("note", "size", "dtype") else parse(v)) for k, v in r.items()} for r in csv.DictReader(f)]


# --------------------------------------------------------------------------- goals


def _find(rows: Sequence[dict[str, Any]], size: str, dtype: str, contender: str) -> dict[str, Any] | None:
    for r in rows:
        if r["size"] == size and r["dtype"] == dtype and r["contender"] == contender:
            return r
    return None


def _ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


#: The issue's goals per device: (what, N, D, C, contender, peer, target, test, format),
#: all float32.  Without ``peer`` the value is the contender's ratio to its floor; with
#: one it is "x times faster than the peer", the ratio of the two ratios to the same
#: floor, i.e. of two times measured in the same repetitions.  Found by shape, not by
#: size name: a goal names its N x D x C and is "not measured" if the table lacks it.
GOALS: dict[str, list[tuple[str, int, int, int, str, str | None, str, Callable[[float], bool], str]]] = {
    "cpu": [
        ("NumPy backend fwd+bwd vs NumPy linear", 256, 512, 10_000, NP_LSM, None,
         "<= 1.05x", lambda v: v <= 1.05, "{:.3f}x"),
        ("torch adapter + CE vs pytorch-metric-learning", 256, 512, 10_000, TORCH_ADAPTER, TORCH_PML,
         ">= 3x faster", lambda v: v >= 3.0, "{:.2f}x faster"),
    ],
    "gpu": [
        ("CuPy backend fwd+bwd vs 3 cuBLAS GEMMs", 512, 512, 100_000, CP_LSM, None,
         "<= 1.03x", lambda v: v <= 1.03, "{:.3f}x"),
        ("CuPy backend fwd+bwd vs 3 cuBLAS GEMMs", 256, 2, 10, CP_LSM, None,
         "<= 1.5x", lambda v: v <= 1.5, "{:.3f}x"),
        ("torch adapter + CE vs pytorch-metric-learning", 512, 512, 100_000, TORCH_ADAPTER, TORCH_PML,
         ">= 3x faster", lambda v: v >= 3.0, "{:.2f}x faster"),
    ],
}


def goals(device: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals for ``device`` with the measured value and met / MISSED / not measured."""
    def ratio(n: int, d: int, c: int, contender: str) -> float:
        for r in rows:
            if (int(r.get("n", -1)), int(r.get("d", -1)), int(r.get("c", -1))) == (n, d, c) \
                    and r["dtype"] == "float32" and r["contender"] == contender:
                return float(r["ratio_to_floor"]) if _ok(r["ratio_to_floor"]) else math.nan
        return math.nan

    out = []
    for what, n, d, c, contender, peer, target, test, fmt in GOALS[device]:
        value = ratio(n, d, c, contender)
        if peer is not None:
            value = ratio(n, d, c, peer) / value
        measured = _ok(value)
        out.append({"goal": f"{what}, {Size('', n, d, c).dims} float32", "target": target,
                    "measured": fmt.format(value) if measured else UNMEASURED,
                    "status": ("met" if test(value) else "MISSED") if measured else "not measured"})
    return out


# --------------------------------------------------------------------------- markdown


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _sizes(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r["size"], Size(r["size"], int(r["n"]), int(r["d"]), int(r["c"])).label)
    return list(seen.items())


def _contenders(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["contender"] for r in rows}
    return [c for c in ORDER if c in present] + sorted(present - set(ORDER))


def _timing_table(rows: Sequence[dict[str, Any]], dtype: str) -> list[str]:
    sizes = _sizes(rows)
    body = []
    for name in _contenders(rows):
        cells = []
        first = None
        for size, _ in sizes:
            r = _find(rows, size, dtype, name)
            first = first or r
            if r is None or not _ok(r["median_ms"]):
                cells.append("skipped" if r is not None else "")
            elif r["contender"] == r["floor"]:
                cells.append(f"**1** ({r['median_ms']:.3g} ms)")
            else:
                cells.append(f"{r['ratio_to_floor']:.2f}x ({r['median_ms']:.3g} ms)")
        if first is not None:
            floor = "(floor)" if first["contender"] == first["floor"] else first["floor"]
            body.append([name, first["kind"], floor, *cells])
    return _table(["contender", "work", "ratio to", *(label for _, label in sizes)], body)


def _memory_table(rows: Sequence[dict[str, Any]], dtype: str) -> list[str]:
    sizes = _sizes(rows)
    body = []
    for name in _contenders(rows):
        cells = []
        for size, _ in sizes:
            r = _find(rows, size, dtype, name)
            cells.append(f"{r['peak_mib']:.1f}" if r is not None and _ok(r["peak_mib"]) else "n/a")
        body.append([name, *cells])
    return _table(["contender", *(f"{label} (MiB)" for _, label in sizes)], body)


def _notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen = []
    for r in rows:
        if r.get("note"):
            line = f"- {r['contender']} ({r['size']}, {r['dtype']}): {r['note']}"
            if line not in seen:
                seen.append(line)
    return seen


def markdown(device: str, rows: Sequence[dict[str, Any]], lenet: Sequence[dict[str, Any]],
             env: dict[str, Any], plot_path: str | None) -> str:
    """The generated section for ``device`` (without the markers)."""
    title = "CPU" if device == "cpu" else "GPU"
    out = [(f"_Generated by `{env.get('command', 'python -m bench --' + device)}` on {env.get('date_utc', '?')}; "
            f"load average {env.get('loadavg_start', '?')} at the start, {env.get('loadavg_end', '?')} at the end"
            + (f"; threads: {env['threads_requested']}" if "threads_requested" in env else "") + "._"), ""]
    reps = sorted({int(r["repeats"]) for r in rows if _ok(r["repeats"]) and r["repeats"]})
    out += [(f"Time ratio to the floor of the same library (median over {'/'.join(map(str, reps)) or '?'} "
             "repetitions of the per-repetition ratio), median time per forward+backward in parentheses. "
             "`layer`: the last layer alone with a given upstream gradient; `loss`: cross-entropy loss "
             "forward+backward, gradients for X and W."), ""]
    for dtype in sorted({r["dtype"] for r in rows}, key=lambda t: t != "float32"):
        out += [f"#### {title}, {dtype}: time", "", *_timing_table(rows, dtype), ""]
        out += [f"#### {title}, {dtype}: peak memory of one forward+backward above its inputs", "",
                *_memory_table(rows, dtype), ""]
    if plot_path:
        out += [f"![time ratio to the floor against C, {title}]({plot_path})", ""]
    out += ["#### Goals", "", *_table(["goal", "target", "measured", "status"],
                                       [[g["goal"], g["target"], g["measured"], g["status"]] for g in goals(device, rows)]), ""]
    if lenet:
        out += [f"#### The seed's table: LeNet training throughput ({title}, float32, margin 4, beta 1)", ""]
        body = []
        for batch in sorted({int(r["batch"]) for r in lenet}):
            plain = next((r for r in lenet if int(r["batch"]) == batch and r["ratio_to_plain"] == 1.0), None)
            plain = plain or next(r for r in lenet if int(r["batch"]) == batch)
            lsm = [r for r in lenet if int(r["batch"]) == batch and r is not plain]
            for r in lsm:
                body.append([str(batch), f"{plain['samples_per_s']:.0f}", f"{r['samples_per_s']:.0f}",
                             f"{r['ratio_to_plain']:.3f}", f"{r['seed_ratio']:.3f}"])
        out += _table(["batch", "plain head (samples/s)", "L-Softmax head (samples/s)",
                       "L-Softmax / plain", "seed's ratio (GTX 1070, CUDA op)"], body)
        out.append("")
    notes = _notes(list(rows) + [dict(r, contender=r["head"], size=f"batch {r['batch']}", dtype="float32")
                                 for r in lenet])
    return _with_notes_and_machine(out, notes, env)


def _with_notes_and_machine(out: list[str], notes: list[str], env: dict[str, Any]) -> str:
    """A section's closing lines, shared by the layer and loss sections: the run's notes,
    then the machine and libraries it ran on."""
    if notes:
        out += ["Notes from the run:", "", *notes, ""]
    out += ["Machine and libraries:", ""]
    out += [f"- {k}: {v}" for k, v in sorted(env.items())]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plot


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Time ratio to the floor against C, one line per contender; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda t: t != "float32")
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        sizes = _sizes([r for r in rows if r["dtype"] == dtype])
        for i, name in enumerate(_contenders(rows)):
            pts = [(int(r["c"]), float(r["ratio_to_floor"])) for size, _ in sizes
                   if (r := _find(rows, size, dtype, name)) is not None and _ok(r["ratio_to_floor"])
                   and r["contender"] != r["floor"]]
            if pts:  # one colour per contender in every panel
                ax.plot(*zip(*pts), marker="o", label=name, color=f"C{i}")
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="floor (plain linear, same library)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ticks = [int(next(r for r in rows if r["size"] == size and r["dtype"] == dtype)["c"]) for size, _ in sizes]
        ax.set_xticks(ticks, [label.replace(" ", "\n", 1) for _, label in sizes][: len(ticks)])
        ax.set_xlabel("C (classes); size = N x D x C")
        ax.set_ylabel("time / floor time (forward+backward)")
        ax.set_title(f"{title}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- the doc


HOWTO = """\
One harness, `python -m bench`, measures both devices over one size table
(`SIZES` in `bench/contenders.py`: each size is marked for the devices it runs on, e.g.
512x512x100k on GPU only, 256x512x10k on CPU only) and writes one section per device
below. Run from the repository root (PyTorch, pytorch-metric-learning and matplotlib:
`pip install -e '.[bench]'`):

```bash
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench --cpu   # ~2-5 min on 2 cores
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench --cpu --threads 1   # on a shared machine
python -m bench --gpu                          # every GPU contender and LeNet (not yet timed on a GPU)
python -m bench --gpu --layer-only             # the CuPy backend against 3 cuBLAS GEMMs only (no PyTorch)
python -m bench --cpu --quick                  # < 1 min: checks the harness only, touches no file here
python -m bench --cpu --quick --sizes mnist    # one size of the table (names: mnist, cifar, face)
python -m bench.profile_cpu                    # where the NumPy backend's time goes beyond the GEMMs
python -m bench --cpu --loss                   # the fused cross-entropy comparison alone (11-20 min here)
python -m bench --cpu --loss --sizes ce-small  # its smaller size only (names: ce-small, ce-large)
python -m bench --cpu --overhead               # per-call overhead table, every CPU size, 1 thread and default (~1-2 min)
python -m bench.profile_overhead               # cProfile of one forward+backward per path (NumPy, PyTorch, JAX, CuPy host)
scripts/gpu_check.sh                           # on a GPU machine: GPU tests, then --gpu --layer-only and --gpu --overhead
PEER_BENCH=1 scripts/gpu_check.sh              # the same with the whole --gpu run (PyTorch, peers, LeNet)
LOSS_BENCH=1 scripts/gpu_check.sh              # the same with python -m bench --gpu --loss instead (8192x512x1M)
scripts/fetch_gpu_wheels.sh                    # beforehand, where PyPI is reachable: the peer's wheel into .whl/
```

Each run writes `bench/results/{cpu,gpu}.csv` (every contender at every size),
`{cpu,gpu}_lenet.csv` (the seed's LeNet table; empty with `--layer-only`),
`{cpu,gpu}_env.json` (machine, versions, threads, BLAS kernel, the command, date), the
plot `docs/bench/{cpu,gpu}_ratio.png` and its section below. With `--out DIR --no-doc`
the files, the plot and the section (`DEVICE.md`) go into DIR only (`--no-plot`: no
plot), which is how `scripts/gpu_check.sh` runs it on a remote GPU machine, into
`$OUT_DIR/bench`; `python -m bench --render gpu --from DIR` then copies that run's files
to `bench/results/` and puts its section and plot into this file. On a GPU machine
without pytorch-metric-learning, carry `.whl/` along: `gpu_check.sh` installs what it
finds there offline. On machines that set `OPENBLAS_CORETYPE` or `OPENBLAS_L2_SIZE` (a
workaround for old OpenBLAS builds), unset both for the benchmark command only, as
above: they select a slower kernel in a current NumPy. The run records the kernel that
actually ran (`numpy_blas` below, from threadpoolctl). `--loss` runs the fused
cross-entropy comparison instead (the sizes of the table's `loss` suite), into
`{cpu,gpu}_loss.csv`, `{cpu,gpu}_loss_env.json`, the plot `docs/bench/{cpu,gpu}_loss.png`
and its own section; `--render DEVICE --loss` renders its files.

Method (`bench/harness.py`, the same on both devices): the contenders of one comparison
(NumPy's pair, PyTorch's four on CPU; all of them on GPU) run in one process, warmed up
(kernels compiled, cuBLAS plans made), then round-robin with the order shuffled per
repetition; a sample is enough back-to-back calls to last about 20 ms (CPU) or 5 ms
(GPU, timed with CUDA events recorded after a device synchronisation), divided by the
number of calls, and includes the host-side Python of each call. Ratios are taken
against the plain linear layer of the same library (NumPy, CuPy/cuBLAS, PyTorch) within
each repetition, then the median over repetitions: a ratio survives a noisy, shared
machine far better than an absolute time. CPU memory is the peak resident set size above
the resident size just before one call (after a warm-up call), in a separate process
where glibc returns every freed block of 64 KiB or more to the OS, so NumPy, OpenBLAS and
PyTorch allocations all count; GPU memory is the allocator's own peak (PyTorch's
`max_memory_allocated`, a counting allocator over CuPy's pool), without library
workspaces. All contenders use margin 4 and beta 0 (pytorch-metric-learning has no
beta); LeNet uses margin 4, beta 1 as the seed did.
"""


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def update_doc(doc: Path, name: str, heading: str, body: str) -> None:
    """Replace the text between the ``name`` markers in ``doc``; add the section if it is missing.

    The file is read just before it is written, so edits made by others meanwhile stay.
    """
    begin, end = _markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    doc.write_text(text)


def publish(doc: Path | None, plot_dir: Path | None, device: str, rows: Sequence[dict[str, Any]],
            lenet: Sequence[dict[str, Any]], env: dict[str, Any], out_dir: Path | None = None) -> str:
    """Plot and markdown for ``device``; into ``doc`` when given, and ``DEVICE.md`` into ``out_dir``."""
    title = "CPU" if device == "cpu" else "GPU"
    plot_rel = None
    if plot_dir is not None:
        png = plot_dir / f"{device}_ratio.png"
        threads = f", {env['threads_requested']} thread(s)" if isinstance(env.get("threads_requested"), int) else ""
        if plot(rows, png, f"{title}{threads}: lsoftmax-core and peers vs a plain linear layer"):
            plot_rel = str(png.relative_to(doc.parent)) if doc is not None and png.is_relative_to(doc.parent) \
                else png.name
    text = markdown(device, rows, lenet, env, plot_rel)
    if out_dir is not None:
        (out_dir / f"{device}.md").write_text(text)
    if doc is not None:
        update_doc(doc, "howto", "## How to run", HOWTO)
        update_doc(doc, device, f"## {title} results", text)
    return text


# --------------------------------------------------------------------------- the fused cross-entropy (loss suite)

#: Row order of the loss tables: the floor, the unfused references, the peer, then the fused ones.
LOSS_ORDER = (TORCH_LINEAR, TORCH_ADAPTER, NP_UNFUSED, TORCH_PML, TORCH_FUSED, CP_FUSED_MISSING,
              *(f.name for lib in FUSED.values() for f in lib))
_FUSED_BY_NAME = {f.name: f for lib in FUSED.values() for f in lib}

#: The issue's goals for the fused loss, CPU float32 at (N, D, C): (what, contender, metric,
#: target text, test, format).  ``contender`` "default" is the core's fused loss at its
#: default settings (the chunking plan_chunks picks at the default budget), "rows" and
#: "classes" the same budget in that chunking.  Metrics: "mem" the peak memory over the
#: unfused loss's, "time" the time over the unfused loss's (ratios of the paired ratios
#: to the same floor), "pml" how many times faster than pytorch-metric-learning.
LOSS_GOAL_SHAPE = (2048, 256, 100_000)
LOSS_GOALS: dict[str, list[tuple[str, str, str, str, Callable[[float], bool], str]]] = {
    "cpu": [
        ("fused peak memory (default settings) vs unfused", "default", "mem", "<= 1/8",
         lambda v: v <= 1 / 8, "mem"),
        ("fused time, row chunks (3 GEMMs), default budget, vs unfused", "rows", "time", "<= 1.10x",
         lambda v: v <= 1.10, "{:.2f}x"),
        ("fused time, class chunks (4 GEMMs), default budget, vs unfused", "classes", "time", "<= 1.4x",
         lambda v: v <= 1.4, "{:.2f}x"),
        ("fused (default settings) vs pytorch-metric-learning", "default", "pml", ">= 3x faster",
         lambda v: v >= 3.0, "{:.2f}x faster"),
        ("torch lsoftmax_cross_entropy peak memory vs unfused", TORCH_FUSED, "mem", "<= 1/8",
         lambda v: v <= 1 / 8, "mem"),
        ("torch lsoftmax_cross_entropy time vs unfused", TORCH_FUSED, "time", "<= 1.10x",
         lambda v: v <= 1.10, "{:.2f}x"),
        ("torch lsoftmax_cross_entropy vs pytorch-metric-learning", TORCH_FUSED, "pml", ">= 3x faster",
         lambda v: v >= 3.0, "{:.2f}x faster"),
    ],
    "gpu": [],  # the issue sets none: the GPU rows are measured for the record
}


def _itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}.get(dtype, 4)


def default_budget_mib() -> int:
    from lsoftmax_core._loss_plan import DEFAULT_BUDGET

    return int(DEFAULT_BUDGET // 2**20)


def chunk_plan(n: int, c: int, dtype: str, chunking: str | None, budget_mib: int | None) -> tuple[str, int]:
    """(mode, chunk length) the core picks for an (N, C) problem: its own plan_chunks."""
    from lsoftmax_core._loss_plan import plan_chunks

    budget = (budget_mib or default_budget_mib()) * 2**20
    plan = plan_chunks(n, c, _itemsize(dtype), chunking=chunking, memory_budget=budget)
    return plan.mode, plan.size


def _default_fused(library: str, n: int, c: int, dtype: str) -> str:
    mode, _ = chunk_plan(n, c, dtype, None, None)
    return Fused(library, mode, default_budget_mib()).name


def _fused_library(rows: Sequence[dict[str, Any]]) -> str:
    libs = [r["library"] for r in rows if r["contender"] in _FUSED_BY_NAME]
    return libs[0] if libs else "numpy"


def _vs(r: dict[str, Any] | None, ref: dict[str, Any] | None, key: str) -> float:
    """r's time (key "time") or peak memory ("mem") over ref's; NaN when either is missing.

    Times: the ratio of the two paired ratios to the same floor (measured in the same
    repetitions), or of the median times when the floor has none (e.g. out of memory).
    """
    if r is None or ref is None:
        return math.nan
    if key == "mem":
        a, b = r["peak_mib"], ref["peak_mib"]
    elif _ok(r["ratio_to_floor"]) and _ok(ref["ratio_to_floor"]):
        a, b = r["ratio_to_floor"], ref["ratio_to_floor"]
    else:
        a, b = r["median_ms"], ref["median_ms"]
    return float(a) / float(b) if _ok(a) and _ok(b) and b else math.nan


def loss_goals(device: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fused loss's goals for ``device``: measured value and met / MISSED / not measured."""
    n, d, c = LOSS_GOAL_SHAPE
    at = [r for r in rows if (int(r.get("n", -1)), int(r.get("d", -1)), int(r.get("c", -1))) == (n, d, c)
          and r["dtype"] == "float32"]

    def row(name: str) -> dict[str, Any] | None:
        return next((r for r in at if r["contender"] == name and (_ok(r["median_ms"]) or _ok(r["peak_mib"]))), None)

    library = _fused_library(rows)
    unfused, pml = row(TORCH_ADAPTER), row(TORCH_PML)
    out = []
    for what, who, metric, target, test, fmt in LOSS_GOALS[device]:
        if who == "default":
            name = _default_fused(library, n, c, "float32")
        elif who in ("rows", "classes"):
            name = Fused(library, who, default_budget_mib()).name
        else:
            name = who
        r = row(name)
        if metric == "mem":
            value = _vs(r, unfused, "mem")
        elif metric == "time":
            value = _vs(r, unfused, "time")
        else:
            value = _vs(pml, r, "time")
        if _ok(value) and metric == "mem":
            assert r is not None and unfused is not None
            text = f"1/{1 / value:.1f} ({r['peak_mib']:.0f} vs {unfused['peak_mib']:.0f} MiB)"
        else:
            text = fmt.format(value) if _ok(value) else UNMEASURED
        label = name if who in ("default", "rows", "classes") else who
        out.append({"goal": f"{what}, {Size('', n, d, c).dims} float32", "contender": label, "target": target,
                    "measured": text, "status": ("met" if test(value) else "MISSED") if _ok(value) else "not measured"})
    return out


def _loss_contenders(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["contender"] for r in rows}
    return [c for c in LOSS_ORDER if c in present] + sorted(present - set(LOSS_ORDER))


def _fmt_ratio(v: float, unit: str = "x") -> str:
    return f"{v:.2f}{unit}" if _ok(v) else "n/a"


def _loss_size_table(rows: Sequence[dict[str, Any]], size: str, dtype: str) -> list[str]:
    here = [r for r in rows if r["size"] == size and r["dtype"] == dtype]
    if not here:
        return []
    n, c = int(here[0]["n"]), int(here[0]["c"])
    default = _default_fused(_fused_library(rows), n, c, dtype)
    unfused = _find(here, size, dtype, TORCH_ADAPTER)
    body = []
    for name in _loss_contenders(here):
        r = _find(here, size, dtype, name)
        assert r is not None
        label = f"**{name}** (default)" if name == default else name
        if not _ok(r["median_ms"]):
            body.append([label, "skipped", "", "", _mib(r), ""])
            continue
        floor = "**1**" if r["contender"] == r["floor"] else _fmt_ratio(r["ratio_to_floor"])
        body.append([label, f"{r['median_ms']:.4g} ms", floor, _fmt_ratio(_vs(r, unfused, "time")), _mib(r),
                     _fmt_ratio(_vs(r, unfused, "mem"))])
    return _table(["contender", "median time", "time / floor", "time / unfused", "peak MiB above inputs",
                   "memory / unfused"], body)


def _mib(r: dict[str, Any]) -> str:
    return f"{r['peak_mib']:.0f}" if _ok(r["peak_mib"]) else "n/a"


def _sweep_table(rows: Sequence[dict[str, Any]], size: str, dtype: str) -> list[str]:
    """The fused loss at each budget, both chunkings: chunk length, time and memory over the unfused loss."""
    here = [r for r in rows if r["size"] == size and r["dtype"] == dtype]
    settings = [f for f in FUSED.get(_fused_library(rows), ()) if _find(here, size, dtype, f.name) is not None]
    if not here or not settings:
        return []
    n, c = int(here[0]["n"]), int(here[0]["c"])
    unfused = _find(here, size, dtype, TORCH_ADAPTER)
    modes = [m for m in ("rows", "classes") if any(f.chunking == m for f in settings)]
    header = ["budget"]
    for m in modes:
        header += [f"{m}: chunk", f"{m}: time / unfused", f"{m}: peak MiB"]
    body = []
    for budget in sorted({f.budget_mib for f in settings}):
        cells = [f"{budget} MiB" + (" (default)" if budget == default_budget_mib() else "")]
        for m in modes:
            r = _find(here, size, dtype, Fused(settings[0].library, m, budget).name)
            if r is None:
                cells += ["not run", "", ""]
                continue
            _, length = chunk_plan(n, c, dtype, m, budget)
            count = math.ceil((n if m == "rows" else c) / length)
            cells += [f"{length} {m} x {count}", _fmt_ratio(_vs(r, unfused, "time")), _mib(r)]
        body.append(cells)
    return _table(header, body)


def loss_markdown(device: str, rows: Sequence[dict[str, Any]], env: dict[str, Any], plot_path: str | None) -> str:
    """The generated section of the fused cross-entropy comparison for ``device`` (without the markers)."""
    title = "CPU" if device == "cpu" else "GPU"
    out = [(f"_Generated by `{env.get('command', 'python -m bench --' + device + ' --loss')}` on "
            f"{env.get('date_utc', '?')}; load average {env.get('loadavg_start', '?')} at the start, "
            f"{env.get('loadavg_end', '?')} at the end"
            + (f"; threads: {env['threads_requested']}" if "threads_requested" in env else "") + "._"), ""]
    reps = sorted({int(r["repeats"]) for r in rows if _ok(r["repeats"]) and r["repeats"]})
    out += [("Forward + backward of the whole mean L-Softmax cross-entropy (margin 4, beta 0), gradients "
             "for X and W. Time: median per call over "
             f"{'/'.join(map(str, reps)) or '?'} repetitions; `time / floor` is the median of the "
             "per-repetition ratios to `torch linear + CE` (no margin), `time / unfused` the ratio of "
             "two such ratios, against `lsoftmax-core torch adapter + CE` = "
             "`F.cross_entropy(lsoftmax(x, w, y), y)`. Memory: peak above the inputs of one call "
             + ("(resident set, in a separate process)" if device == "cpu" else "(the allocator's peak)")
             + "; outputs count (grad_w alone is C x D). The fused rows marked (default) are the core's "
               "defaults at that size."), ""]
    sizes = _sizes(rows)
    for dtype in sorted({r["dtype"] for r in rows}, key=lambda t: t != "float32"):
        for size, label in sizes:
            table = _loss_size_table(rows, size, dtype)
            if not table:
                continue
            out += [f"#### {title}, {dtype}, {label}", "", *table, ""]
            sweep = _sweep_table(rows, size, dtype)
            if sweep:
                out += [f"Memory budget sweep, {label} {dtype} (chunk: length x number of chunks):", "",
                        *sweep, ""]
    if plot_path:
        out += [f"![fused cross-entropy: time against peak memory, {title}]({plot_path})", ""]
    goal_rows = loss_goals(device, rows)
    out += ["#### Goals of the fused loss", ""]
    if goal_rows:
        out += _table(["goal", "contender", "target", "measured", "status"],
                      [[g["goal"], g["contender"], g["target"], g["measured"], g["status"]] for g in goal_rows])
    else:
        out.append(f"No goal is set for the fused loss on {title}: its rows are measured for the record.")
    out.append("")
    notes = _notes(rows)
    return _with_notes_and_machine(out, notes, env)


def loss_plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Time over the unfused loss against peak memory, one panel per size and dtype; the
    fused settings joined by chunking across budgets.  False if matplotlib is missing or
    nothing has both figures."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    panels = [(size, label, dtype) for dtype in sorted({r["dtype"] for r in rows}, key=lambda t: t != "float32")
              for size, label in _sizes(rows)
              if any(r["size"] == size and r["dtype"] == dtype for r in rows)]
    points: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for size, _, dtype in panels:
        here = [r for r in rows if r["size"] == size and r["dtype"] == dtype]
        unfused = _find(here, size, dtype, TORCH_ADAPTER)
        pts = []
        for name in _loss_contenders(here):
            r = _find(here, size, dtype, name)
            t = _vs(r, unfused, "time")
            if r is not None and _ok(t) and _ok(r["peak_mib"]):
                pts.append((name, max(float(r["peak_mib"]), 0.1), t))  # a log axis: below 0.1 MiB at 0.1
        points[(size, dtype)] = pts
    panels = [p for p in panels if points[(p[0], p[2])]]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    colours = {name: f"C{i}" for i, name in enumerate(n for n in LOSS_ORDER if n not in _FUSED_BY_NAME)}
    for ax, (size, label, dtype) in zip(axes[0], panels):
        pts = points[(size, dtype)]
        for mode, marker in (("rows", "o"), ("classes", "s")):
            line = sorted(((_FUSED_BY_NAME[n].budget_mib, m, t) for n, m, t in pts
                           if n in _FUSED_BY_NAME and _FUSED_BY_NAME[n].chunking == mode))
            if line:
                ax.plot([m for _, m, _ in line], [t for _, _, t in line], marker=marker, color="C9" if mode == "rows"
                        else "C8", label=f"fused, {mode} (budget {'/'.join(str(b) for b, _, _ in line)} MiB)")
                for b, m, t in line:
                    ax.annotate(f"{b}", (m, t), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for name, m, t in pts:
            if name not in _FUSED_BY_NAME:
                ax.plot([m], [t], marker="D", linestyle="none", color=colours.get(name, "C7"), label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="unfused (torch adapter + CE)")
        ax.set_xlabel("peak memory above the inputs (MiB)")
        ax.set_ylabel("time / unfused time (forward+backward)")
        ax.set_title(f"{title}, {label} {dtype}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def publish_loss(doc: Path | None, plot_dir: Path | None, device: str, rows: Sequence[dict[str, Any]],
                 env: dict[str, Any], out_dir: Path | None = None) -> str:
    """Plot and markdown of the loss suite; into ``doc`` (section ``DEVICE-loss``) when given,
    ``DEVICE_loss.md`` into ``out_dir``."""
    title = "CPU" if device == "cpu" else "GPU"
    plot_rel = None
    if plot_dir is not None:
        png = plot_dir / f"{device}_loss.png"
        threads = f", {env['threads_requested']} thread(s)" if isinstance(env.get("threads_requested"), int) else ""
        if loss_plot(rows, png, f"{title}{threads}: fused L-Softmax CE"):
            plot_rel = str(png.relative_to(doc.parent)) if doc is not None and png.is_relative_to(doc.parent) \
                else png.name
    text = loss_markdown(device, rows, env, plot_rel)
    if out_dir is not None:
        (out_dir / f"{device}_loss.md").write_text(text)
    if doc is not None:
        update_doc(doc, "howto", "## How to run", HOWTO)
        update_doc(doc, f"{device}-loss", f"## {title} results: fused cross-entropy", text)
    return text
