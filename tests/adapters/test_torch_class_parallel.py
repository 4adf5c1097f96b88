"""The class-parallel head on torch.distributed: gloo groups of 1, 2, 3 and 4 ranks on
this machine give the loss and gradients of the single-process fused loss over the
concatenated batch (1e-10 in float64, the tolerance table in float32), whatever the
shards, labels, batch sizes and margins; bad input on one rank raises on every rank;
checkpoints move between world sizes; DDP training on 2 ranks is single-process training;
the bytes passed to the collectives follow the documented formula, independent of C.

One spawned world of 4 processes runs every case (``support.class_parallel``) in gloo
subgroups of 1, 2, 3 and 4 ranks (passed as ``process_group``), started once and shared
by the tests; if it hangs it is killed at its deadline and the tests fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

import torch.nn.functional as F

import lsoftmax_core as lsm
from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss, LSoftmaxLoss, lsoftmax_cross_entropy

from support import class_parallel as cp
from support import reference
from support.dist import RankFailed, hang, run_ranks
from support.loss_reference import assert_rel
from support.tolerances import TOLERANCES, assert_close, check_backward, logit_scale

WORLD_SIZES = sorted(cp.GROUPS)  # 1, 2, 3, 4
TRAINING = cp.Training(sizes=(5, 3))  # unequal batches on the 2 ranks
WORLD_TIMEOUT_S = 240.0  # the whole world (start, every group's cases) on a loaded 2-core machine
_WORLD: list[Any] = []


def _group(world_size: int) -> list[dict[str, Any]]:
    """Every rank's results for the group of ``world_size`` ranks, in group-rank order.  The
    world of 4 processes running every group is spawned once; a failure is kept and raised
    by each test."""
    if not _WORLD:
        try:
            _WORLD.append(run_ranks(4, cp.run_world, TRAINING, timeout=WORLD_TIMEOUT_S))
        except RankFailed as e:
            _WORLD.append(e)
    got = _WORLD[0]
    if isinstance(got, Exception):
        raise got
    return [got[g][world_size] for g in cp.GROUPS[world_size]]


def _reference(case: cp.Case) -> tuple[float, np.ndarray, np.ndarray]:
    """The single-process fused loss (float64) over the whole batch, and its gradients."""
    x, w, label = cp.problem(case)
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    weight = F.normalize(wt, dim=1) if case.normalize_weight else wt
    loss = lsoftmax_cross_entropy(
        xt, weight, torch.from_numpy(label), margin=case.margin, beta=case.beta, reduction=case.reduction,
        ignore_index=case.ignore_index,
    )
    loss.backward()
    return loss.item(), xt.grad.numpy(), wt.grad.numpy()


def _assembled(ranks: list[dict[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole batch's grad_x (the ranks' rows, divided by the world size) and the full grad_w."""
    p = len(ranks)
    res = [r["cases"][name] for r in ranks]
    return np.concatenate([r["grad_x"] for r in res]) / p, np.concatenate([r["grad_w"] for r in res])


def _cases(dtype: str) -> list[Any]:
    return [
        pytest.param(p, case, id=f"P{p}-{case.name}")
        for p in WORLD_SIZES
        for case in cp.cases_for(p)
        if case.dtype == dtype
    ]


@pytest.mark.parametrize(("world_size", "case"), _cases("float64"))
def test_loss_and_gradients_equal_the_single_process_fused_loss_in_float64(world_size, case) -> None:
    ranks = _group(world_size)
    want, gx, gw = _reference(case)
    losses = [r["cases"][case.name]["loss"] for r in ranks]
    assert len(set(losses)) == 1, f"the ranks' losses differ: {losses}"
    assert_rel(losses[0], want, 1e-10, "loss")
    got_x, got_w = _assembled(ranks, case.name)
    assert_rel(got_x, gx, 1e-10, "grad_x (the ranks' rows / world size)")
    assert_rel(got_w, gw, 1e-10, "grad_w (the shards)")
    for r, res in enumerate(ranks):
        assert res["cases"][case.name]["bounds"] == cp.bounds(case.num_classes, world_size)[r]
        assert np.isfinite(res["cases"][case.name]["grad_x"]).all()


