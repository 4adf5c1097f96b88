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
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["Outcome", "RankFailed", "group_results", "run_in_groups", "run_ranks", "run_ranks_outcomes"]

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


# Ranks that fail on purpose ------------------------------------------------------------------
# run_ranks turns any failed rank into RankFailed; the fault tests (tests/adapters/
# test_torch_faults.py) need every rank's own ending instead: what the survivors raised and
# when, and that the failing rank failed the way it was told to.


@dataclass
class Outcome:
    """How one rank of :func:`run_ranks_outcomes` ended."""

    value: Any = None  # what fn returned (None if it raised or its process ended first)
    error: str | None = None  # fn's traceback, if it raised
    exitcode: int | None = None  # the process's exit code (negative: a signal)
    killed: bool = False  # still running at the deadline, so killed


def run_ranks_outcomes(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, backend: str = "gloo",
    collective_timeout: float = COLLECTIVE_TIMEOUT_S,
) -> list[Outcome]:  # fmt: skip
    """Every rank's :class:`Outcome` of ``fn(rank, world_size, *args)`` in a fresh group, as
    :func:`run_ranks` runs it, but raising for none of them: a rank may raise, end its
    process or be killed at the deadline (``timeout`` seconds after the start), and the
    others' results still come back.  Every process has ended when it returns (or raises)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lsoftmax-dist-") as folder:
        procs = [
            ctx.Process(
                target=_entry, daemon=True, args=(r, world_size, folder, backend, collective_timeout, fn, args)
            )
            for r in range(world_size)
        ]
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        finally:
            # Whatever happened (the parent interrupted too), no rank outlives the call.
            alive = [p for p in procs if p.pid is not None and p.is_alive()]
            for p in alive:
                p.kill()
            for p in alive:
                p.join(10)
        outcomes = []
        for r, p in enumerate(procs):
            path = Path(folder, f"rank{r}.pkl")
            got = pickle.loads(path.read_bytes()) if path.exists() else {}
            outcomes.append(Outcome(got.get("value"), got.get("error"), p.exitcode, p in alive))
        return outcomes


class InjectedFault(Exception):
    """The error :func:`faulty_step` raises on purpose: a rank's own error (not a RuntimeError,
    which the head reads as the backend's failure and names the collective in)."""


_FAULTS = ("raise", "raise-and-linger", "exit-in-forward", "exit-before-backward")
FAULT_EXIT_CODE = 17  # the exit code of a rank whose process ends on purpose


def faulty_step(rank: int, world_size: int, fault: str, faulty: int, folder: str) -> dict[str, Any]:
    """One training step of a class-parallel head (forward and backward) on every rank, in
    which rank ``faulty`` fails as ``fault`` says, at a point the others cannot check:

    ``"raise"``
        it raises :class:`InjectedFault` inside the forward, after the first collective
        (its first ``all_reduce``, after the all-gathers), and the exception ends the rank,
        as an uncaught exception ends a training script;
    ``"raise-and-linger"``
        it raises there, catches the exception and stays alive without calling the head
        again (a rank stuck in its error handling or its data loader), until the others
        have finished (a file each in ``folder``) or 120 s have passed;
    ``"exit-in-forward"``
        its process ends there (``os._exit``, code :data:`FAULT_EXIT_CODE`), as on a crash
        or an out-of-memory kill;
    ``"exit-before-backward"``
        its process ends after the forward, before the backward.

    Each other rank returns ``{"error": (type name, message) or None, "runtime_error": bool,
    "seconds": s}``: what its step raised (whether a RuntimeError, torch's
    DistBackendError included) and how long the step took."""
    import torch
    import torch.distributed as dist

    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    assert fault in _FAULTS, fault
    head = ClassParallelLSoftmaxLoss(4, 6 * world_size, margin=2, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 5])
    if rank == faulty and fault in ("raise", "raise-and-linger", "exit-in-forward"):
        # The head's forward calls dist.all_reduce after the all-gathers of the sizes and
        # settings, the features and the labels: the fault comes in the middle of the step.
        def all_reduce(*args: Any, **kwargs: Any) -> None:
            if fault == "exit-in-forward":
                os._exit(FAULT_EXIT_CODE)
            raise InjectedFault(f"rank {rank} fails inside the forward (injected)")

        dist.all_reduce = all_reduce  # type: ignore[assignment] # this process only, which ends with the test
    if rank == faulty and fault == "raise-and-linger":
        try:
            head(x, target)
        except InjectedFault:
            pass
        deadline = time.monotonic() + 120.0
        while len(list(Path(folder).glob("done*"))) < world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"lingered": True}
    t0 = time.monotonic()
    try:
        loss = head(x, target)
        if rank == faulty:  # "raise" raised above; "exit-before-backward" ends here
            os._exit(FAULT_EXIT_CODE)
        loss.backward()
        return {"error": None, "runtime_error": False, "seconds": time.monotonic() - t0}
    except InjectedFault:
        raise  # the faulty rank's own, which ends it
    except Exception as e:  # noqa: BLE001 - what a survivor saw is the result
        return {"error": (type(e).__name__, str(e)), "runtime_error": isinstance(e, RuntimeError),
                "seconds": time.monotonic() - t0}  # fmt: skip
    finally:
        Path(folder, f"done{rank}").touch()


