"""Faults in a class-parallel group (issue 26; docs/distributed.md, "Faults and timeouts"):
a rank that raises or whose process dies in the middle of a step makes the others raise
a RuntimeError within the process group's timeout (20 s here) instead of hanging, and a
configuration that differs between ranks raises a ValueError on every rank naming the
argument and each rank's value.

Each test spawns its own gloo group on 127.0.0.1 (``support.dist.run_ranks_outcomes``),
bounded by a deadline past which its processes are killed; every process has ended when
the test's assertions run.  What the ranks do is in ``support.dist`` (``faulty_step``,
``mismatched_ranks``), importable in the spawned processes.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

from support.dist import (
    FAULT_EXIT_CODE,
    Outcome,
    faulty_step,
    mismatch_cases,
    mismatched_ranks,
    run_ranks_outcomes,
)

# The groups' timeout, init_process_group(timeout=...): how long a collective waits for a
# rank that does not come.
GROUP_TIMEOUT_S = 20.0
# Each spawned group's own bound (start, the timeout, the end on a loaded 2-core machine):
# past it its processes are killed and the test fails.
DEADLINE_S = 90.0
# What gloo says when a peer's connection closes: its process ended, or it left the group.
PEER_GONE = re.compile(r"Connection (closed|reset) by peer")


def _faulty(world_size: int, fault: str, faulty: int, tmp_path: Any) -> list[Outcome]:
    outcomes = run_ranks_outcomes(
        world_size, faulty_step, fault, faulty, str(tmp_path), timeout=DEADLINE_S,
        collective_timeout=GROUP_TIMEOUT_S,
    )  # fmt: skip
    killed = [r for r, o in enumerate(outcomes) if o.killed]
    assert not killed, f"ranks {killed} were still running after {DEADLINE_S:.0f} s (a hang); killed"
    return outcomes


def _survivors_raised(outcomes: list[Outcome], faulty: int) -> list[dict[str, Any]]:
    """The other ranks' steps, each of which must have raised a RuntimeError."""
    survivors = []
    for r, o in enumerate(outcomes):
        if r == faulty:
            continue
        assert o.error is None and o.exitcode == 0, f"rank {r}: exit code {o.exitcode}\n{o.error}"
        got = o.value
        assert got["error"] is not None, f"rank {r}'s step returned after {got['seconds']:.1f} s"
        assert got["runtime_error"], f"rank {r} raised {got['error']}"
        # The head names the collective and the rank, around the backend's own message.
        assert "ClassParallelLSoftmaxLoss: the " in got["error"][1], got["error"]
        assert f"collective failed on rank {r}" in got["error"][1], got["error"]
        survivors.append(got)
    return survivors


def _at_once(survivors: list[dict[str, Any]]) -> None:
    """The survivors learned from the closed connection, long before the timeout."""
    for got in survivors:
        assert PEER_GONE.search(got["error"][1]), got["error"]
        assert got["seconds"] < GROUP_TIMEOUT_S / 2, got


def test_a_rank_raising_inside_the_forward_makes_the_others_raise_at_once_when_the_exception_ends_it(
    tmp_path,
) -> None:
    """Rank 1 of 3 raises after the forward's all-gathers, before its all-reduce, and its
    exception ends it (as an uncaught exception ends a script): ranks 0 and 2, waiting in the
    all-reduce, raise as its connections close."""
    outcomes = _faulty(3, "raise", 1, tmp_path)
    assert "InjectedFault: rank 1 fails inside the forward" in (outcomes[1].error or ""), outcomes[1]
    assert "all_reduce" in outcomes[1].error  # after the all-gathers: the middle of the step
    _at_once(_survivors_raised(outcomes, 1))


def test_a_rank_raising_inside_the_forward_and_staying_alive_makes_the_others_raise_at_the_groups_timeout(
    tmp_path,
) -> None:
    """Rank 1 of 2 raises there, catches it and stays alive without calling the head again:
    its connections stay open, so rank 0 learns nothing until its all-reduce times out."""
    outcomes = _faulty(2, "raise-and-linger", 1, tmp_path)
    assert outcomes[1].value == {"lingered": True}, outcomes[1]
    (survivor,) = _survivors_raised(outcomes, 1)
    timed_out = f"Timed out waiting {GROUP_TIMEOUT_S * 1000:.0f}ms"
    assert timed_out in survivor["error"][1], survivor["error"]
    assert GROUP_TIMEOUT_S - 0.5 <= survivor["seconds"] < GROUP_TIMEOUT_S + 10, survivor


