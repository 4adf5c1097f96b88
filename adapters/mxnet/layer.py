"""The L-Softmax layer as MXNet's CustomOp ``LSoftmax`` (the seed's operator, registered on
import): its validated parameters (:class:`LSoftmaxParams`), the beta schedule's step
counters, the operator (:class:`LSoftmaxOp`) and its shapes and types
(:class:`LSoftmaxProp`), and :func:`lsoftmax_symbol`, a checked ``mx.sym.Custom`` call.
The rules (training and evaluation, the step count, errors): the package docstring.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import mxnet as mx
import numpy as np

import lsoftmax_core as lsm
from lsoftmax_core.checks import check_arrays, check_integer, check_nonnegative

from ._bridge import _DTYPES, _dtype_names, _result_buffer, as_numpy, label_indices, output_view

__all__ = ["LSoftmaxOp", "LSoftmaxParams", "LSoftmaxProp", "OP_TYPE", "StepCounter", "lsoftmax_symbol"]

#: The CustomOp name, as in the seed.
OP_TYPE = "LSoftmax"


def _parse_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """CustomOpProp passes every keyword argument as a string; other callers pass numbers."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{name}={value!r} must be an integer >= {minimum}") from None
    return check_integer(name, value, minimum, maximum)


def _parse_nonneg(name: str, value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name}={value!r} must be a finite number >= 0") from None
    return check_nonnegative(name, value)


@dataclass(frozen=True)
class LSoftmaxParams:
    """The operator's validated keyword arguments (MXNet passes them all as strings)."""

    num_hidden: int
    margin: int = 2
    beta: float = 0.0
    scale: float = 1.0
    beta_min: float = 0.0
    start_step: int = 0
    step_key: str = ""

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> LSoftmaxParams:
        """Parse and check; errors name the argument and its value."""
        known = ("num_hidden", "margin", "beta", "scale", "beta_min", "start_step", "step_key")
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(f"LSoftmax got unknown argument(s) {unknown}; it takes {list(known)}")
        if "num_hidden" not in kwargs:
            raise TypeError("LSoftmax requires num_hidden (the number of classes C)")
        step_key = kwargs.get("step_key", "")
        if not isinstance(step_key, str):
            raise TypeError(f"step_key={step_key!r} must be a string")
        return cls(
            num_hidden=_parse_int("num_hidden", kwargs["num_hidden"], 1),
            margin=_parse_int("margin", kwargs.get("margin", 2), 1, lsm.MAX_MARGIN),
            beta=_parse_nonneg("beta", kwargs.get("beta", 0.0)),
            scale=_parse_nonneg("scale", kwargs.get("scale", 1.0)),
            beta_min=_parse_nonneg("beta_min", kwargs.get("beta_min", 0.0)),
            start_step=_parse_int("start_step", kwargs.get("start_step", 0), 0),
            step_key=step_key,
        )

    def schedule(self) -> lsm.ExponentialSchedule:
        return lsm.ExponentialSchedule(beta0=self.beta, scale=self.scale, beta_min=self.beta_min)

    def to_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``Custom(..., op_type='LSoftmax')``; repr keeps floats exact."""
        kw = {
            "num_hidden": str(self.num_hidden),
            "margin": str(self.margin),
            "beta": repr(self.beta),
            "scale": repr(self.scale),
            "beta_min": repr(self.beta_min),
        }
        if self.start_step:
            kw["start_step"] = str(self.start_step)
        if self.step_key:
            kw["step_key"] = self.step_key
        return kw



class StepCounter:
    """The iteration count t of the beta schedule; advanced once per training backward."""

    def __init__(self, step: int = 0) -> None:
        self._lock = threading.Lock()  # CustomOps of different devices run on different threads
        self._step = step

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        with self._lock:
            self._step = _parse_int("step", value, 0)

    def advance(self) -> None:
        with self._lock:
            self._step += 1


class _SharedSteps:
    """Counters that outlive operator instances, keyed by (step_key, device).

    Used by :class:`LSoftmaxDense`, whose operator is re-created per call when imperative
    or hybridised without static_alloc; one counter per device so that data-parallel
    training advances each by one per iteration, as the seed's per-device operators did.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start: dict[str, int] = {}
        self._counters: dict[tuple[str, str], StepCounter] = {}

    def counter(self, key: str, device: str) -> StepCounter:
        with self._lock:
            c = self._counters.get((key, device))
            if c is None:
                c = self._counters[(key, device)] = StepCounter(self._start.get(key, 0))
            return c

    def get(self, key: str) -> int:
        with self._lock:
            steps = [c.step for (k, _), c in self._counters.items() if k == key]
            return max(steps, default=self._start.get(key, 0))

    def set(self, key: str, step: int) -> None:
        with self._lock:
            self._start[key] = step
            for (k, _), c in self._counters.items():
                if k == key:
                    c.step = step

    def drop(self, key: str) -> None:
        with self._lock:
            self._start.pop(key, None)
            for k in [k for k in self._counters if k[0] == key]:
                del self._counters[k]