@pytest.mark.parametrize(("world_size", "case"), _cases("float32"))
def test_float32_is_within_the_tolerance_table(world_size, case) -> None:
    ranks = _group(world_size)
    x, w, label = cp.problem(case)
    x32, w32 = x.astype(np.float32).astype(np.float64), w.astype(np.float32).astype(np.float64)
    f = torch.from_numpy(reference.forward(x32, w32, np.where(label == cp.IGNORE, 0, label), margin=case.margin,
                                           beta=case.beta)).requires_grad_()  # fmt: skip
    want = F.cross_entropy(f, torch.from_numpy(label), ignore_index=cp.IGNORE)
    (grad_logits,) = torch.autograd.grad(want, f)
    res = [r["cases"][case.name] for r in ranks]
    assert {r["loss_dtype"] for r in res} == {"torch.float32"}
    scale = logit_scale(x32, w32, case.margin).max()
    for r in res:
        assert_close(r["loss"], want.item(), scale, TOLERANCES["float32"].forward, "loss float32", dtype="float32")
    got_x, got_w = _assembled(ranks, case.name)
    lab = np.where(label == cp.IGNORE, 0, label)
    check_backward((got_x, got_w), grad_logits, x32, w32, lab, margin=case.margin, beta=case.beta, dtype="float32")


