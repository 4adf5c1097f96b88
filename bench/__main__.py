"""Command line: ``python -m bench --cpu | --gpu | --render DEVICE [--loss]`` (see docs/BENCHMARKS.md).

One harness for both devices: the sizes come from the one table
(:data:`bench.contenders.SIZES`), the timing from :mod:`bench.harness`, the files and the
doc section from :mod:`bench.report`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import report
from .contenders import sizes_for
from .runner import CPU_FULL, CPU_LOSS, GPU_FULL, GPU_LOSS, REPO, Settings, run_cpu, run_gpu, run_loss

__all__ = ["main"]

QUICK = Settings(repeat=2, warmup=1, min_time=0.001, lenet_batches=(128,))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--cpu", action="store_true", help="CPU run (about 3-5 minutes on 2 cores)")
    what.add_argument("--gpu", action="store_true", help="GPU run (every contender and LeNet; not yet timed on a GPU)")
    what.add_argument("--render", choices=("cpu", "gpu"),
                      help="only rebuild the doc section and plot from a run's files (--from), copying them to --out")
    p.add_argument("--from", dest="source", type=Path, default=None,
                   help="with --render: the folder holding DEVICE.csv, DEVICE_lenet.csv, DEVICE_env.json")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the CSV/JSON files (default bench/results; a temporary one with --quick)")
    p.add_argument("--no-doc", action="store_true",
                   help="do not touch docs/: the plot and a markdown fragment go into --out instead")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot (fewer files in --out)")
    p.add_argument("--layer-only", action="store_true",
                   help="only the backend against its linear floor (NumPy on CPU, CuPy vs cuBLAS on GPU): "
                        "no PyTorch contender, no LeNet; what scripts/gpu_check.sh runs")
    p.add_argument("--loss", action="store_true",
                   help="the fused cross-entropy comparison alone (the sizes of the table's loss suite: "
                        "the core's fused loss in both chunkings at 16/64/256 MiB, unfused, floor, "
                        "pytorch-metric-learning), into DEVICE_loss.* and its own section; with --render, "
                        "render that run's files")
    p.add_argument("--overhead", action="store_true",
                   help="the per-call overhead table alone (bench/overhead.py): CPU, every size at one thread and "
                        "at the default (or --threads), NumPy backend against the three GEMMs and a NumPy "
                        "linear + softmax-CE step, the torch adapter against torch's linear + CE; GPU, the "
                        "CuPy backend's host time per forward+backward at 256x2x10; into DEVICE_overhead.* and "
                        "its own section; with --render, render that run's files")
    p.add_argument("--exclude", type=lambda v: [s for s in v.split(",") if s], default=None, metavar="TEXT[,TEXT]",
                   help="with --loss: leave out the contenders whose name contains one of these texts "
                        "(e.g. 'lsoftmax_cross_entropy' for an op still being written); the floor and the "
                        "unfused loss cannot be left out")
    p.add_argument("--sizes", type=lambda v: [s for s in v.split(",") if s], default=None, metavar="NAME[,NAME]",
                   help="only these sizes of the device's table (default: all of them; of the loss suite with --loss)")
    p.add_argument("--quick", action="store_true",
                   help="2 repetitions, LeNet at batch 128 only: checks the harness; implies --no-doc")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: cap NumPy's BLAS and PyTorch at this many threads (default: one per core)")
    p.add_argument("--repeat", type=int, default=None, help="repetitions per contender (default 15 CPU, 30 GPU)")
    return p


def _without_out(argv: Sequence[str]) -> list[str]:
    """The arguments without ``--out DIR``: the command recorded in the results names no local folder."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    argv_used = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv_used)
    if args.loss and args.layer_only:
        parser.error("--loss and --layer-only are two different comparisons: choose one")
    if args.overhead and (args.loss or args.layer_only):
        parser.error("--overhead is its own comparison: not with --loss or --layer-only")
    if args.exclude and not args.loss:
        parser.error("--exclude applies to --loss only")
    no_doc = args.no_doc or args.quick
    out = args.out or (Path(tempfile.mkdtemp(prefix="lsoftmax-bench-")) if args.quick else REPO / "bench" / "results")
    doc = None if no_doc else REPO / "docs" / "BENCHMARKS.md"
    plot_dir = out if no_doc else REPO / "docs" / "bench"
    if args.render and args.overhead:
        from .overhead import render

        render(args.render, args.source or out, doc, out)
        print(f"rendered {args.render} --overhead from {args.source or out}" + ("" if doc is None else f" into {doc}"))
        return 0
    if args.render and args.loss:
        device, source = args.render, args.source or out
        names = (f"{device}_loss.csv", f"{device}_loss_env.json")
        if source.resolve() != out.resolve():
            out.mkdir(parents=True, exist_ok=True)
            for name in names:
                shutil.copyfile(source / name, out / name)
        rows = report.read_csv(out / names[0])
        env = json.loads((out / names[1]).read_text())
        report.publish_loss(doc, None if args.no_plot else plot_dir, device, rows, env, out if doc is None else None)
        print(f"rendered {device} --loss from {source}" + ("" if doc is None else f" into {doc}"))
        return 0
    if args.render:
        device, source = args.render, args.source or out
        names = (f"{device}.csv", f"{device}_lenet.csv", f"{device}_env.json")
        if source.resolve() != out.resolve():
            out.mkdir(parents=True, exist_ok=True)
            for name in names:
                shutil.copyfile(source / name, out / name)
        rows = report.read_csv(out / names[0])
        lenet = report.read_csv(out / names[1])
        env = json.loads((out / names[2]).read_text())
        report.publish(doc, None if args.no_plot else plot_dir, device, rows, lenet, env,
                       out if doc is None else None)
        print(f"rendered {device} from {source}" + ("" if doc is None else f" into {doc}"))
        return 0
    device = "cpu" if args.cpu else "gpu"
    try:
        sizes = sizes_for(device, args.sizes, suite="loss" if args.loss else "main")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.loss:
        full = CPU_LOSS if args.cpu else GPU_LOSS
    else:
        full = CPU_FULL if args.cpu else GPU_FULL
    settings = QUICK if args.quick else full
    if args.repeat is not None:
        settings = Settings(args.repeat, settings.warmup, settings.min_time, settings.lenet_batches)
    command = " ".join(["python -m bench", *_without_out(argv_used)])
    if args.no_plot:
        plot_dir = None
    if args.overhead:
        from .overhead import run_overhead

        run_overhead(device, settings, out_dir=out, doc=doc, sizes=None if args.sizes is None else sizes,
                     threads=args.threads if args.cpu else None, command=command)
        print(f"results in {out}" + ("" if doc is None else f"; section in {doc}"))
        return 0
    if args.loss:
        try:
            run_loss(device, settings, out_dir=out, doc=doc, plot_dir=plot_dir, sizes=sizes,
                     threads=args.threads if args.cpu else None, command=command, exclude=args.exclude or ())
        except ValueError as e:
            raise SystemExit(str(e)) from None
    elif args.cpu:
        run_cpu(settings, out_dir=out, doc=doc, plot_dir=plot_dir, sizes=sizes, threads=args.threads,
                layer_only=args.layer_only, command=command)
    else:
        run_gpu(settings, out_dir=out, doc=doc, plot_dir=plot_dir, sizes=sizes, layer_only=args.layer_only,
                command=command)
    print(f"results in {out}" + ("" if doc is None else f"; section and plot in {doc}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