_SHARED_STEPS = _SharedSteps()



class LSoftmaxOp(mx.operator.CustomOp):  # type: ignore[misc]
    """Converts MXNet's arrays and calls lsoftmax_core; holds the beta-schedule counter."""

    def __init__(self, params: LSoftmaxParams, counter: StepCounter) -> None:
        super().__init__()
        self.params = params
        self.schedule = params.schedule()
        self.counter = counter
        # (margin, beta, is_train) of the last forward: backward differentiates exactly that.
        self._last: tuple[int, float, bool] | None = None

    def forward(
        self, is_train: bool, req: list[str], in_data: list[Any], out_data: list[Any], aux: list[Any]
    ) -> None:
        x = as_numpy(in_data[0], "data")
        w = as_numpy(in_data[2], "weight")
        label = label_indices(as_numpy(in_data[1], "label"), self.params.num_hidden)
        if is_train:
            margin, beta = self.params.margin, self.schedule(self.counter.step)
        else:
            margin, beta = 1, 0.0  # evaluation: plain logits x @ w.T (margin 1 is exactly that)
        self._last = (margin, beta, bool(is_train))
        if req[0] == "null":
            return
        # label_indices checked the label values; the rest is checked here, once.
        p = check_arrays(x, w, label, margin, beta, dtypes=_DTYPES)
        buf = _result_buffer(out_data[0], req[0])
        # The buffer has the shape and dtype infer_shape/infer_type gave it; add_margin
        # checks it again (shape, dtype, no overlap with the inputs) before its own writes.
        logits = np.matmul(x, w.T, out=output_view(buf))
        lsm.add_margin(logits, x, w, label, margin=margin, beta=beta, checked=p)
        if buf is not out_data[0]:
            self.assign(out_data[0], req[0], buf)

    def backward(
        self,
        req: list[str],
        out_grad: list[Any],
        in_data: list[Any],
        out_data: list[Any],
        in_grad: list[Any],
        aux: list[Any],
    ) -> None:
        if self._last is None:
            raise RuntimeError("LSoftmax backward called before forward")
        margin, beta, trained = self._last
        g = as_numpy(out_grad[0], "out_grad")
        x = as_numpy(in_data[0], "data")
        w = as_numpy(in_data[2], "weight")
        label = label_indices(as_numpy(in_data[1], "label"), self.params.num_hidden)
        if req[0] != "null" or req[2] != "null":
            p = check_arrays(x, w, label, margin, beta, dtypes=_DTYPES, grad_logits=g)
            bufs = [_result_buffer(in_grad[i], req[i]) for i in (0, 2)]
            grad_x = np.matmul(g, w, out=output_view(bufs[0]))
            grad_w = np.matmul(g.T, x, out=output_view(bufs[1]))
            lsm.add_margin_grad(grad_x, grad_w, g, x, w, label, margin=margin, beta=beta, checked=p)
            for i, buf in zip((0, 2), bufs):
                if buf is not in_grad[i]:
                    self.assign(in_grad[i], req[i], buf)  # nothing for 'null'
        if req[1] in ("write", "inplace"):
            in_grad[1][:] = 0  # labels are not differentiable; never leave the buffer uninitialised
        if trained:
            self.counter.advance()  # the seed's once-per-iteration annealing step


