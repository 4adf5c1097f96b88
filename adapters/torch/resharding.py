"""Optimizer state of the class-parallel head at any world size: gather it into the full
(num_classes·k, in_features) layout on one rank, and load a rank's rows of it back.

The full optimizer state is a plain dict (``torch.save``-able, CPU tensors)::

    {"optimizer": "torch.optim.adam.Adam",          # the optimizer's class, module and name
     "num_classes": C, "subcenters": k, "in_features": D,
     "param_group": {"lr": ..., "betas": ..., ...},  # the hyper-parameters of the weight's group
     "state": {"step": tensor(3.),                   # a scalar: the same on every rank, kept once
               "exp_avg": (C·k, D) tensor, ...}}     # a tensor shaped like the weight: its rows

A state tensor shaped like the rank's weight holds one value per weight element, so its
rows follow the weight's rows (SGD's ``momentum_buffer``; Adam's and AdamW's ``exp_avg``,
``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq``); a 0-d tensor or a plain value is a
scalar (Adam's ``step``).  Any other shape has no known layout and is refused, so an
optimizer that keeps factored or blocked statistics (Adafactor, Shampoo) is not resharded
silently wrong.

Both functions also take a single-process :class:`LSoftmaxLoss`, whose weight (and so its
optimizer state) is already full: its optimizer state converts to this format with no
process group, and this format loads into it, so a run moves between one process and a
class-parallel group in either direction.
"""

from __future__ import annotations

import copy
import hashlib
import json
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lsoftmax_core.checks import check_integer

__all__ = ["full_optimizer_state_dict", "load_full_optimizer_state_dict"]

# torch >= 2.13 names the tensor collectives *_single; the older names warn there.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_KEYS = ("optimizer", "num_classes", "subcenters", "in_features", "param_group", "state")
_ERRORS = {1: TypeError, 2: ValueError}


