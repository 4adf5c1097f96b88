"""Command line of the benchmarks: ``python -m bench [SUITE ...] [--gpu] [options]``."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import suites
from .harness import environment
from .record import REPO, Options, publish, render
from .sizes import SIZES, Size, sizes_for

__all__ = ["main"]

DEFAULT_SUITES = ("layer", "lenet")


def _texts(value: str) -> tuple[str, ...]:
    return tuple(t for t in value.split(",") if t)


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {s.name:22s} {s.title} ({', '.join(s.devices)})" for s in suites().values())
    p = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time lsoftmax-core against its floors and peers; write DEVICE_SUITE.csv, _env.json and .md "
                    "per suite into bench/results (see docs/BENCHMARKS.md).",
        epilog=f"suites:\n{listing}\n\nWithout a suite: {' and '.join(DEFAULT_SUITES)}.")
    p.add_argument("suites", nargs="*", metavar="SUITE", help="suites to run, in order (see below)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="run on the CPU (the default)")
    where.add_argument("--gpu", action="store_true", help="run on CUDA (PyTorch, CuPy)")
    p.add_argument("--sizes", type=_texts, default=None, metavar="NAME[,NAME]",
                   help="these sizes of the suite's table instead of its default ones (e.g. ce-1m on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU: cap NumPy's BLAS and PyTorch at this many threads")
    p.add_argument("--repeat", type=int, default=None, help="repetitions per contender (default: the suite's)")
    p.add_argument("--exclude", type=_texts, default=(), metavar="TEXT[,TEXT]",
                   help="leave out the contenders whose name contains one of these texts ('torch': the layer "
                        "suite's backend pair alone, PyTorch not imported)")
    p.add_argument("--quick", action="store_true",
                   help="2 repetitions, short samples, into a temporary folder unless --out: checks the harness")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    p.add_argument("--dry-run", action="store_true", help="print what would run and where it would go; measure nothing")
    p.add_argument("--render", type=Path, default=None, metavar="DIR",
                   help="only regenerate the markdown of every run in DIR from its CSV and env files")
    return p


def _sizes(device: str, tables: str, names: Sequence[str] | None) -> tuple[Size, ...]:
    """The sizes of a suite's ``table``: one table (:func:`bench.sizes.sizes_for`), or several in
    order, each with its default sizes or only those named after a colon (the margins suite's
    ``"layer:face,loss"``: the layer table's face size, then the loss table's defaults);
    ``--sizes`` may name any size of any of them."""
    parts = [p.partition(":") for p in tables.split(",")]
    if names is None:
        return sum((sizes_for(device, t, picks.split("+") if picks else None) for t, _, picks in parts), ())
    if len(parts) == 1:
        return sizes_for(device, parts[0][0], names)
    known = [s for t, _, _ in parts for s in SIZES if device in s.devices and s.table == t]
    unknown = sorted(set(names) - {s.name for s in known})
    if unknown:
        raise ValueError(f"no size {', '.join(unknown)} for the {' or '.join(t for t, _, _ in parts)} tables on "
                         f"{device}; known: {', '.join(s.name for s in known)}")
    return tuple(s for s in known if s.name in names)


def _gpu_missing(exclude: Sequence[str]) -> str | None:
    """Why nothing can be measured on GPU here, or None."""
    try:
        if "torch" in exclude:
            import cupy

            return None if cupy.cuda.runtime.getDeviceCount() > 0 else "CuPy sees no CUDA device"
        import torch

        return None if torch.cuda.is_available() else "PyTorch sees no CUDA device"
    except Exception as e:  # noqa: BLE001 - no library, no driver
        return f"{type(e).__name__}: {e}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    table = suites()
    if args.render is not None:
        for md in render(args.render, table):
            print(f"rendered {md}")
        return 0
    device = "gpu" if args.gpu else "cpu"
    names = args.suites or list(DEFAULT_SUITES)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown suite {', '.join(unknown)}; known: {', '.join(table)}")
    plans = []
    for name in names:
        suite = table[name]
        if device not in suite.devices:
            parser.error(f"the {name} suite runs on {', '.join(suite.devices)} only")
        try:
            sizes = _sizes(device, suite.table, args.sizes) if suite.table else ()
        except ValueError as e:
            parser.error(str(e))
        repeat, warmup, min_time = (2, 1, 0.001) if args.quick else suite.settings[device]
        plans.append((suite, Options(device, args.repeat or repeat, warmup, min_time, sizes, args.threads,
                                     tuple(args.exclude))))
    out = args.out or (Path(tempfile.mkdtemp(prefix="lsoftmax-bench-")) if args.quick else REPO / "bench" / "results")
    if args.dry_run:
        for suite, opts in plans:
            print(f"{suite.name} on {device}: sizes {', '.join(f'{s.name} {s.dims}' for s in opts.sizes) or '-'}; "
                  f"{opts.repeat} repetitions; threads {opts.threads or 'default'}; exclude "
                  f"{','.join(opts.exclude) or '-'} -> {out / f'{device}_{suite.name}'}.{{csv,md}}, _env.json")
        return 0
    if device == "gpu" and (why := _gpu_missing(args.exclude)):
        raise SystemExit(f"no usable GPU ({why}): nothing to measure")
    if "torch" not in args.exclude:
        try:
            import torch  # noqa: F401 - imported first: threads() caps its pool, the environment lists it
        except ImportError:
            pass
    command = " ".join(["python -m bench", *(a for a in argv if not a.startswith("--out") and a != str(args.out))])
    for suite, opts in plans:
        env = dict(environment(gpu=device == "gpu"), command=command, threads_requested=opts.threads or "default")
        rows: list[dict[str, object]] = []
        try:
            for batch in suite.run(opts):
                rows += batch
                publish(suite, device, rows, env, out)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        print(f"{suite.name}: {out / f'{device}_{suite.name}'}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