def mismatch_cases() -> dict[str, tuple[str, dict[str, Any], dict[str, Any]]]:
    """The configurations that differ between ranks, by case: (the argument, the arguments
    of every rank but the last, those of the last rank), over ``in_features=6,
    num_classes=11, margin=2, dtype=torch.float64``; ``"label"`` is no setting but a
    target holding the bad label 11 on the last rank."""
    import torch

    from lsoftmax_core import ArcFace

    arc = {"margin": ArcFace(0.5)}
    return {
        "num_classes": ("num_classes", {}, {"num_classes": 12}),
        "margin-kind": ("margin", {}, arc),
        "margin-values": ("margin", arc, {"margin": ArcFace(0.4)}),
        "in_features": ("in_features", {}, {"in_features": 8}),
        "subcenters": ("subcenters", arc, {**arc, "subcenters": 3}),
        "dtype": ("dtype", {}, {"dtype": torch.float32}),
        "sample_rate": ("sample_rate", {"sample_rate": 1.0}, {"sample_rate": 0.5}),
        "label": ("target", {}, {}),
    }


def mismatched_ranks(rank: int, world_size: int) -> dict[str, Any]:
    """Every case of :func:`mismatch_cases` in turn, each a fresh head and one step (forward
    and backward): {case: None or (where it raised: "build" or "step", error type name,
    message)}, and under "after" the loss of a good step on a head of the same arguments on
    every rank (("loss", value), or where it raised), which must still work after all those
    errors."""
    import torch
    import torch.distributed as dist

    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    last = rank == world_size - 1
    base: dict[str, Any] = {"in_features": 6, "num_classes": 11, "margin": 2, "dtype": torch.float64}
    out: dict[str, Any] = {}
    for case, (_, common, odd) in mismatch_cases().items():
        kwargs = {**base, **common, **(odd if last else {})}
        torch.manual_seed(rank)
        try:
            head = ClassParallelLSoftmaxLoss(kwargs.pop("in_features"), kwargs.pop("num_classes"), **kwargs)
            built = None
        except Exception as e:  # noqa: BLE001 - reported per case
            head, built = None, ("build", type(e).__name__, str(e))
        # The ranks agree on whether every head was built before any calls it: a head built on
        # some ranks only would leave them waiting in its forward, and put every case after it
        # out of step.  (The test's own collective: the head has none in its constructor.)
        flags = torch.empty(world_size, dtype=torch.int64)
        # torch >= 2.13 names it all_gather_single; the older name warns there.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(flags, torch.tensor([int(built is None)]))
        if not bool(flags.all()):
            out[case] = built or ("build", "-", f"heads built (1) by rank: {flags.tolist()}")
            continue
        assert head is not None
        x = torch.randn(4, head.in_features, dtype=head.weight.dtype, requires_grad=True)
        target = torch.tensor([0, 5, 10 if not (last and case == "label") else 11, 3])
        try:
            head(x, target).backward()
            out[case] = None
        except Exception as e:  # noqa: BLE001 - reported per case
            out[case] = ("step", type(e).__name__, str(e))
    try:
        head = ClassParallelLSoftmaxLoss(6, 11, margin=2, dtype=torch.float64)
        x = torch.ones(4, 6, dtype=torch.float64, requires_grad=True)
        loss = head(x, torch.tensor([0, 5, 10, 3]))
        loss.backward()
        out["after"] = ("loss", loss.item())
    except Exception as e:  # noqa: BLE001 - reported
        out["after"] = ("step", type(e).__name__, str(e))
    return out


def run_in_groups(rank: int, world_size: int, module: str, function: str, groups: dict[int, tuple[int, ...]]) -> Any:
    """A rank function for :func:`run_ranks`: every group of ``groups`` ({size: global ranks})
    made on every rank in the same order (as ``new_group`` requires), then
    ``module.function(group)`` run in each group this rank belongs to; {size: its result}."""
    import importlib

    import torch.distributed as dist

    fn = getattr(importlib.import_module(module), function)
    made = {p: dist.new_group(list(members)) for p, members in groups.items()}
    return {p: fn(made[p]) for p, members in groups.items() if rank in members}


def group_results(
    monkeypatch: Any, test_file: str, function: str, groups: dict[int, tuple[int, ...]], cache: list[Any], *,
    timeout: float, collective_timeout: float = COLLECTIVE_TIMEOUT_S,
) -> dict[int, list[Any]]:  # fmt: skip
    """Each group's results, rank by rank ({size: [result of its rank 0, ...]}): one spawned
    world of ``max(groups)`` processes runs ``function`` of the test file in every group, once
    per test module (``cache``, the module's list); a failure is raised by every test that
    asks.  The spawned processes import the test file under its plain name from its folder."""
    if not cache:
        monkeypatch.syspath_prepend(str(Path(test_file).parent))
        try:
            results = run_ranks(max(groups), run_in_groups, Path(test_file).stem, function, groups, timeout=timeout,
                                collective_timeout=collective_timeout)  # fmt: skip
            cache.append({p: [results[g][p] for g in members] for p, members in groups.items()})
        except RankFailed as e:
            cache.append(e)
    if isinstance(cache[0], Exception):
        raise cache[0]
    return cache[0]  # type: ignore[no-any-return]
