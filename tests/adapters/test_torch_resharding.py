"""Optimizer-state resharding of the class-parallel head (issue 26, item 2):
``full_optimizer_state_dict`` gathers the optimizer's state for the head's weight into the
full (C·k, D) layout on one rank, and ``load_full_optimizer_state_dict`` hands each rank its
rows at any world size.

A run of the head with SGD (momentum, dampening, weight decay), Adam (its own betas, weight
decay), AdamW (amsgrad), or Adam on ArcFace with 2 sub-centres per class is checkpointed at
P = 3 (weights and optimizer state, through ``torch.save`` to a file), resumed at P = 2, at P = 1 (the class-parallel head alone in its
group) and in a single-process ``LSoftmaxLoss``, each with an optimizer built with other
hyper-parameters that the load restores; every resumed run takes the uninterrupted run's
next 3 steps to 1e-10 in float64 (13 classes: uneven shards; the same global batch of 12
rows, split 5/4/3, 7/5 or 12 over the ranks; beta annealed, so the iteration travels too).
A single-process optimizer's state resumes on 2 ranks the same way.  A mismatch between
the ranks raises on every rank, naming what differs, and leaves the group working; a
refused load changes nothing.

One spawned world of 3 gloo processes on this machine runs every group (3: ranks 0-2;
then 2: ranks 1-2 and 1: rank 0, side by side); it is killed at its deadline if it hangs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

import lsoftmax_core as lsm
from lsoftmax_core.adapters.torch import LSoftmaxLoss
from lsoftmax_core.adapters.torch.resharding import full_optimizer_state_dict, load_full_optimizer_state_dict

from support.class_parallel import error_of

C, D, N = 13, 5, 12  # 13 classes: shards of 5/4/4 and 7/6 classes
MARGIN = 3
BEFORE, AFTER = 2, 3  # steps before the checkpoint, and after it
GROUPS = {3: (0, 1, 2), 2: (1, 2), 1: (0,)}
SIZES = {3: (5, 4, 3), 2: (7, 5), 1: (12,)}  # the same global batch of N rows, split over the ranks
WORLD_TIMEOUT_S = 150.0
# The run's optimizers, and the other hyper-parameters the resumed run's optimizer is built
# with (the load restores the saved ones, amsgrad included).
OPTIMIZERS = {
    "sgd": ("SGD", {"lr": 0.3, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2}, {"lr": 1.0}),
    "adam": ("Adam", {"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 1e-2}, {"lr": 1.0}),
    "adamw": ("AdamW", {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}, {"lr": 1.0, "betas": (0.5, 0.5)}),
    # ArcFace with 2 sub-centres per class: the rows move in whole classes of 2
    "adam-k2": ("Adam", {"lr": 0.05}, {"lr": 1.0}),
}


def _kind(name: str) -> dict[str, Any]:
    """The head's margin and sub-centres for the run ``name``."""
    if name.endswith("-k2"):
        return {"margin": lsm.ArcFace(m=0.3, s=4.0), "subcenters": 2}
    return {"margin": MARGIN, "subcenters": 1}


def _schedule() -> Any:
    return lsm.ExponentialSchedule(beta0=10.0, scale=0.5)


def _data(name: str = "") -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The initial full weight (C·k rows) and each step's global batch (features, labels), float64."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((C * _kind(name)["subcenters"], D))
    batches = []
    for _ in range(BEFORE + AFTER):
        x, y = rng.standard_normal((N, D)) * 2.0, rng.integers(0, C, N)
        y[rng.random(N) < 0.15] = -100
        batches.append((x, y))
    return w, batches


def _optimizer(name: str, params: Any, resumed: bool = False) -> Any:
    cls, kw, other = OPTIMIZERS[name]
    return getattr(torch.optim, cls)(params, **(other if resumed else kw))