def _formula(world_size: int, sizes: tuple[int, ...], d: int, itemsize: int) -> int:
    """docs/distributed.md: 88*P + P*N_max*(8 + 2*D*s) + 24*N bytes per step."""
    n_max, n = max(sizes), sum(sizes)
    if n == 0:
        return 88 * world_size
    return 88 * world_size + world_size * n_max * (8 + 2 * d * itemsize) + 24 * n


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_the_bytes_passed_to_collectives_follow_the_formula_and_not_the_number_of_classes(world_size) -> None:
    ranks = _group(world_size)
    for case in cp.cases_for(world_size):
        itemsize = 8 if case.dtype == "float64" else 4
        for r in ranks:
            got = r["cases"][case.name]
            assert got["bytes"] == _formula(world_size, case.sizes, case.d, itemsize), case.name
            assert got["bytes"] == sum(b for _, b in got["collectives"])
    names = [name for name, _ in ranks[0]["cases"]["m2-beta0"]["collectives"]]
    assert names == ["all_gather sizes", "all_gather x", "all_gather target", "all_reduce max", "all_reduce sum",
                     "reduce_scatter grad_x"]  # fmt: skip
    # The same batch against 1003 and 5000 classes: the same collectives, byte for byte.
    assert ranks[0]["cases"]["more-classes"]["collectives"] == ranks[0]["cases"]["m2-beta0"]["collectives"]
    assert ranks[0]["cases"]["all-empty"]["collectives"] == [("all_gather sizes", 88 * world_size)]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_bad_input_on_one_rank_raises_on_every_rank_and_leaves_the_group_usable(world_size) -> None:
    ranks = _group(world_size)
    bad = world_size - 1
    expected = {
        "label": ("ValueError", f"rank {bad}'s target[2]=11"),
        "negative": ("ValueError", f"rank {bad}'s target[0]=-1"),
        "shape": ("ValueError", "x must have shape (N, in_features) = (N, 6), got x.shape=(5, 3)"),
        "dtype": ("TypeError", "x.dtype=torch.float32, weight.dtype=torch.float64"),
        "target-dtype": ("TypeError", "target must have an integer dtype, got target.dtype=torch.float64"),
        "not-a-tensor": ("TypeError", "x must be a torch.Tensor, got numpy.ndarray"),
        "bad-setting": ("ValueError", "reduction='none' must be one of ('mean', 'sum')"),
    }
    for what, (kind, text) in expected.items():
        for r, res in enumerate(ranks):
            got = res["errors"][what]
            assert got is not None, f"{what}: rank {r} did not raise"
            assert got[0] == kind, f"{what}: rank {r} raised {got}"
            if r == bad or what in ("label", "negative"):
                assert text in got[1], f"{what}: rank {r} said {got[1]!r}"
            else:
                assert f"rank {bad} of the process group passed an invalid x or target, or has an invalid " \
                       "setting" in got[1], got[1]
    assert "must lie in [0, num_classes) = [0, 11) or equal ignore_index=-100" in ranks[0]["errors"]["label"][1]
    # A rank whose beta differs (a missed step()): every rank raises, naming both betas.
    for r, res in enumerate(ranks):
        if world_size == 1:
            assert res["errors"]["beta"] is None
            continue
        mine, theirs = (3.0, 1.0) if r == bad else (1.0, 3.0)
        other = 0 if r == bad else bad
        assert res["errors"]["beta"] == (
            "ValueError",
            f"every rank's ClassParallelLSoftmaxLoss must have the same beta: rank {r} has beta={mine!r}, rank "
            f"{other} has beta={theirs!r} (same arguments on every rank, step() on every rank once per "
            "optimizer step, and a loss needing a backward on every rank or on none)",
        )
    # normalize_weight=True on the last rank alone: every rank raises, naming the setting and both values.
    for r, res in enumerate(ranks):
        if world_size == 1:
            assert res["errors"]["normalize_weight"] is None
            continue
        other = 0 if r == bad else bad
        assert res["errors"]["normalize_weight"] == (
            "ValueError",
            f"every rank's ClassParallelLSoftmaxLoss must have the same normalize_weight: rank {r} has "
            f"normalize_weight={r == bad!r}, rank {other} has normalize_weight={other == bad!r} (same arguments on "
            "every rank, step() on every rank once per optimizer step, and a loss needing a backward on every rank "
            "or on none)",
        )
    for r, res in enumerate(ranks):
        got = res["errors"]["needs_grad"]
        assert (got is None) if world_size == 1 else (got[0] == "ValueError" and "the same needs_grad" in got[1])
        if world_size > 1:
            assert f"rank {r} has needs_grad={r != bad!r}" in got[1], got[1]
    afters = [res["errors"]["after"] for res in ranks]
    assert all(res["errors"]["weight-unchanged"] for res in ranks)
    assert len(set(afters)) == 1 and np.isfinite(afters[0])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_checkpoints_gather_the_full_weight_and_load_it_at_any_world_size(world_size) -> None:
    ranks = [r["checkpoints"] for r in _group(world_size)]
    c, d = 1003, 4
    shards = [r["shard"] for r in ranks]
    assert [(s["_extra_state"]["class_start"], s["_extra_state"]["class_stop"]) for s in shards] == cp.bounds(c, world_size)
    assert all(s["weight"].shape == (b - a, d) for s, (a, b) in zip(shards, cp.bounds(c, world_size)))
    merged = ClassParallelLSoftmaxLoss.merge_state_dicts(shards[::-1])  # any order
    for dst in ("full_0", "full_last"):
        got = [r[dst] for r in ranks]
        owner = 0 if dst == "full_0" else world_size - 1
        assert all(g is None for i, g in enumerate(got) if i != owner)
        assert torch.equal(got[owner]["weight"], merged["weight"])
        assert got[owner]["_extra_state"] == merged["_extra_state"]
        assert merged["_extra_state"]["iteration"] == 2
    # The full checkpoint is LSoftmaxLoss's: it loads there, with the iteration and schedule.
    single = LSoftmaxLoss(d, c, margin=3, dtype=torch.float64)
    single.load_state_dict(merged)
    assert single.iteration == 2 and single.beta == 12.5
    full = torch.arange(c * d, dtype=torch.float64).reshape(c, d)
    for r, (a, b) in zip(ranks, cp.bounds(c, world_size)):
        assert torch.equal(r["loaded"], full[a:b]) and r["loaded_iteration"] == 2
        assert r["from_single"] == (True, 3)
        assert r["reloaded"] == (True, 2, 12.5)
        assert r["margin_mismatch"][0] == "ValueError" and "checkpoint has margin=2" in r["margin_mismatch"][1]
        assert r["shard_margin_mismatch"] == ("ValueError", "checkpoint has margin=2 but this loss has margin=3")
        assert r["negative_iteration"][0] == "ValueError" and "iteration=-1" in r["negative_iteration"][1]
        assert r["refused_unchanged"], "a refused checkpoint changed the shard or its settings"
        if world_size > 1:
            assert r["dst_differs"] == ("ValueError", f"every rank must pass the same dst to full_state_dict, got "
                                                      f"dst={list(range(world_size))} in rank order")  # fmt: skip
        else:
            assert r["dst_differs"] is None
        assert r["dst_invalid"] is not None and r["dst_invalid"][0] == "ValueError", r["dst_invalid"]
        assert r["wrong_shape"] == ("ValueError", f"state['weight'] must be the full (num_classes, in_features) = "
                                                  f"({c}, {d}) weight, got (1002, 4)")  # fmt: skip
        assert r["too_many_ranks"][0] == "ValueError" and "num_classes=" in r["too_many_ranks"][1]
        if world_size > 1:
            assert r["foreign"][0] == "ValueError" and "load_full_state_dict" in r["foreign"][1]
            assert r["foreign_unchanged"]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_autocast_computes_bfloat16_features_in_float32_and_logits_are_the_shards_chunk(world_size) -> None:
    for r in _group(world_size):
        dtype, got, want, grad_dtype = r["extras"]["autocast"]
        assert dtype == "torch.float32" and grad_dtype == "torch.bfloat16"
        assert got == want  # the same float32 computation on the same (bfloat16-exact) features
        assert np.array_equal(*r["extras"]["autocast_grad"])
        logits, expected = r["extras"]["logits"]
        assert logits.shape == expected.shape
        assert_rel(logits, expected, 1e-6, "logits")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ignored_rows_take_no_part_in_the_backward_whatever_the_upstream_gradient(world_size) -> None:
    """Every row ignored: the loss is 0 and sqrt's upstream gradient inf; torch's
    cross_entropy gives zero gradients there, and so must every rank (no 0 * inf = NaN)."""
    for r in _group(world_size):
        for reduction, (gx, gw) in r["extras"]["all_ignored_sqrt"].items():
            assert not gx.any() and not gw.any(), f"{reduction}: {int(np.isnan(gw).sum())} NaN in grad_w"


