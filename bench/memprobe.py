"""CPU peak memory of each contender of a timed suite, in its own process (:func:`bench.record.cpu_memory`).

Started with ``MALLOC_MMAP_THRESHOLD_=65536``: a fixed threshold turns off glibc's dynamic
one, so every block of 64 KiB or more is mmapped and unmapped when freed, and the resident
size just before a call no longer holds the previous call's freed blocks.  The peak RSS
above that (:func:`bench.harness.peak_rss_delta`) is what one forward+backward needs on
top of its inputs.  Prints one JSON object per line.

    python -m bench.memprobe SUITE DTYPE EXCLUDE[,...] SIZE_NAME N D C TABLE [SIZE_NAME N D C TABLE ...]
"""

from __future__ import annotations

import json
import sys

from . import suites
from .harness import peak_rss_delta
from .sizes import Size

__all__ = ["main"]


def main(argv: list[str]) -> int:
    if len(argv) < 3 or (len(argv) - 3) % 5:
        raise SystemExit(__doc__)
    suite, dtype, exclude = suites()[argv[0]], argv[1], [t for t in argv[2].split(",") if t]
    assert suite.cases is not None
    for i in range(3, len(argv), 5):
        name, n, d, c, table = argv[i:i + 5]
        size = Size(name, int(n), int(d), int(c), table=table)
        for case in sum(suite.cases(size, dtype, "cpu", exclude), []):
            try:
                case.run()  # warm-up: one-time initialisation is not the contender's memory
                peak = peak_rss_delta(case.run)
            except Exception:  # noqa: BLE001 - the timing table carries the error
                peak = float("nan")
            print(json.dumps({"size": name, "contender": case.name, "peak_mib": peak}), flush=True)
        del case
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
