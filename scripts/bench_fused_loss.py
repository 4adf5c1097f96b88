"""Time and peak memory of the NumPy fused loss's default plan against the floor of any exact
forward+backward, its three GEMMs, at one size (default 2048x256x100k float32).

    python scripts/bench_fused_loss.py [--threads 1 2] [--repeat 5] [--old COMMIT] [N D C]

Contenders, interleaved in one process (each repetition runs every contender once, in turn,
so that a change of the machine's load hits them alike): ``gemms`` (x·W_Kᵀ, G·W_K into
grad_x, G_Kᵀ·x in 64 MiB class chunks, the floor), ``default`` (cross_entropy_with_grad with
no options), ``rows@256MiB``, ``classes`` (class chunks at the default budget), and with ``--old`` the default of the fused loss as it was at
that commit (its _numpy_loss.py and _loss_plan.py imported from ``git show``, on today's
backend).  Reports each contender's median time and the median, min and max of its
per-repetition ratio to the floor.  Then each contender's peak RSS above its inputs, each in
a fresh process started with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the OS,
so the resident size before the call holds no earlier call's memory).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ is not installed: it runs from the repository root

from bench.loss import three_gemms  # noqa: E402


def _old_loss(commit: str):
    """The fused loss of ``commit`` as a package in a temporary directory, on today's backend."""
    root = pathlib.Path(tempfile.mkdtemp()) / "oldloss"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name in ("_numpy_loss", "_loss_plan"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:lsoftmax_core/{name}.py"], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        src = src.replace("from ._loss_plan", "from oldloss._loss_plan").replace("from .", "from lsoftmax_core.")
        (root / f"{name}.py").write_text(src)
    sys.path.insert(0, str(root.parent))
    from oldloss import _numpy_loss  # type: ignore[import-not-found]

    return _numpy_loss


def contenders(n: int, d: int, c: int, old: str | None) -> dict[str, object]:
    import lsoftmax_core as lsm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((c, d), dtype=np.float32) * np.float32(0.05)
    label = rng.integers(0, c, n)
    cases: dict[str, object] = {
        "gemms": three_gemms(np, x, w),  # the loss suite's floor, 64 MiB class chunks
        "default": lambda: lsm.cross_entropy_with_grad(x, w, label, margin=2),
        "rows@256MiB": lambda: lsm.cross_entropy_with_grad(x, w, label, margin=2, chunking="rows",
                                                           memory_budget=256 << 20),
        "classes": lambda: lsm.cross_entropy_with_grad(x, w, label, margin=2, chunking="classes"),
    }  # fmt: skip
    if old:
        mod = _old_loss(old)
        cases[f"default@{old}"] = lambda: mod.cross_entropy_with_grad(x, w, label, margin=2, beta=0.0)
    return cases


def _peak(name: str, n: int, d: int, c: int, old: str | None, threads: int) -> float:
    """Run in a child: warm-up call, then the peak RSS above the current one during a call."""
    from threadpoolctl import threadpool_limits

    run = contenders(n, d, c, old)[name]
    with threadpool_limits(threads):
        run()  # one-time initialisation is not the call's memory
        rss = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        result = run()  # type: ignore[operator]
        peak = _status_kib("VmHWM")
        del result
    return (peak - rss) / 1024.0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("size", nargs="*", type=int, default=[2048, 256, 100_000])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--old", default=None, help="also the default plan of this commit's fused loss")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--peak", default=None, help=argparse.SUPPRESS)  # child process: one contender's peak
    args = ap.parse_args()
    n, d, c = args.size
    if args.peak:
        print(_peak(args.peak, n, d, c, args.old, args.threads[0]))
        return
    from threadpoolctl import threadpool_limits

    cases = contenders(n, d, c, args.old)
    print(f"{n}x{d}x{c} float32, load average {os.getloadavg()[0]:.2f} at start")
    for threads in args.threads:
        times: dict[str, list[float]] = {k: [] for k in cases}
        with threadpool_limits(threads):
            for fn in cases.values():
                fn()  # type: ignore[operator]
            for _ in range(args.repeat):
                for name, fn in cases.items():
                    t = time.perf_counter()
                    fn()  # type: ignore[operator]
                    times[name].append(time.perf_counter() - t)
        floor = np.array(times["gemms"])
        print(f"\n{threads} thread(s), {args.repeat} interleaved repetitions, load {os.getloadavg()[0]:.2f} at end")
        print(f"{'contender':24s} {'median s':>9s} {'ratio':>6s} {'min':>6s} {'max':>6s}")
        for name, t in times.items():
            r = np.array(t) / floor
            print(f"{name:24s} {np.median(t):9.3f} {np.median(r):6.3f} {r.min():6.3f} {r.max():6.3f}")
    if args.no_memory:
        return
    print("\npeak RSS above the inputs (MiB), one fresh process each, 1 thread")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for name in cases:
        cmd = [sys.executable, __file__, str(n), str(d), str(c), "--threads", "1", "--peak", name]
        cmd += ["--old", args.old] if args.old else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip()
        print(f"{name:24s} {float(out):9.1f}")


if __name__ == "__main__":
    main()
