"""CPU peak memory of each contender, run in its own process by :func:`bench.runner.cpu_memory`.

Started with ``MALLOC_MMAP_THRESHOLD_=65536``: a fixed threshold turns off glibc's
dynamic one, so every block of 64 KiB or more is mmapped and unmapped when freed, and
the resident size just before a call no longer holds the previous call's freed blocks.
The peak RSS above that (``bench.harness.peak_rss_delta``) is then what one
forward+backward needs on top of its inputs: outputs, gradients and temporaries, from
NumPy, BLAS and PyTorch alike.  Prints one JSON object per line.

    python -m bench.memprobe [--layer-only | --loss[=EXCLUDE,...]] SIZE_NAME N D C DTYPE [SIZE_NAME N D C DTYPE ...]

``--layer-only``: the NumPy pair alone (PyTorch is not imported).  ``--loss``: the fused
cross-entropy comparison (:func:`bench.contenders.loss_cases`, the loss suite's sizes),
``--loss=TEXT,...`` without the contenders whose name contains one of the texts.
"""

from __future__ import annotations

import json
import sys

from .contenders import Size, loss_cases, numpy_cases, torch_cases
from .harness import peak_rss_delta

__all__ = ["main"]


def main(argv: list[str]) -> int:
    layer_only = bool(argv) and argv[0] == "--layer-only"
    loss = bool(argv) and (argv[0] == "--loss" or argv[0].startswith("--loss="))
    exclude = [t for t in argv[0].partition("=")[2].split(",") if t] if loss else []
    argv = argv[1:] if layer_only or loss else argv
    if len(argv) % 5:
        raise SystemExit("usage: python -m bench.memprobe [--layer-only | --loss] SIZE_NAME N D C DTYPE [...]")
    for i in range(0, len(argv), 5):
        name, n, d, c, dtype = argv[i:i + 5]
        size = Size(name, int(n), int(d), int(c), suite="loss" if loss else "main")
        if loss:
            cases = loss_cases(size, dtype, "cpu", exclude=exclude)
        else:
            cases = numpy_cases(size, dtype) + ([] if layer_only else torch_cases(size, dtype, "cpu"))
        for case in cases:
            try:
                case.run()  # warm-up: one-time initialisation is not the layer's memory
                peak = peak_rss_delta(case.run)
            except Exception:  # noqa: BLE001 - the timing table carries the error
                peak = float("nan")
            print(json.dumps({"size": name, "dtype": dtype, "contender": case.name, "peak_mib": peak}), flush=True)
        del case, cases
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