# The state keys a non-empty state of the optimizers this module is tested with must have,
# from the hyper-parameters of its group (an optimizer of another class is checked against
# the state it already holds, if any).  A state that lacks one would fail in the next step(),
# after the load had changed the optimizer.
def _adam_keys(group: dict[str, Any]) -> set[str]:
    return {"step", "exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if group.get("amsgrad") else [])}


_EXPECTED_KEYS = {
    "torch.optim.sgd.SGD": lambda g: {"momentum_buffer"} if g.get("momentum", 0) != 0 else set(),
    "torch.optim.adam.Adam": _adam_keys,
    "torch.optim.adamw.AdamW": _adam_keys,
}


@dataclass
class _Layout:
    """Where the head's rows lie in the full weight, and its group (None: a single process)."""

    weight: Tensor
    num_classes: int
    subcenters: int
    in_features: int
    class_start: int
    class_stop: int
    parallel: bool = False  # a class-parallel head (its group may be the default one, None)
    group: Any = None
    world_size: int = 1
    rank: int = 0


def _layout(head: Any) -> _Layout:
    from .modules import LSoftmaxLoss
    from .parallel import ClassParallelLSoftmaxLoss  # parallel imports this module

    if isinstance(head, ClassParallelLSoftmaxLoss):
        return _Layout(
            head.weight, head.num_classes, head.subcenters, head.in_features, head.class_start, head.class_stop,
            True, head.process_group, head.world_size, head.rank,
        )  # fmt: skip
    if isinstance(head, LSoftmaxLoss):
        return _Layout(head.weight, head.num_classes, head.subcenters, head.in_features, 0, head.num_classes)
    raise TypeError(
        f"head must be a ClassParallelLSoftmaxLoss or an LSoftmaxLoss, got {type(head).__module__}."
        f"{type(head).__qualname__}"
    )


def _name(optimizer: Any) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _weight_group(optimizer: Any, weight: Tensor) -> dict[str, Any]:
    """The param group of ``optimizer`` that holds ``weight``; an error naming optimizer if none."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {_name(optimizer)}")
    for group in optimizer.param_groups:
        if any(p is weight for p in group["params"]):
            return group
    raise ValueError(
        f"optimizer ({_name(optimizer)}) does not hold head.weight in any of its {len(optimizer.param_groups)} "
        "param groups: pass the optimizer that updates the head's weight"
    )


def _is_scalar(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.dim() == 0
    return value is None or isinstance(value, (numbers.Number, str))


def _split(state: dict[Any, Any], shape: tuple[int, ...], where: str) -> tuple[list[str], list[str]]:
    """The keys of the row tensors (shaped ``shape``) and of the scalars, sorted; a
    ValueError naming the key for a value of another shape or kind."""
    rows, scalars = [], []
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{where} has a key {key!r} that is not a str")
        if isinstance(value, Tensor) and tuple(value.shape) == shape:
            rows.append(key)
        elif _is_scalar(value):
            scalars.append(key)
        else:
            what = (
                f"a tensor of shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise ValueError(
                f"{where}[{key!r}] is {what}, neither shaped like the weight {shape} (one value per weight element) "
                "nor a scalar: its layout across the ranks is unknown, so it cannot be resharded"
            )
    return sorted(rows), sorted(scalars)


def _plain(value: Any) -> Any:
    """A JSON value for comparing ``value`` across ranks (exactly: floats by their repr)."""
    if isinstance(value, Tensor):
        return {"tensor": str(value.dtype), "value": value.detach().cpu().tolist()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _cpu_copy(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, Tensor) else copy.deepcopy(value)


# Gathering ----------------------------------------------------------------------------------


def _describe(
    lay: _Layout, optimizer: Any, group: dict[str, Any], rows: list[str], scalars: list[str]
) -> list[Any]:
    """What every rank must share, as ``[name, value]`` pairs in the order an error names the
    first difference: the optimizer, the head's layout, the group's hyper-parameters, the
    state's keys, its scalars' values and its rows' dtypes."""
    state = optimizer.state.get(lay.weight, {})
    out: list[Any] = [
        ["optimizer", _name(optimizer)], ["subcenters", lay.subcenters], ["num_classes", lay.num_classes],
        ["in_features", lay.in_features], ["weight dtype", str(lay.weight.dtype)],
    ]  # fmt: skip
    out += [[f"param_group[{key!r}]", _plain(group[key])] for key in sorted(group) if key != "params"]
    out.append(["the state's keys", sorted(rows + scalars)])
    out += [[f"state[{key!r}]", _plain(state[key])] for key in scalars]
    out += [[f"state[{key!r}].dtype", str(state[key].dtype)] for key in rows]
    return out


def _digest(description: list[Any]) -> int:
    text = json.dumps(description).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _gather_descriptions(lay: _Layout, description: list[Any]) -> list[list[Any]]:
    """Every rank's description (an error path only): their lengths, then their bytes."""
    text = json.dumps(description).encode()
    device = lay.weight.device
    sizes = torch.empty(lay.world_size, dtype=torch.int64, device=device)
    _all_gather(sizes, torch.tensor([len(text)], dtype=torch.int64, device=device), group=lay.group)
    words = -(-int(sizes.max()) // 8)
    mine = np.zeros(words * 8, dtype=np.uint8)
    mine[: len(text)] = np.frombuffer(text, dtype=np.uint8)
    every = torch.empty(lay.world_size * words, dtype=torch.int64, device=device)
    _all_gather(every, torch.from_numpy(mine.view(np.int64)).to(device), group=lay.group)
    raw = every.cpu().numpy().view(np.uint8).reshape(lay.world_size, words * 8)
    return [json.loads(bytes(raw[r, : int(n)])) for r, n in enumerate(sizes.tolist())]


def _compare_ranks(lay: _Layout, problem: Exception | None, dst: int, description: list[Any]) -> None:
    """All-gather every rank's (problem, dst, digest of its description) and raise on every
    rank if one has a problem or they differ, so that no rank is left waiting in a send."""
    code = 0 if problem is None else (1 if isinstance(problem, TypeError) else 2)
    mine = torch.tensor([code, dst, _digest(description) if code == 0 else 0], device=lay.weight.device)
    every = torch.empty(3 * lay.world_size, dtype=torch.int64, device=lay.weight.device)
    _all_gather(every, mine, group=lay.group)
    table = every.view(lay.world_size, 3).tolist()
    if problem is not None:
        raise problem
    for r, (theirs, _, _) in enumerate(table):
        if theirs:
            raise _ERRORS[theirs](
                f"rank {r} of the process group passed an invalid optimizer, dst or state to "
                "full_optimizer_state_dict (its own error says what); every rank raises so that none waits for it"
            )
    dsts = [row[1] for row in table]
    if len(set(dsts)) > 1:
        raise ValueError(
            f"every rank must pass the same dst to full_optimizer_state_dict, got dst={dsts} in rank order"
        )
    if len({row[2] for row in table}) == 1:
        return
    every_description = _gather_descriptions(lay, description)
    for i, (name, own) in enumerate(description):
        values = [
            d[i][1] if i < len(d) and d[i][0] == name else "(another layout)" for d in every_description
        ]
        if any(v != own for v in values):
            shown = ", ".join(f"rank {r}: {json.dumps(v)}" for r, v in enumerate(values))
            raise ValueError(
                f"every rank's optimizer must hold the same kind of state for head.weight (same optimizer class, "
                f"hyper-parameters and steps): {name} differs, {shown}"
            )
    raise ValueError(
        f"every rank's optimizer must hold the same kind of state for head.weight: {every_description}"
    )


def full_optimizer_state_dict(head: Any, optimizer: Any, dst: int = 0) -> dict[str, Any] | None:
    """Collective over ``head``'s group (every rank calls it): ``optimizer``'s state for
    ``head.weight`` in the full layout (see the module) on rank ``dst`` of the group, None
    on the others.  Rows travel like :meth:`ClassParallelLSoftmaxLoss.full_state_dict`'s
    weight, one shard at a time point to point to ``dst``, per state tensor.

    The ranks first compare their dst, the optimizer's class, the hyper-parameters of the
    group holding the weight, the state's keys, scalars (``step``) and dtypes: a mismatch,
    an optimizer that does not hold ``head.weight`` or a state tensor of an unknown shape
    raises on every rank (ValueError/TypeError), before any row moves.  ``head`` may be a
    single-process :class:`LSoftmaxLoss` (no collective; dst must be 0)."""
    lay = _layout(head)
    problem: Exception | None = None
    description: list[Any] = []
    rows: list[str] = []
    scalars: list[str] = []
    group: dict[str, Any] = {}
    try:
        dst = check_integer("dst", dst, 0, lay.world_size - 1)
        group = _weight_group(optimizer, lay.weight)
        state = optimizer.state.get(lay.weight, {})
        rows, scalars = _split(
            state, tuple(lay.weight.shape), f"optimizer ({_name(optimizer)}).state[head.weight]"
        )
        description = _describe(lay, optimizer, group, rows, scalars)
    except (TypeError, ValueError) as e:
        problem, dst = e, -1
    if lay.parallel:
        _compare_ranks(lay, problem, dst, description)
    elif problem is not None:  # a single process: nobody to tell
        raise problem
    state = optimizer.state.get(lay.weight, {})
    k, width = lay.subcenters, lay.in_features
    full: dict[str, Tensor] = {}
    if lay.rank == dst:
        for key in rows:
            full[key] = torch.empty((lay.num_classes * k, width), dtype=state[key].dtype)
            full[key][lay.class_start * k : lay.class_stop * k] = state[key].detach().cpu()
    glob = (lambda r: r) if lay.group is None else (lambda r: dist.get_global_rank(lay.group, r))
    from .parallel import ClassParallelLSoftmaxLoss

    for key in rows:  # the same order on every rank: the keys were compared
        mine = state[key].detach()
        for r in range(lay.world_size):
            if r == dst:
                continue
            start, stop = ClassParallelLSoftmaxLoss.shard_bounds(lay.num_classes, lay.world_size, r)
            if lay.rank == r:
                dist.send(mine.contiguous(), dst=glob(dst), group=lay.group)
            elif lay.rank == dst:
                buf = mine.new_empty(((stop - start) * k, width))
                dist.recv(buf, src=glob(r), group=lay.group)
                full[key][start * k : stop * k] = buf.cpu()
    if lay.rank != dst:
        return None
    return {
        "optimizer": _name(optimizer), "num_classes": lay.num_classes, "subcenters": k, "in_features": width,
        "param_group": {key: _cpu_copy(v) for key, v in group.items() if key != "params"},
        "state": {**{key: _cpu_copy(state[key]) for key in scalars}, **full},
    }  # fmt: skip


# Loading ------------------------------------------------------------------------------------


def _placed(value: Any, key: str, weight: Tensor, group: dict[str, Any]) -> Any:
    """A saved scalar where torch's ``Optimizer.load_state_dict`` puts it: ``step`` stays a
    CPU tensor unless the group is capturable or fused (then float32 on the weight's device);
    another floating tensor takes the weight's dtype and device."""
    if not isinstance(value, Tensor):
        return copy.deepcopy(value)
    if key == "step":
        if group.get("capturable") or group.get("fused"):
            return value.to(dtype=torch.float32, device=weight.device, copy=True)
        return value.detach().clone()
    dtype = weight.dtype if value.is_floating_point() else value.dtype
    return value.to(dtype=dtype, device=weight.device, copy=True)


def load_full_optimizer_state_dict(head: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load this rank's rows of a full optimizer state (:func:`full_optimizer_state_dict`)
    into ``optimizer``: ``optimizer.state[head.weight]`` becomes rows ``[class_start·k,
    class_stop·k)`` of each row tensor (whole classes of k rows, copied, in the weight's
    dtype and on its device) and the scalars, replacing what it held, and the group holding
    the weight takes the saved hyper-parameters (lr, betas, momentum, weight decay, ...;
    one the state lacks keeps its value).  At any world size, no collective: each rank calls
    it (e.g. on ``torch.load(path, mmap=True)``).  Everything is checked first (the
    optimizer's class, num_classes, subcenters and in_features, the row tensors' shapes,
    the state's keys, the hyper-parameters' names): a refused state changes nothing.
    ``head`` may be a single-process :class:`LSoftmaxLoss`."""
    lay = _layout(head)
    group = _weight_group(optimizer, lay.weight)
    name = _name(optimizer)
    if not isinstance(state, dict) or set(state) != set(_KEYS):
        keys = sorted(state, key=str) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"state must be a dict of full_optimizer_state_dict's keys {list(_KEYS)}, got {keys}"
        )
    if state["optimizer"] != name:
        raise ValueError(
            f"state was saved from a {state['optimizer']} but optimizer is a {name}: its state would not mean the same"
        )
    for key in ("num_classes", "subcenters", "in_features"):
        if state[key] != getattr(lay, key):
            raise ValueError(f"state has {key}={state[key]!r} but head has {key}={getattr(lay, key)!r}")
    saved_group, saved_state = state["param_group"], state["state"]
    if not isinstance(saved_group, dict) or not isinstance(saved_state, dict):
        raise ValueError("state['param_group'] and state['state'] must be dicts")
    unknown = sorted(set(saved_group) - (set(group) - {"params"}), key=str)
    if unknown:
        raise ValueError(
            f"state['param_group'] has hyper-parameters {unknown} that optimizer ({name}) does not have "
            f"(it has {sorted(set(group) - {'params'})})"
        )
    k = lay.subcenters
    full_shape = (lay.num_classes * k, lay.in_features)
    rows, scalars = _split(saved_state, full_shape, "state['state']")
    merged = {**group, **saved_group}
    current = optimizer.state.get(lay.weight, {})
    expected = _EXPECTED_KEYS[name](merged) if name in _EXPECTED_KEYS else (set(current) if current else None)
    if saved_state and expected is not None and set(saved_state) != expected:
        raise ValueError(
            f"state['state'] has keys {sorted(saved_state)} but optimizer ({name}) with these hyper-parameters "
            f"keeps {sorted(expected)} for a parameter"
        )
    new = {key: _placed(saved_state[key], key, lay.weight, merged) for key in scalars}
    for key in rows:
        part = saved_state[key][lay.class_start * k : lay.class_stop * k]
        dtype = lay.weight.dtype if part.is_floating_point() else part.dtype
        new[key] = part.to(device=lay.weight.device, dtype=dtype, copy=True).contiguous()
    # Nothing above changed the optimizer; from here on nothing can fail.
    optimizer.state[lay.weight] = new
    for key, value in saved_group.items():
        own = group[key]  # a tensor hyper-parameter (a tensor lr) stays on its device
        group[key] = value.to(own.device, copy=True) if isinstance(own, Tensor) and isinstance(value, Tensor) else (
            _cpu_copy(value)
        )  # fmt: skip