@mx.operator.register(OP_TYPE)
class LSoftmaxProp(mx.operator.CustomOpProp):  # type: ignore[misc]
    """Shapes, types and arguments of ``LSoftmax``: inputs (data, label, weight), output (N, C)."""

    def __init__(self, **kwargs: str) -> None:
        super().__init__(need_top_grad=True)
        self.params: LSoftmaxParams | None = None
        self._error: Exception | None = None
        try:
            self.params = LSoftmaxParams.from_kwargs(**kwargs)
        except Exception as e:  # noqa: BLE001
            # MXNet ignores an exception escaping this constructor and then dereferences an
            # uninitialised handle (segfault); keep it and raise it from list_arguments.
            self._error = e

    def _checked(self) -> LSoftmaxParams:
        if self._error is not None:
            raise self._error
        if self.params is None:  # unreachable: set in __init__ unless _error is
            raise RuntimeError("LSoftmax has no parameters")
        return self.params

    def list_arguments(self) -> list[str]:
        self._checked()
        return ["data", "label", "weight"]

    def list_outputs(self) -> list[str]:
        return ["output"]

    def declare_backward_dependency(
        self, out_grad: list[int], in_data: list[int], out_data: list[int]
    ) -> list[int]:
        return [*out_grad, *in_data]  # the logits themselves are not needed for backward

    def infer_shape(self, in_shape: list[list[int]]) -> tuple[list[Any], list[Any], list[Any]]:
        p = self._checked()
        dshape, lshape, _ = in_shape
        if len(dshape) != 2:
            raise ValueError(f"data must be 2-D (N, D), got shape {tuple(dshape)}")
        n, d = dshape
        if lshape and tuple(lshape) != (n,):
            raise ValueError(f"label must have shape (N,) = ({n},), got shape {tuple(lshape)}")
        return [[n, d], [n], [p.num_hidden, d]], [[n, p.num_hidden]], []

    def infer_type(self, in_type: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        dtype = in_type[0] if in_type[0] is not None else in_type[2]
        if dtype is not None and np.dtype(dtype) not in _DTYPES:
            raise TypeError(f"data dtype {np.dtype(dtype)} is not supported ({_dtype_names()})")
        label_type = in_type[1] if in_type[1] is not None else dtype
        return [dtype, label_type, dtype], [dtype], []

    def create_operator(self, ctx: Any, in_shapes: list[list[int]], in_dtypes: list[int]) -> LSoftmaxOp:
        p = self._checked()
        if ctx.device_type != "cpu":
            raise ValueError(f"LSoftmax's MXNet adapter runs on CPU only (NumPy backend), got ctx={ctx}")
        if p.step_key:
            counter = _SHARED_STEPS.counter(p.step_key, str(ctx))
        else:
            counter = StepCounter(p.start_step)
        return LSoftmaxOp(p, counter)


def lsoftmax_symbol(
    data: Any,
    label: Any,
    weight: Any = None,
    *,
    num_hidden: int,
    margin: int = 2,
    beta: float = 0.0,
    scale: float = 1.0,
    beta_min: float = 0.0,
    start_step: int = 0,
    name: str | None = None,
) -> Any:
    """``mx.sym.Custom(..., op_type='LSoftmax')`` with the arguments checked here first.

    Raises ValueError/TypeError naming a bad argument (the plain Custom call would only
    raise a generic MXNetError).  Without ``weight`` MXNet creates ``<name>_weight``.
    """
    p = LSoftmaxParams.from_kwargs(
        num_hidden=num_hidden, margin=margin, beta=beta, scale=scale, beta_min=beta_min, start_step=start_step
    )
    inputs = {"data": data, "label": label}
    if weight is not None:
        inputs["weight"] = weight
    return mx.sym.Custom(op_type=OP_TYPE, name=name, **inputs, **p.to_kwargs())
