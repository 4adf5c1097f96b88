"""Spawning a torch.distributed group (gloo; NCCL for GPU tests) on this machine for a test.

:func:`run_ranks` starts ``world_size`` fresh processes (multiprocessing's "spawn"), which
form a gloo group through a FileStore in a temporary folder and talk over the loopback
interface only; each calls ``fn(rank, world_size, *args)`` (a module-level function, so
that it can be pickled: keep it under ``tests/support/``) and its result comes back
pickled.  A rank that fails brings its traceback back; ranks still running at the
deadline are killed and the call fails, so a hang fails a test instead of stalling CI.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["RankFailed", "run_ranks"]

# A collective waits at most this long for the other ranks inside a rank (then raises),
# well within run_ranks' own deadline.
COLLECTIVE_TIMEOUT_S = 60


class RankFailed(AssertionError):
    """A rank raised, or the group did not finish in time."""


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else None


def _entry(
    rank: int, world_size: int, folder: str, backend: str, collective_timeout: float, fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:  # fmt: skip
    out = Path(folder, f"rank{rank}.pkl")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # P ranks share the machine's cores
        lo = _loopback_interface()
        if lo is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = lo  # gloo's connections stay on this machine
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"file://{folder}/store", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=collective_timeout),
        )  # fmt: skip
        try:
            result: dict[str, Any] = {"value": fn(rank, world_size, *args)}
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        result = {"error": traceback.format_exc()}
    out.write_bytes(pickle.dumps(result))


def run_ranks(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 180.0, backend: str = "gloo",
    collective_timeout: float = COLLECTIVE_TIMEOUT_S,
) -> list[Any]:  # fmt: skip
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]``, each run by its own
    rank of a fresh group (gloo; ``backend="nccl"``: rank r on GPU r) whose collectives
    wait at most ``collective_timeout`` seconds (the group's ``timeout``);
    :class:`RankFailed` if a rank raises or any is still running ``timeout`` seconds after
    the start (those are killed)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lsoftmax-dist-") as folder:
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, folder, backend, collective_timeout, fn, args), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
        for r in hung:
            procs[r].join(10)
        if hung:
            raise RankFailed(f"ranks {hung} of {world_size} still running after {timeout:.0f} s (a hang?); killed")
        results, errors = [], []
        for r, p in enumerate(procs):
            path = Path(folder, f"rank{r}.pkl")
            if not path.exists():
                errors.append(f"rank {r}: exited with code {p.exitcode} and no result")
                continue
            got = pickle.loads(path.read_bytes())
            if "error" in got:
                errors.append(f"rank {r}:\n{got['error']}")
            results.append(got.get("value"))
        if errors:
            raise RankFailed("\n".join(errors))
        return results


def hang(rank: int, world_size: int) -> None:
    """A rank that never finishes (the test of run_ranks' deadline)."""
    time.sleep(3600)
