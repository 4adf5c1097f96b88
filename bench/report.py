"""CSV files, the goals, the markdown section and the plot written into docs/BENCHMARKS.md.

The generated parts of docs/BENCHMARKS.md sit between ``<!-- bench:NAME:begin -->`` and
``<!-- bench:NAME:end -->`` markers (NAME = howto, cpu, gpu); :func:`update_doc` re-reads
the file and replaces only what lies between one pair, so other sections of the file
(another author's, hand-written notes) are never touched.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .contenders import (
    CP_LINEAR,
    CP_LSM,
    NP_LINEAR,
    NP_LSM,
    TORCH_ADAPTER,
    TORCH_LINEAR,
    TORCH_NAIVE,
    TORCH_PML,
)

__all__ = [
    "COLUMNS",
    "LENET_COLUMNS",
    "goals",
    "markdown",
    "plot",
    "publish",
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


def goals(device: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals for ``device`` with the measured value and met / MISSED / not measured.

    "x times faster than pytorch-metric-learning" is the ratio of the two ratios to the
    same floor, i.e. of two times measured in the same repetitions.
    """
    def ratio(size: str, contender: str) -> float:
        r = _find(rows, size, "float32", contender)
        return float(r["ratio_to_floor"]) if r and _ok(r["ratio_to_floor"]) else math.nan

    def speedup(size: str) -> float:
        return ratio(size, TORCH_PML) / ratio(size, TORCH_ADAPTER)

    if device == "cpu":
        spec = [
            ("NumPy backend fwd+bwd vs NumPy linear, 256x512x10k float32", "<= 1.05x",
             ratio("face", NP_LSM), lambda v: v <= 1.05, "{:.3f}x"),
            ("torch adapter + CE vs pytorch-metric-learning, 256x512x10k float32", ">= 3x faster",
             speedup("face"), lambda v: v >= 3.0, "{:.2f}x faster"),
        ]
    else:
        spec = [
            ("CuPy backend fwd+bwd vs 3 cuBLAS GEMMs, 512x512x100k float32", "<= 1.03x",
             ratio("face", CP_LSM), lambda v: v <= 1.03, "{:.3f}x"),
            ("CuPy backend fwd+bwd vs 3 cuBLAS GEMMs, 256x2x10 float32", "<= 1.5x",
             ratio("mnist", CP_LSM), lambda v: v <= 1.5, "{:.3f}x"),
            ("torch adapter + CE vs pytorch-metric-learning, 512x512x100k float32", ">= 3x faster",
             speedup("face"), lambda v: v >= 3.0, "{:.2f}x faster"),
        ]
    out = []
    for name, target, value, test, fmt in spec:
        measured = _ok(value)
        out.append({"goal": name, "target": target, "measured": fmt.format(value) if measured else UNMEASURED,
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
        c = int(r["c"])
        cs = f"{c // 1000}k" if c >= 1000 and c % 1000 == 0 else str(c)
        seen.setdefault(r["size"], f"{r['size']} {r['n']}x{r['d']}x{cs}")
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
        ticks = [int(r["c"]) for size, _ in sizes if (r := _find(rows, size, dtype, NP_LINEAR) or
                                                      _find(rows, size, dtype, TORCH_LINEAR)) is not None]
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
Run from the repository root (PyTorch, pytorch-metric-learning and matplotlib: `pip install -e '.[bench]'`):

```bash
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench --cpu   # ~2-5 min on 2 cores
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench --cpu --threads 1   # on a shared machine
python -m bench --gpu                          # ~1-3 min; PEER_BENCH=1 scripts/gpu_check.sh runs it
python -m bench --cpu --quick                  # < 1 min: checks the harness only, touches no file here
python -m bench.profile_cpu                    # where the NumPy backend's time goes beyond the GEMMs
```

Each run writes `bench/results/{cpu,gpu}.csv` (every contender at every size),
`{cpu,gpu}_lenet.csv` (the seed's LeNet table), `{cpu,gpu}_env.json` (machine, versions,
threads, BLAS kernel, date), the plot `docs/bench/{cpu,gpu}_ratio.png` and its section
below. `python -m bench --gpu --out DIR --no-doc` writes the files into DIR only (for a
remote GPU machine); `python -m bench --render gpu --from DIR` then copies that run's files to `bench/results/` and puts its
section and plot into this file. On machines that set `OPENBLAS_CORETYPE` or
`OPENBLAS_L2_SIZE` (a workaround for old OpenBLAS builds), unset both for the benchmark
command only, as above: they select a slower kernel in a current NumPy. The run records
the kernel that actually ran (`numpy_blas` below, from threadpoolctl).

Method: the contenders of one comparison (NumPy's pair, PyTorch's four on CPU; all of
them on GPU) run in one process, warmed up, then round-robin with the order shuffled per
repetition; a sample is enough back-to-back calls to last about
20 ms (CPU) or 5 ms (GPU, timed with CUDA events after a synchronisation). Ratios are
taken against the plain linear layer of the same library (NumPy, CuPy/cuBLAS, PyTorch)
within each repetition, then the median over repetitions: a ratio survives a noisy,
shared machine far better than an absolute time. CPU memory is the peak resident set
size above the resident size just before one call (after a warm-up call), in a separate
process where glibc returns every freed block of 64 KiB or more to the OS, so NumPy,
OpenBLAS and PyTorch allocations all count; GPU memory is the allocator's own peak
(PyTorch's `max_memory_allocated`, a counting allocator over CuPy's pool), without
library workspaces. All contenders use margin 4 and beta 0 (pytorch-metric-learning has
no beta); LeNet uses margin 4, beta 1 as the seed did.
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