def test_a_rank_whose_process_dies_inside_the_forward_makes_the_others_raise_at_once(tmp_path) -> None:
    """Rank 1 of 3 ends its process (os._exit, as a crash or an out-of-memory kill would) after
    the forward's all-gathers: ranks 0 and 2 raise as its connections reset."""
    outcomes = _faulty(3, "exit-in-forward", 1, tmp_path)
    assert outcomes[1].exitcode == FAULT_EXIT_CODE and outcomes[1].value is None, outcomes[1]
    _at_once(_survivors_raised(outcomes, 1))


def test_a_rank_whose_process_dies_between_forward_and_backward_makes_the_other_raise_in_its_backward(
    tmp_path,
) -> None:
    outcomes = _faulty(2, "exit-before-backward", 1, tmp_path)
    assert outcomes[1].exitcode == FAULT_EXIT_CODE and outcomes[1].value is None, outcomes[1]
    _at_once(_survivors_raised(outcomes, 1))


# Configurations that differ between ranks: one group of 3 ranks runs every case, the last
# rank differing, each with a fresh head and one step; spawned once and shared by the tests.
MISMATCH_WORLD = 3
_MISMATCHES: list[Any] = []


def _mismatches() -> list[dict[str, Any]]:
    if not _MISMATCHES:
        _MISMATCHES.append(
            run_ranks_outcomes(
                MISMATCH_WORLD, mismatched_ranks, timeout=DEADLINE_S, collective_timeout=GROUP_TIMEOUT_S
            )
        )  # fmt: skip
    results = []
    for r, o in enumerate(_MISMATCHES[0]):
        assert not o.killed and o.error is None, f"rank {r}: killed={o.killed}, exit {o.exitcode}\n{o.error}"
        results.append(o.value)
    return results


def _value(case: str, rank: int) -> Any:
    """The value of the case's argument on ``rank`` (the defaults where a case leaves it)."""
    name, common, odd = mismatch_cases()[case]
    base = {"in_features": 6, "num_classes": 11, "margin": 2, "dtype": torch.float64, "subcenters": 1}
    return {**base, **common, **(odd if rank == MISMATCH_WORLD - 1 else {})}[name]


@pytest.mark.parametrize("case", [c for c in mismatch_cases() if c != "label"])
def test_a_setting_differing_on_one_rank_raises_on_every_rank_naming_it_and_each_ranks_value(case) -> None:
    """num_classes, the margin's kind and its values, in_features, subcenters, the weight's
    dtype and sample_rate: the last rank's differs, and every rank raises a ValueError at its
    first call, naming the argument, its own value and the last rank's (the last rank: its own
    and rank 0's)."""
    name = mismatch_cases()[case][0]
    odd = MISMATCH_WORLD - 1
    for r, res in enumerate(_mismatches()):
        got = res[case]
        assert got is not None, f"{case}: rank {r}'s step did not raise"
        where, kind, message = got
        assert (where, kind) == ("step", "ValueError"), f"{case}: rank {r} raised {got}"
        other = 0 if r == odd else odd
        for rank in (r, other):
            named = f"rank {rank} has {name}={_value(case, rank)!r}"
            assert named in message, f"{case}: rank {r} said {message!r}"
        assert f"the same {name}" in message, message


def test_a_bad_label_on_one_rank_raises_on_every_rank_naming_that_rank_and_row() -> None:
    for r, res in enumerate(_mismatches()):
        assert res["label"] == (
            "step", "ValueError",
            "target must lie in [0, num_classes) = [0, 11) or equal ignore_index=-100: rank 2's target[2]=11",
        ), f"rank {r}: {res['label']}"  # fmt: skip


def test_the_group_still_works_after_every_mismatch_with_the_same_loss_on_every_rank() -> None:
    afters = [res["after"] for res in _mismatches()]
    assert all(a[0] == "loss" for a in afters), afters
    assert len({a[1] for a in afters}) == 1, afters
