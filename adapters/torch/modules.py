"""The modules: :class:`LSoftmaxLinear` (a layer giving logits) and :class:`LSoftmaxLoss`
(the fused loss with its class weights), both annealing beta with a schedule.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsoftmax_core.checks import check_beta, check_integer
from lsoftmax_core.margins import Margin, margin_from_dict, margin_of
from lsoftmax_core.schedule import ConstantSchedule, Schedule, check_schedule, schedule_from_dict

from . import sampling
from ._bridge import _check_subcenters, _resolve_margin
from .layer import lsoftmax
from .loss import _REDUCTIONS, lsoftmax_cross_entropy

__all__ = ["LSoftmaxLinear", "LSoftmaxLoss"]


def _margin_state(margin: int | Margin) -> int | dict[str, Any]:
    """A module's margin as its checkpoint keeps it: the int, or the object's ``to_dict()``."""
    return margin.to_dict() if isinstance(margin, Margin) else margin


def _margin_value(state: object) -> Margin:
    """The margin a checkpoint's (or a module's) margin means, for a comparison by value
    (an int m and ``LSoftmax(m)`` are the same margin); a TypeError/ValueError otherwise."""
    return margin_from_dict(state) if isinstance(state, Mapping) else margin_of(state)


def _plain_operands(x: Tensor, weight: Tensor, margin: int | Margin) -> tuple[Tensor, Tensor]:
    """The rows a kind's plain logits multiply (the core's ``normalized``, in torch for
    autograd): s x/|x| for the cosine kinds, w/|w| for SphereFace and the cosine kinds, a
    zero row staying 0; x and weight themselves for L-Softmax."""
    if isinstance(margin, Margin) and margin.normalizes_features and margin.scale is not None:
        x = F.normalize(x, dim=1) * margin.scale
    if isinstance(margin, Margin) and margin.normalizes_weights:
        weight = F.normalize(weight, dim=1)
    return x, weight


def _class_logits(logits: Tensor, subcenters: int) -> Tensor:
    """(N, C·k) plain logits of the centres -> (N, C): each class's largest centre (as the
    loss takes a class's cosine; the kinds that normalise the weights have a positive scale,
    so the largest logit is the largest cosine)."""
    if subcenters == 1:
        return logits
    return logits.unflatten(1, (-1, subcenters)).amax(dim=2)


# Settings a checkpoint may lack, and what its absence means (checkpoints saved before them).
_SAVED_DEFAULTS: dict[str, Any] = {"subcenters": 1}


class _AnnealedHead(nn.Module):
    """What LSoftmaxLinear and LSoftmaxLoss share: a (C·k, D) ``weight`` initialised like
    nn.Linear's (k = ``subcenters`` rows per class, 1 but for the losses), the margin, and
    beta following a schedule of the iteration, saved in ``state_dict`` (see
    :class:`LSoftmaxLinear` for the rules)."""

    _noun = "layer"  # how error messages call the module

    def __init__(
        self,
        sizes: dict[str, int],
        *,
        margin: int | Margin,
        schedule: Schedule | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        subcenters: int = 1,
    ) -> None:
        super().__init__()
        for name, v in sizes.items():
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        in_features, out_features = (int(v) for v in sizes.values())
        resolved = _resolve_margin(margin)  # the core's errors naming margin
        #: Centres per class (the losses' ``subcenters``): the weight has out_features·k rows.
        self.subcenters = _check_subcenters(subcenters, resolved)
        #: L-Softmax's int m, or the margin object as given (LSoftmax(m) included).
        self.margin: int | Margin = margin if isinstance(margin, Margin) else resolved
        rows = out_features * self.subcenters
        self.weight = nn.Parameter(torch.empty((rows, in_features), device=device, dtype=dtype))
        # The iteration is a Python int, not a buffer: reading a device buffer to compute
        # beta would synchronise the GPU every step.  The current beta is mirrored in a
        # CPU tensor that step() updates in place, so a compiled forward reads it as a
        # graph input and does not recompile when beta changes.
        self._iteration = 0
        self._beta_tensor = torch.zeros((), dtype=torch.float64)
        self.schedule = ConstantSchedule(0.0) if schedule is None else schedule
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: uniform in ±1/sqrt(in_features)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @property
    def schedule(self) -> Schedule:
        """The lsoftmax_core schedule giving beta as a function of the iteration."""
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: Schedule) -> None:
        schedule = check_schedule(schedule)
        self._check_beta_at(schedule, self._iteration)  # before the module changes
        self._schedule = schedule
        self._sync_beta()

    @property
    def iteration(self) -> int:
        """The number of :meth:`step` calls so far."""
        return self._iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        iteration = check_integer("iteration", value, 0)
        self._check_beta_at(self._schedule, iteration)
        self._iteration = iteration
        self._sync_beta()

    @property
    def beta(self) -> float:
        """The current beta, ``schedule(iteration)``."""
        return self._check_beta_at(self._schedule, self._iteration)

    def step(self) -> None:
        """Advance the schedule by one iteration; call once per optimizer step."""
        self._check_beta_at(self._schedule, self._iteration + 1)
        self._iteration += 1
        self._sync_beta()

    @staticmethod
    def _check_beta_at(schedule: Schedule, iteration: int) -> float:
        """``schedule(iteration)``, which must be a valid beta (a user's schedule may not be)."""
        value = schedule(iteration)
        try:
            return check_beta(value)
        except (TypeError, ValueError) as e:
            raise type(e)(
                f"schedule={schedule!r} gave an invalid beta at iteration {iteration}: {e}"
            ) from None

    def _sync_beta(self) -> None:
        with torch.no_grad():
            self._beta_tensor.fill_(self.beta)

    def _config(self) -> dict[str, Any]:
        """Settings a checkpoint must agree with (saved in the extra state; a margin object
        as its ``to_dict()``)."""
        return {"margin": _margin_state(self.margin)}

    def get_extra_state(self) -> dict[str, Any]:
        return {**self._config(), "iteration": self._iteration, "schedule": self._schedule.to_dict()}

    def _mismatch(self, key: str, saved: Any, own: Any) -> str:
        """The message for a checkpoint whose setting ``key`` differs from this module's."""
        return f"checkpoint has {key}={saved!r} but this {self._noun} has {key}={own!r}"

    def _restored(self, state: Any) -> tuple[int, Schedule]:
        """The iteration and schedule a checkpoint's extra state restores: every check of
        the extra state, changing nothing."""
        if not isinstance(state, dict) or not {"iteration", "schedule"} <= set(state):
            raise ValueError(
                f"{type(self).__name__} extra state must be a dict with 'iteration' and 'schedule', got {state!r}"
            )
        for key, own in self._config().items():
            saved = state.get(key, _SAVED_DEFAULTS.get(key, own))
            if key == "margin":
                self._check_margin(saved)
            elif saved != own:
                raise ValueError(self._mismatch(key, saved, own))
        saved = state["schedule"]
        own = self._schedule.to_dict()
        if saved == own:
            schedule = self._schedule  # also the one way to restore a schedule of the user's own
        else:
            try:
                schedule = check_schedule(schedule_from_dict(dict(saved)))
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"checkpoint has schedule {saved!r}, which cannot be rebuilt ({e}), and this {self._noun}'s "
                    f"schedule.to_dict() is {own!r}: construct the {self._noun} with the schedule the checkpoint "
                    "was saved with, then load_state_dict"
                ) from None
        iteration = check_integer("iteration", state["iteration"], 0)
        self._check_beta_at(schedule, iteration)
        return iteration, schedule

    def _check_margin(self, saved: Any) -> None:
        """A checkpoint's margin (an int, or a margin's ``to_dict()``) must be this module's
        by value; the error shows both as margins."""
        try:
            value = _margin_value(saved)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"checkpoint has margin={saved!r}, which is not a margin ({e}); this {self._noun} has "
                f"margin={self.margin!r}"
            ) from None
        if value != _margin_value(self.margin):
            raise ValueError(self._mismatch("margin", value if isinstance(saved, Mapping) else saved, self.margin))

    def set_extra_state(self, state: Any) -> None:
        iteration, schedule = self._restored(state)  # nothing changes on an error
        self._iteration = iteration
        self.schedule = schedule

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """torch's ``load_state_dict``, except that a strict load with missing or unexpected
        keys raises before anything is loaded (torch loads the rest first)."""
        if strict and isinstance(state_dict, Mapping):
            own = set(self.state_dict(keep_vars=True))
            missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
            if missing or unexpected:
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}: missing key(s) {missing}, "
                    f"unexpected key(s) {unexpected}; nothing was loaded (strict=False loads the keys that match)"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool, missing_keys: list[str],
        unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        # torch copies the weight first and calls set_extra_state last: everything a load can
        # refuse here (the extra state, the weight's type and shape) is checked first, so that
        # a refused checkpoint leaves the module as it was.
        keys = {name: prefix + name for name in ("weight", "_extra_state")}
        if keys["_extra_state"] in state_dict:
            self._restored(state_dict[keys["_extra_state"]])
        weight = state_dict.get(keys["weight"])
        if keys["weight"] in state_dict and not isinstance(weight, Tensor):
            raise TypeError(f"checkpoint's {keys['weight']} must be a torch.Tensor, got {type(weight).__name__}")
        if weight is not None and weight.shape != self.weight.shape:
            raise ValueError(
                f"checkpoint's {keys['weight']} has shape {tuple(weight.shape)} but this {self._noun}'s weight "
                f"has shape {tuple(self.weight.shape)}"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class LSoftmaxLinear(_AnnealedHead):
    """A bias-free linear layer whose target logit carries the L-Softmax angular margin.

    ``layer(x, target)`` in training mode returns ``lsoftmax(x, weight, target,
    margin=margin, beta=layer.beta)``; in eval mode it returns the plain logits
    ``x @ weight.T`` and ignores ``target`` (the margin only shapes training; the paper
    classifies with the plain inner products).

    ``margin``: an int (L-Softmax) or a margin object (``lsoftmax_core.SphereFace``,
    ``CosFace``, ``ArcFace``, ``CombinedMargin``, ``LSoftmax``), kept as ``layer.margin``
    and in ``state_dict`` (an object as its ``to_dict()``; a checkpoint of another margin is
    refused).  For a kind that normalises, the eval logits are that kind's plain logits,
    those of the normalised rows (``x @ normalize(weight).T`` for SphereFace,
    ``s * normalize(x) @ normalize(weight).T`` for the cosine kinds): the training logits
    without the margin.

    beta (lambda in the paper) follows ``schedule`` (default ``ConstantSchedule(0.0)``) as a
    function of ``layer.iteration``, the number of :meth:`step` calls: call ``layer.step()``
    once per optimizer step.  ``schedule`` is any :class:`lsoftmax_core.Schedule` (an
    object with ``beta(step)``, ``__call__(step)`` and ``to_dict()``), a built-in or your
    own.  The iteration and ``schedule.to_dict()`` are saved in ``state_dict``;
    ``load_state_dict`` restores the iteration and rebuilds a built-in schedule from its
    dict.  A schedule of your own cannot be rebuilt from a dict: the layer keeps its own
    schedule when its ``to_dict()`` equals the saved one, and refuses the checkpoint
    otherwise (construct the layer with the schedule the checkpoint was saved with).

    >>> import torch
    >>> import lsoftmax_core as lsm
    >>> from lsoftmax_core.adapters.torch import LSoftmaxLinear
    >>> layer = LSoftmaxLinear(4, 3, margin=2, schedule=lsm.ExponentialSchedule(beta0=8.0, scale=0.5))
    >>> logits = layer(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))  # training mode
    >>> layer.step(); layer.beta
    4.0
    >>> resumed = LSoftmaxLinear(4, 3, margin=2)
    >>> resumed.load_state_dict(layer.state_dict())
    <All keys matched successfully>
    >>> resumed.iteration, resumed.beta
    (1, 4.0)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        margin: int | Margin = 2,
        schedule: Schedule | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        sizes = {"in_features": in_features, "out_features": out_features}
        super().__init__(sizes, margin=margin, schedule=schedule, device=device, dtype=dtype)
        self.in_features, self.out_features = int(in_features), int(out_features)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        if not self.training:
            return F.linear(*_plain_operands(x, self.weight, self.margin))
        if target is None:
            raise ValueError(
                "target is required in training mode: call layer(x, target) with (N,) int64 class "
                "indices, or layer.eval() for plain logits"
            )
        return lsoftmax(x, self.weight, target, margin=self.margin, beta=self._beta_tensor)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"margin={self.margin!r}, schedule={self._schedule!r}"
        )


class LSoftmaxLoss(sampling.SampledHead, _AnnealedHead):
    """The L-Softmax loss with its class weights: ``loss(x, target)`` returns
    :func:`lsoftmax_cross_entropy` of the features ``x`` (N, in_features) against the
    module's ``weight`` (num_classes, in_features) at the current beta, never holding the
    (N, C) logits.  The same in training and eval mode (a loss; for predictions use
    :meth:`logits`).  CPU and CUDA, as :func:`lsoftmax_cross_entropy`.

    beta follows ``schedule`` exactly as in :class:`LSoftmaxLinear`: :meth:`step` once per
    optimizer step, ``iteration`` and ``beta``, both saved in ``state_dict`` with the
    schedule (and ``margin`` and ``normalize_weight``, which a checkpoint must match).

    ``normalize_weight=True`` is A-Softmax (SphereFace): the weight's rows are normalised
    (``F.normalize(weight, dim=1)``, differentiated by autograd) before the loss, so every
    class's logit is ``x·ŵ_j`` and only the angle separates the classes.  SphereFace anneals
    beta (its lambda) with ``lsoftmax_core.InverseSchedule(base=1000, gamma=0.12, power=1,
    beta_min=5)``.  ``reduction`` and ``ignore_index`` as for :func:`lsoftmax_cross_entropy`.

    ``margin``: an int (L-Softmax) or a margin object, as for :class:`LSoftmaxLinear`
    (``margin=lsoftmax_core.SphereFace(4)`` normalises the rows in the core instead;
    ``normalize_weight`` is then redundant).

    ``subcenters=k`` (default 1; a margin kind that normalises the weights): k centres per
    class (SubCenter-ArcFace), ``weight`` (num_classes·k, in_features) with class j's
    centres in rows j·k ... j·k + k - 1, as in :func:`lsoftmax_cross_entropy`; target and
    ``num_classes`` count classes, and :meth:`logits` gives each class's largest centre,
    (N, num_classes).  Saved in ``state_dict``: a checkpoint of another k is refused (one
    saved without it has k = 1).  An int margin with k > 1 is a ValueError naming
    subcenters.

    ``sample_rate`` in (0, 1] (default 1.0: every class) is Partial FC's class sampling:
    in training mode each forward's loss runs over every class that is a target in the
    batch plus uniformly drawn negatives, ``ceil(sample_rate * num_classes)`` classes in all
    (more when the targets alone exceed it), drawn from a generator seeded by ``(seed, 0,
    sample_step)``; ``sample_step`` counts the sampled forwards and is saved in
    ``state_dict``, so a run is reproducible.  The unsampled rows get exactly zero gradient;
    ``last_sampled`` holds the classes of the last forward, and :meth:`sampled_step` steps an
    optimizer on those rows only (Partial FC v1; a plain ``optimizer.step()`` is v2).  Eval
    mode and :meth:`logits` use every class; 1.0 is the unsampled loss bit for bit.  The
    rule and the conventions: ``adapters/torch/sampling.py``, ``docs/distributed.md``.

    >>> import torch
    >>> import lsoftmax_core as lsm
    >>> from lsoftmax_core.adapters.torch import LSoftmaxLoss
    >>> criterion = LSoftmaxLoss(4, 3, margin=4, normalize_weight=True,
    ...                          schedule=lsm.InverseSchedule(base=1000, gamma=0.12, power=1, beta_min=5))
    >>> loss = criterion(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> loss.backward(); criterion.weight.grad.shape
    torch.Size([3, 4])
    >>> criterion.step(); round(criterion.beta, 3)  # 1000 / (1 + 0.12)
    892.857
    """

    _noun = "loss"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        margin: int | Margin = 2,
        schedule: Schedule | None = None,
        normalize_weight: bool = False,
        reduction: str = "mean",
        ignore_index: int = -100,
        subcenters: int = 1,
        sample_rate: float = 1.0,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(normalize_weight, bool):
            raise TypeError(f"normalize_weight={normalize_weight!r} must be a bool")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} must be one of {_REDUCTIONS}")
        sizes = {"in_features": in_features, "num_classes": num_classes}
        super().__init__(
            sizes, margin=margin, schedule=schedule, device=device, dtype=dtype, subcenters=subcenters
        )  # fmt: skip
        self.in_features, self.num_classes = int(in_features), int(num_classes)
        self.normalize_weight = normalize_weight
        self.reduction = reduction
        self.ignore_index = check_integer("ignore_index", ignore_index, -(2**63), 2**63 - 1)
        self._init_sampling(sample_rate, seed)

    def _weight(self) -> Tensor:
        return F.normalize(self.weight, dim=1) if self.normalize_weight else self.weight

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        self.last_sampled = None
        if self._samples():
            return sampling.single_sampled_loss(self, x, target)
        return self._dense(x, target)

    def _dense(self, x: Tensor, target: Tensor) -> Tensor:
        """The loss over every class."""
        return lsoftmax_cross_entropy(
            x, self._weight(), target, margin=self.margin, beta=self._beta_tensor,
            reduction=self.reduction, ignore_index=self.ignore_index, subcenters=self.subcenters,
        )  # fmt: skip

    def logits(self, x: Tensor) -> Tensor:
        """The plain logits ``x @ weight.T`` (normalised rows with ``normalize_weight``; a
        kind that normalises: its own plain logits, as :class:`LSoftmaxLinear`'s eval mode),
        for predictions: the margin only shapes training.  (N, num_classes): with
        ``subcenters=k`` a class's logit is the largest of its k centres'."""
        return _class_logits(F.linear(*_plain_operands(x, self._weight(), self.margin)), self.subcenters)

    def _config(self) -> dict[str, Any]:
        return {
            "margin": _margin_state(self.margin), "normalize_weight": self.normalize_weight,
            "subcenters": self.subcenters,
        }  # fmt: skip

    def extra_repr(self) -> str:
        centres = f", subcenters={self.subcenters}" if self.subcenters > 1 else ""
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}{centres}, margin={self.margin!r}, "
            f"normalize_weight={self.normalize_weight}, reduction={self.reduction!r}, "
            f"{f'sample_rate={self.sample_rate}, seed={self.seed}, ' if self.sample_rate < 1 else ''}"
            f"schedule={self._schedule!r}"
        )