def test_ddp_training_on_two_ranks_equals_single_process_training_in_float64() -> None:
    ranks = [r["training"] for r in _group(len(TRAINING.sizes))]
    t = TRAINING
    init, batches = cp.training_data(t)
    body = torch.nn.Linear(t.d_in, t.d).double()
    with torch.no_grad():
        body.weight.copy_(torch.from_numpy(init["body.weight"]))
        body.bias.copy_(torch.from_numpy(init["body.bias"]))
    head = LSoftmaxLoss(t.d, t.num_classes, margin=t.margin, schedule=lsm.ExponentialSchedule(beta0=10.0, scale=0.5),
                        dtype=torch.float64)  # fmt: skip
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(init["head.weight"]))
    opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=t.lr)
    losses = []
    for xb, yb in batches:
        loss = head(torch.tanh(body(torch.from_numpy(xb))), torch.from_numpy(yb))
        opt.zero_grad()
        loss.backward()
        opt.step()
        head.step()
        losses.append(loss.item())
    assert losses[0] != losses[-1]  # it trained
    for r in ranks:
        assert_rel(r["losses"], losses, 1e-8, "losses")
        assert_rel(r["body.weight"], body.weight.detach().numpy(), 1e-8, "backbone weight")
        assert_rel(r["body.bias"], body.bias.detach().numpy(), 1e-8, "backbone bias")
    assert_rel(ranks[0]["head.weight"], head.weight.detach().numpy(), 1e-8, "head weight")
    # Without the world-size factor in x.grad, DDP's average would halve the backbone's step.
    assert not np.allclose(init["body.weight"], body.weight.detach().numpy())