def _train(head: Any, opt: Any, batches: list[Any], sizes: tuple[int, ...], rank: int) -> list[Any]:
    """One optimizer step per batch on this rank's rows; the full weight after each (a
    class-parallel head: gathered to its group's rank 0, None elsewhere)."""
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    weights = []
    for x, y in batches:
        loss = head(torch.from_numpy(x[rows]), torch.from_numpy(y[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        head.step()
        if isinstance(head, LSoftmaxLoss):
            weights.append(head.weight.detach().numpy().copy())
        else:
            full = head.full_state_dict()
            weights.append(None if full is None else full["weight"].numpy())
    return weights


# --------------------------------------------------------------------------- what the ranks run


def _head(group: Any, num_classes: int = C, name: str = "") -> Any:
    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    return ClassParallelLSoftmaxLoss(
        D, num_classes, schedule=_schedule(), dtype=torch.float64, process_group=group, **_kind(name)
    )  # fmt: skip


def _uninterrupted(group: Any, name: str, path: str) -> list[Any]:
    """The P = 3 run: BEFORE steps, the checkpoint to ``path`` (rank 0 writes it), AFTER steps."""
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    w, batches = _data(name)
    head = _head(group, name=name)
    head.load_full_state_dict({"weight": torch.from_numpy(w)})
    opt = _optimizer(name, head.parameters())
    _train(head, opt, batches[:BEFORE], SIZES[p], rank)
    checkpoint = {"head": head.full_state_dict(), "optimizer": head.full_optimizer_state_dict(opt)}
    if rank == 0:
        torch.save(checkpoint, path)
    return _train(head, opt, batches[BEFORE:], SIZES[p], rank)


def _resumed(group: Any, name: str, path: str) -> dict[str, Any]:
    """A fresh head and optimizer (other weights, other hyper-parameters) resumed from the
    checkpoint at this group's size, then AFTER steps."""
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    _, batches = _data(name)
    checkpoint = torch.load(path, mmap=True)
    head = _head(group, name=name)
    opt = _optimizer(name, head.parameters(), resumed=True)
    head.load_full_state_dict(checkpoint["head"])
    head.load_full_optimizer_state_dict(opt, checkpoint["optimizer"])
    group0 = opt.param_groups[0]
    restored = all(group0[key] == value for key, value in checkpoint["optimizer"]["param_group"].items())
    return {"weights": _train(head, opt, batches[BEFORE:], SIZES[p], rank), "restored": restored,
            "iteration": head.iteration}  # fmt: skip


def _from_single(group: Any, name: str) -> list[Any]:
    """A single-process LSoftmaxLoss's run (in this process, no group) for BEFORE steps,
    its weight and optimizer state loaded into the class-parallel head, then AFTER steps."""
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    w, batches = _data(name)
    single = LSoftmaxLoss(D, C, schedule=_schedule(), dtype=torch.float64, **_kind(name))
    single.load_state_dict({"weight": torch.from_numpy(w), "_extra_state": single.get_extra_state()})
    single_opt = _optimizer(name, single.parameters())
    _train(single, single_opt, batches[:BEFORE], (N,), 0)
    head = _head(group, name=name)
    opt = _optimizer(name, head.parameters(), resumed=True)
    head.load_full_state_dict(single.state_dict())
    head.load_full_optimizer_state_dict(opt, full_optimizer_state_dict(single, single_opt))
    return _train(head, opt, batches[BEFORE:], SIZES[p], rank)


def _mismatches(group: Any) -> dict[str, Any]:
    """Each problem on the last rank only: every rank must raise, and the group still works."""
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    last = rank == p - 1
    w, batches = _data()
    head = _head(group)
    head.load_full_state_dict({"weight": torch.from_numpy(w)})
    sgd = _optimizer("sgd", head.parameters())
    adam = _optimizer("adam", head.parameters())
    for opt in (sgd, adam):
        _train(head, opt, batches[:1], SIZES[p], rank)
    weight = head.weight
    out: dict[str, Any] = {}
    if last:
        sgd.param_groups[0]["lr"] = 0.25
    out["lr"] = error_of(lambda: head.full_optimizer_state_dict(sgd))
    sgd.param_groups[0]["lr"] = OPTIMIZERS["sgd"][1]["lr"]
    if last:
        adam.state[weight]["step"] += 1  # as if this rank had taken another step
    out["step"] = error_of(lambda: head.full_optimizer_state_dict(adam))
    if last:
        adam.state[weight]["step"] -= 1
    out["class"] = error_of(lambda: head.full_optimizer_state_dict(adam if last else sgd))
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], lr=0.1)
    out["no_weight"] = error_of(lambda: head.full_optimizer_state_dict(other if last else sgd))
    if last:
        sgd.state[weight]["odd"] = torch.zeros(3, dtype=torch.float64)
    out["odd_shape"] = error_of(lambda: head.full_optimizer_state_dict(sgd))
    sgd.state[weight].pop("odd", None)
    out["bad_dst"] = error_of(lambda: head.full_optimizer_state_dict(sgd, dst=p if last else 0))
    out["other_dst"] = error_of(lambda: head.full_optimizer_state_dict(sgd, dst=1 if last else 0))
    full = head.full_optimizer_state_dict(sgd)  # the group still works
    out["after"] = None if full is None else {key: tuple(v.shape) for key, v in full["state"].items()}
    out["full_at_1"] = head.full_optimizer_state_dict(adam, dst=1)  # another dst: its group rank 1
    return out


def _refusals(group: Any, path: str) -> dict[str, Any]:
    """Loads refused on a class-parallel rank (no collective): nothing changes."""
    checkpoint = torch.load(path)["optimizer"]  # the SGD run's
    head = _head(group)
    opt = _optimizer("sgd", head.parameters(), resumed=True)
    wider = _head(group, C + 1)
    cut = {**checkpoint, "state": {"momentum_buffer": checkpoint["state"]["momentum_buffer"][:-1]}}
    out = {
        "class": error_of(lambda: head.load_full_optimizer_state_dict(_optimizer("adam", head.parameters()),
                                                                       checkpoint)),
        "rows": error_of(lambda: head.load_full_optimizer_state_dict(opt, cut)),
        "num_classes": error_of(lambda: wider.load_full_optimizer_state_dict(
            _optimizer("sgd", wider.parameters()), checkpoint)),
        "hyper": error_of(lambda: head.load_full_optimizer_state_dict(
            opt, {**checkpoint, "param_group": {**checkpoint["param_group"], "lookahead": 5}})),
    }  # fmt: skip
    out["unchanged"] = not opt.state and opt.param_groups[0]["lr"] == OPTIMIZERS["sgd"][2]["lr"]
    return out


def _world(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    groups = {p: dist.new_group(list(members)) for p, members in GROUPS.items()}  # every rank, same order
    p = 1 if rank in GROUPS[1] else 2  # this rank's group after the checkpoint
    out: dict[str, Any] = {"uninterrupted": {}, "resumed": {}, "from_single": {}}
    for name in OPTIMIZERS:
        path = f"{folder}/{name}.pt"
        out["uninterrupted"][name] = _uninterrupted(groups[3], name, path)
        dist.barrier()  # the checkpoint is on disk before anyone reads it
        out["resumed"][name] = _resumed(groups[p], name, path)
        if p == 2:
            out["from_single"][name] = _from_single(groups[2], name)
    out["mismatches"] = _mismatches(groups[3])
    if p == 2:
        out["refusals"] = _refusals(groups[2], f"{folder}/sgd.pt")
    return out


# --------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """Every rank's results (spawned once per module; a failure fails each test) and the
    folder of the checkpoints.  The spawned processes import this file under its plain name."""
    from support.dist import run_ranks

    folder = tmp_path_factory.mktemp("resharding")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).parent))
        module = importlib.import_module(Path(__file__).stem)
        ranks = run_ranks(3, module._world, str(folder), timeout=WORLD_TIMEOUT_S)
    return {"ranks": ranks, "folder": folder}


def _close(actual: Any, expected: Any, what: str, tol: float = 1e-10) -> None:
    e = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), e, rtol=0, atol=tol * (np.abs(e).max() + 1.0), err_msg=what)


def _single_resumed(name: str, checkpoint: dict[str, Any], *, with_optimizer: bool = True) -> list[Any]:
    _, batches = _data(name)
    loss = LSoftmaxLoss(D, C, schedule=_schedule(), dtype=torch.float64, **_kind(name))
    loss.load_state_dict(checkpoint["head"])
    opt = _optimizer(name, loss.parameters(), resumed=with_optimizer)
    if with_optimizer:
        load_full_optimizer_state_dict(loss, opt, checkpoint["optimizer"])
    return _train(loss, opt, batches[BEFORE:], (N,), 0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_run_checkpointed_at_3_ranks_takes_the_same_next_steps_resumed_at_2_or_1(world, name) -> None:
    ranks = world["ranks"]
    want = ranks[0]["uninterrupted"][name]
    assert len(want) == AFTER and all(r["uninterrupted"][name] == [None] * AFTER for r in ranks[1:])
    checkpoint = torch.load(world["folder"] / f"{name}.pt")
    resumed = {
        "P=2": ranks[GROUPS[2][0]]["resumed"][name]["weights"],  # group rank 0 of ranks 1-2
        "P=1": ranks[GROUPS[1][0]]["resumed"][name]["weights"],
        "LSoftmaxLoss": _single_resumed(name, checkpoint),
    }
    assert ranks[2]["resumed"][name]["weights"] == [None] * AFTER
    for r in ranks:
        assert r["resumed"][name]["restored"] and r["resumed"][name]["iteration"] == BEFORE + AFTER
    for where, got in resumed.items():
        for step in range(AFTER):
            _close(got[step], want[step], f"{name} resumed in {where}: weight after step {BEFORE + step + 1}")
    # The optimizer's state matters: weights alone (a fresh optimizer) give other steps.
    fresh = _single_resumed(name, checkpoint, with_optimizer=False)
    assert np.abs(fresh[-1] - want[-1]).max() > 1e-4


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_gathered_state_is_the_single_process_optimizers_state(world, name) -> None:
    saved = torch.load(world["folder"] / f"{name}.pt")["optimizer"]
    w, batches = _data(name)
    loss = LSoftmaxLoss(D, C, schedule=_schedule(), dtype=torch.float64, **_kind(name))
    with torch.no_grad():
        loss.weight.copy_(torch.from_numpy(w))
    opt = _optimizer(name, loss.parameters())
    _train(loss, opt, batches[:BEFORE], (N,), 0)
    want = full_optimizer_state_dict(loss, opt)
    cls, kw, _ = OPTIMIZERS[name]
    assert saved["optimizer"] == want["optimizer"] == f"torch.optim.{cls.lower()}.{cls}"
    assert (saved["num_classes"], saved["subcenters"], saved["in_features"]) == (C, _kind(name)["subcenters"], D)
    assert saved["param_group"] == want["param_group"] and all(saved["param_group"][k] == v for k, v in kw.items())
    assert sorted(saved["state"]) == sorted(want["state"]) == sorted(opt.state[loss.weight])
    for key, value in want["state"].items():
        got = saved["state"][key]
        assert got.device.type == "cpu" and got.dtype == value.dtype and got.shape == value.shape, key
        if got.dim() == 0:
            assert got.item() == value.item() == BEFORE, key
        else:
            _close(got.numpy(), value.numpy(), f"{name} state[{key!r}]")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_single_process_optimizer_state_resumes_on_2_ranks(world, name) -> None:
    ranks = world["ranks"]
    want = ranks[0]["uninterrupted"][name]
    got = ranks[GROUPS[2][0]]["from_single"][name]
    for step in range(AFTER):
        _close(got[step], want[step], f"{name}: LSoftmaxLoss's run resumed at P=2, step {BEFORE + step + 1}")


def test_a_mismatch_between_the_ranks_raises_on_every_rank_naming_it_and_the_group_still_works(world) -> None:
    ranks = [r["mismatches"] for r in world["ranks"]]
    for r, got in enumerate(ranks):
        last = r == len(ranks) - 1
        for case, words in (("lr", ["param_group['lr'] differs", "rank 0: 0.3", "rank 2: 0.25"]),
                            ("step", ["state['step'] differs", '"value": 1.0', '"value": 2.0']),
                            ("class", ["optimizer differs", "torch.optim.sgd.SGD", "torch.optim.adam.Adam"])):  # fmt: skip
            kind, message = got[case]
            assert kind == "ValueError" and all(w in message for w in words), (r, case, message)
        own = {
            "no_weight": "optimizer (torch.optim.sgd.SGD) does not hold head.weight",
            "odd_shape": "optimizer (torch.optim.sgd.SGD).state[head.weight]['odd'] is a tensor of shape (3,)",
            "bad_dst": "dst",
        }
        for case, words in own.items():
            kind, message = got[case]
            assert kind == "ValueError", (r, case, message)
            if last:
                assert words in message, (r, case, message)
            else:
                assert message.startswith("rank 2 of the process group passed an invalid"), (r, case, message)
        assert got["other_dst"] == (
            "ValueError", "every rank must pass the same dst to full_optimizer_state_dict, got dst=[0, 0, 1] in rank order"
        )  # fmt: skip
        rows = (C, D)
        assert got["after"] == ({"momentum_buffer": rows} if r == 0 else None)
        full = got["full_at_1"]
        assert (full is not None) == (r == 1)
        if full is not None:
            assert {key: tuple(v.shape) for key, v in full["state"].items()} == {
                "step": (), "exp_avg": rows, "exp_avg_sq": rows}  # fmt: skip


def test_a_refused_load_names_the_problem_and_changes_nothing(world) -> None:
    for r in GROUPS[2]:
        got = world["ranks"][r]["refusals"]
        assert got["class"] == (
            "ValueError", "state was saved from a torch.optim.sgd.SGD but optimizer is a torch.optim.adam.Adam: its "
            "state would not mean the same")  # fmt: skip
        assert got["rows"][0] == "ValueError" and "state['state']['momentum_buffer'] is a tensor of shape (12, 5)" in (
            got["rows"][1]
        )  # fmt: skip
        assert got["num_classes"] == ("ValueError", "state has num_classes=13 but head has num_classes=14")
        assert got["hyper"][0] == "ValueError" and "hyper-parameters ['lookahead']" in got["hyper"][1]
        assert got["unchanged"]
    # In one process: keys missing from a non-empty state, and the optimizer after refusals.
    checkpoint = torch.load(world["folder"] / "adamw.pt")["optimizer"]
    loss = LSoftmaxLoss(D, C, margin=MARGIN, dtype=torch.float64)
    opt = _optimizer("adamw", loss.parameters())
    w, batches = _data()
    _train(loss, opt, batches[:1], (N,), 0)
    before = {key: v.clone() for key, v in opt.state[loss.weight].items()}
    group_before = {key: v for key, v in opt.param_groups[0].items() if key != "params"}
    lacking = {**checkpoint, "state": {k: v for k, v in checkpoint["state"].items() if k != "max_exp_avg_sq"}}
    with pytest.raises(ValueError, match=r"has keys \['exp_avg', 'exp_avg_sq', 'step'\] but optimizer "
                                         r"\(torch.optim.adamw.AdamW\) with these hyper-parameters keeps"):  # fmt: skip
        load_full_optimizer_state_dict(loss, opt, lacking)
    with pytest.raises(ValueError, match="state has subcenters=2 but head has subcenters=1"):
        load_full_optimizer_state_dict(loss, opt, {**checkpoint, "subcenters": 2})
    with pytest.raises(ValueError, match=r"state must be a dict of full_optimizer_state_dict's keys"):
        load_full_optimizer_state_dict(loss, opt, opt.state_dict())
    assert sorted(opt.state[loss.weight]) == sorted(before)
    assert all(torch.equal(opt.state[loss.weight][key], v) for key, v in before.items())
    assert {key: v for key, v in opt.param_groups[0].items() if key != "params"} == group_before


def test_a_single_process_loss_needs_no_group_and_refuses_what_has_no_layout() -> None:
    loss = LSoftmaxLoss(D, C, margin=MARGIN, dtype=torch.float64)
    opt = torch.optim.SGD(loss.parameters(), lr=0.1, momentum=0.9)
    empty = full_optimizer_state_dict(loss, opt)  # before the first step: no state yet
    assert empty["state"] == {} and empty["param_group"]["momentum"] == 0.9
    opt.state[loss.weight]["odd"] = torch.zeros(C, 1)
    with pytest.raises(ValueError, match=r"state\[head.weight\]\['odd'\] is a tensor of shape \(13, 1\), neither"):
        full_optimizer_state_dict(loss, opt)
    del opt.state[loss.weight]["odd"]
    with pytest.raises(ValueError, match=r"dst=1"):
        full_optimizer_state_dict(loss, opt, dst=1)
    other = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match=r"optimizer \(torch.optim.adam.Adam\) does not hold head.weight"):
        full_optimizer_state_dict(loss, other)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got builtins.dict"):
        load_full_optimizer_state_dict(loss, {}, empty)
    with pytest.raises(TypeError, match=r"head must be a ClassParallelLSoftmaxLoss or an LSoftmaxLoss"):
        full_optimizer_state_dict(torch.nn.Linear(D, C), opt)