def test_merging_shards_that_do_not_tile_the_classes_raises() -> None:
    def shard(a: int, b: int, **extra: Any) -> dict[str, Any]:
        state = {"margin": 2, "normalize_weight": False, "iteration": 0, "schedule": {"type": "constant", "beta": 0.0},
                 "num_classes": 10, "class_start": a, "class_stop": b, **extra}  # fmt: skip
        return {"weight": torch.zeros(b - a, 3), "_extra_state": state}

    with pytest.raises(ValueError, match=r"after class 5 comes a shard \[6, 10\)"):
        ClassParallelLSoftmaxLoss.merge_state_dicts([shard(0, 5), shard(6, 10)])
    with pytest.raises(ValueError, match=r"they end at class 5"):
        ClassParallelLSoftmaxLoss.merge_state_dicts([shard(0, 5)])
    with pytest.raises(ValueError, match=r"shards disagree on iteration: 0 and 3"):
        ClassParallelLSoftmaxLoss.merge_state_dicts([shard(0, 5), shard(5, 10, iteration=3)])
    with pytest.raises(ValueError, match=r"got none"):
        ClassParallelLSoftmaxLoss.merge_state_dicts([])
    with pytest.raises(ValueError, match=r"shards\[1\] must be a rank's state_dict\(\).*keys \['weight'\]"):
        ClassParallelLSoftmaxLoss.merge_state_dicts([shard(0, 5), {"weight": torch.zeros(5, 3)}])
    full = ClassParallelLSoftmaxLoss.merge_state_dicts([shard(5, 10), shard(0, 5)])
    assert full["weight"].shape == (10, 3) and "class_start" not in full["_extra_state"]


def test_shard_bounds_tile_the_classes_in_rank_order() -> None:
    for c, p in [(1003, 4), (10, 3), (5, 5), (7, 1)]:
        got = [ClassParallelLSoftmaxLoss.shard_bounds(c, p, r) for r in range(p)]
        assert got == cp.bounds(c, p)
        assert [b - a for a, b in got] == [c // p + (r < c % p) for r in range(p)]
    with pytest.raises(ValueError, match="rank"):
        ClassParallelLSoftmaxLoss.shard_bounds(10, 3, 3)


def test_the_module_needs_an_initialised_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ClassParallelLSoftmaxLoss(4, 10)


@pytest.mark.gpu
def test_an_nccl_group_checks_gathers_and_matches_the_cpu_loss() -> None:
    """One rank per GPU, up to 2 (a single-rank group on a one-GPU machine)."""
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        pytest.skip("needs CUDA and NCCL")
    ranks = run_ranks(min(2, torch.cuda.device_count()), cp.run_cuda, backend="nccl", timeout=WORLD_TIMEOUT_S)
    for res in ranks:
        assert res["bad_label"] is not None and "rank 0's target[0]=1003" in res["bad_label"][1]
        assert res["full_ok"]
    for res in ranks:
        got, want = res["loss"]
        assert abs(got - want) <= TOLERANCES["float32"].forward * max(1.0, abs(want)) * 10
        for name in ("grad_x", "grad_w"):
            a, b = res[name]
            assert_rel(a, b, 1e-4, name)


def test_a_rank_that_never_calls_backward_makes_the_others_raise_at_the_groups_timeout(tmp_path) -> None:
    """docs/distributed.md, "A rank that stops": with init_process_group(timeout=5 s) the
    survivor's backward raises a RuntimeError after about 5 s (well within 20 s) instead of
    waiting for gloo's default 30 minutes."""
    timeout = 5.0
    survivor, skipper = run_ranks(2, cp.run_skipped_backward, str(tmp_path / "done"), timeout=60.0,
                                  collective_timeout=timeout)  # fmt: skip
    assert skipper == {"skipped": True}
    assert survivor["error"] is not None, f"the backward returned after {survivor['waited']:.1f} s"
    kind, message = survivor["error"]
    assert kind in ("RuntimeError", "DistBackendError") and "Timed out" in message, survivor["error"]
    assert timeout - 0.5 <= survivor["waited"] < 20.0, survivor["waited"]


def test_a_group_still_running_at_its_deadline_is_killed_and_fails() -> None:
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match=r"ranks \[0\] of 1 still running after 2 s"):
        run_ranks(1, hang, timeout=2.0)
    assert time.monotonic() - t0 < 30


def test_the_example_trains_under_torchrun_on_two_cpu_processes(tmp_path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "examples" / "train_class_parallel.py"), "--steps", "3", "--classes", "11",
           "--save", str(tmp_path / "head.pt")]  # fmt: skip
    # Its own session, so that a hang kills torchrun and its workers together.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=WORLD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the example was still running after {WORLD_TIMEOUT_S:.0f} s; killed")
    assert proc.returncode == 0, out + err
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and all("loss " in line for line in steps), out
    full = torch.load(tmp_path / "head.pt")
    assert full["weight"].shape == (11, 64) and full["_extra_state"]["iteration"] == 3
