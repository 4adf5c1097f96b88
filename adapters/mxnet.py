"""MXNet 1.9.1 adapter: the seed's ``LSoftmax`` CustomOp and a Gluon ``LSoftmaxDense`` block.

Importing this module registers a CustomOp named ``LSoftmax`` that is a drop-in for the
seed (luoyetx/mx-lsoftmax); the seed's own call works unchanged::

    fc = mx.sym.Custom(data=embedding, label=label, weight=weight, num_hidden=10,
                       beta=100, margin=2, scale=0.99, beta_min=0, op_type='LSoftmax')

Inputs are ``(data, label, weight)`` in that order: data (N, D), label (N,) class indices
(MXNet labels are usually floats), weight (num_hidden, D).  All the maths is
``lsoftmax_core.forward``/``backward`` on the NumPy backend, so this runs on CPU contexts
only (MXNet 1.9.1's CUDA wheels are CUDA 11; this project's GPU path is CuPy).

Semantics, as in the seed: training (``is_train``) gives the large-margin logits,
evaluation the plain ``x @ w.T``; beta (lambda, paper eq. 7) follows
``beta_t = max(beta * scale**t, beta_min)`` (:class:`lsoftmax_core.ExponentialSchedule`),
t counting the training backward passes.  The counter is explicit operator state, read at
forward and advanced once per training backward (which reuses its forward's beta).  An
executor (``simple_bind``, ``Module``) keeps one operator per device, so each device counts
its own iterations like the seed.  Imperative calls and non-static hybridised graphs make a
fresh operator per call, so :class:`LSoftmaxDense` keeps its counters outside it (per block
and device, found by the ``step_key`` argument) as ``block.step``.  MXNet is asynchronous:
the count advances when the backward has run on the engine, which the next forward waits
for through the weight the optimizer updates (Module.update, Trainer.step); without an
update in between, call ``mx.nd.waitall()`` (``block.step`` does so itself).

Data exchange.  MXNet 1.9.1 hands out DLPack *capsules* (``to_dlpack_for_read``), while
NumPy 1.23's ``np.from_dlpack`` wants an object with ``__dlpack__``/``__dlpack_device__``;
:func:`as_numpy` wraps the capsule, so data, weight and the incoming gradient reach the core
as read-only zero-copy views of MXNet's memory.  Labels are converted to an int64 copy
(:func:`label_indices`).  Results are computed in MXNet's own output buffers when MXNet asks
for them to be overwritten (``req == 'write'``, the default of ``simple_bind``, Module and
Gluon): :func:`output_view` gives a writeable view of the buffer, passed to the core as
``out=``.  For ``'add'`` (gradient accumulation) and ``'inplace'`` the core's results go
through ``self.assign``, one engine copy or add.

Errors.  MXNet 1.9.1 runs CustomOp callbacks behind ctypes: an exception raised inside them
is printed by MXNet and surfaces as a generic ``MXNetError`` (a ``RuntimeError``) whose text
does not contain the Python message, and an exception in ``CustomOpProp.__init__`` is
ignored and can crash the process.  So bad keyword arguments are stored by
:class:`LSoftmaxProp` and raised from ``list_arguments`` (MXNet prints the ``ValueError``
naming the argument, then raises ``MXNetError``); bad labels inside a graph do the same.
For a real ``ValueError``/``TypeError`` at the call site use :func:`lsoftmax_symbol` or
:class:`LSoftmaxDense` (both validate in Python first; the block also checks labels before
the operator runs when it is not hybridised).

Threads: the seed asks for ``MXNET_CPU_WORKER_NTHREADS >= 2`` before ``import mxnet`` for
CustomOps on CPU.  MXNet 1.9.1 runs CustomOps on their own threads and the tests pass either
way; the project's tests and nox session set it to 2 as the seed did.
"""

from __future__ import annotations

import atexit
import ctypes
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import mxnet as mx
import numpy as np
import numpy.typing as npt
from mxnet import gluon
from mxnet.base import _LIB, check_call

import lsoftmax_core as lsm
from lsoftmax_core.checks import check_integer, check_nonnegative

__all__ = [
    "FLOAT_DTYPES",
    "OP_TYPE",
    "LSoftmaxDense",
    "LSoftmaxOp",
    "LSoftmaxParams",
    "LSoftmaxProp",
    "StepCounter",
    "as_numpy",
    "label_indices",
    "lsoftmax_symbol",
    "output_view",
]

#: The CustomOp name, as in the seed.
OP_TYPE = "LSoftmax"

#: Floating dtypes the NumPy backend computes in.
FLOAT_DTYPES: tuple[type[Any], ...] = (np.float32, np.float64)

_DL_CPU = 1  # DLPack's kDLCPU device type

# MXNet 1.9.1 aborts or hangs at interpreter exit while CustomOp work is still queued
# (apache/mxnet#15310): drain the engine first.  atexit runs handlers last-in first-out,
# so this runs before MXNet's own shutdown hook, registered when mxnet was imported.
atexit.register(mx.nd.waitall)


# --------------------------------------------------------------------------- conversion


class _DLPackCapsule:
    """Presents one MXNet DLPack capsule through the ``__dlpack__`` protocol.

    ``np.from_dlpack`` in NumPy 1.23 accepts only such objects; it consumes the capsule
    (renaming it ``used_dltensor``) and calls MXNet's deleter when the view dies, so the
    NDArray's memory stays alive as long as the NumPy view does.
    """

    __slots__ = ("_capsule",)

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __dlpack__(self, stream: Any = None) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (_DL_CPU, 0)


def as_numpy(array: Any, name: str = "array") -> npt.NDArray[Any]:
    """A read-only NumPy view sharing memory with the CPU NDArray ``array`` (no copy).

    ``to_dlpack_for_read`` first waits for pending writes to ``array``.
    """
    _check_cpu_dense(array, name)
    return np.from_dlpack(_DLPackCapsule(mx.nd.to_dlpack_for_read(array)))


def _check_cpu_dense(array: Any, name: str) -> None:
    if not isinstance(array, mx.nd.NDArray):
        raise TypeError(
            f"{name} must be an mxnet NDArray, got {type(array).__module__}.{type(array).__qualname__}"
        )
    if array.context.device_type != "cpu":
        raise ValueError(f"{name} is on {array.context}: the MXNet adapter runs on CPU only (NumPy backend)")
    if array.stype != "default":
        raise TypeError(f"{name} must be a dense NDArray, got storage type {array.stype!r}")


def output_view(array: Any) -> npt.NDArray[Any]:
    """A writeable NumPy view of the dense CPU NDArray ``array`` that an operator is about to
    overwrite (its output, or an input gradient with ``req == 'write'``); no copy.

    NumPy's DLPack import is read-only, so the view is made from the buffer's address
    (``MXNDArrayGetData``), after ``MXNDArrayWaitToWrite`` has waited for every pending
    reader and writer of the array.  Valid while ``array`` lives: use it inside the call.
    """
    _check_cpu_dense(array, "output")
    check_call(_LIB.MXNDArrayWaitToWrite(array.handle))
    ptr = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(ptr)))
    shape = tuple(int(s) for s in array.shape)
    size = int(np.prod(shape))
    dtype = np.dtype(array.dtype)
    if size == 0:
        return np.empty(shape, dtype)
    buf = (ctypes.c_char * (size * dtype.itemsize)).from_address(ptr.value)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _as_ndarray(a: npt.NDArray[Any]) -> Any:
    """Wrap a freshly computed NumPy result as an NDArray without copying (it becomes read-only)."""
    return mx.nd.from_numpy(np.ascontiguousarray(a), zero_copy=True)


def label_indices(label: npt.NDArray[Any], num_classes: int) -> npt.NDArray[np.int64]:
    """Class indices as int64 from MXNet's (usually floating) labels, or a ValueError naming label.

    A label must be finite, integer-valued and in [0, num_classes).  The checks happen in
    float64 before the cast, because casting NaN, inf or out-of-range floats to int is
    undefined and could turn a bad label into a valid-looking index.
    """
    lab = np.asarray(label)
    if lab.ndim != 1:
        raise ValueError(f"label must be 1-D (N,), got shape {lab.shape}")
    if lab.dtype.kind in "iu":
        bad = (lab < 0) | (lab >= num_classes)
    elif lab.dtype.kind == "f":
        f = lab.astype(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(f) | (f != np.floor(f)) | (f < 0) | (f >= num_classes)
    else:
        raise TypeError(f"label must have an integer or floating dtype, got label.dtype={lab.dtype}")
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"label must hold integer class indices in [0, {num_classes}): label[{i}]={lab[i].item()!r}"
        )
    return lab.astype(np.int64)


# --------------------------------------------------------------------------- parameters


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


# --------------------------------------------------------------------------- step counters


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


# --------------------------------------------------------------------------- the CustomOp


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
        if req[0] == "write":
            lsm.forward(x, w, label, margin=margin, beta=beta, out=output_view(out_data[0]))
        elif req[0] != "null":
            self.assign(out_data[0], req[0], _as_ndarray(lsm.forward(x, w, label, margin=margin, beta=beta)))

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
        if req[0] == req[2] == "write":
            out = (output_view(in_grad[0]), output_view(in_grad[2]))
            lsm.backward(g, x, w, label, margin=margin, beta=beta, out=out)
        elif req[0] != "null" or req[2] != "null":
            grad_x, grad_w = lsm.backward(g, x, w, label, margin=margin, beta=beta)
            self.assign(in_grad[0], req[0], _as_ndarray(grad_x))
            self.assign(in_grad[2], req[2], _as_ndarray(grad_w))
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
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"data dtype {np.dtype(dtype)} is not supported (float32, float64)")
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


# --------------------------------------------------------------------------- Gluon


class LSoftmaxDense(gluon.HybridBlock):  # type: ignore[misc]
    """A Dense layer without bias whose target logit carries the L-Softmax margin.

    ``block(x, label)`` with x (N, in_units) and label (N,) returns (N, units) logits: the
    large-margin ones under ``autograd.record()`` (training), plain ``x @ w.T`` otherwise.
    The weight is (units, in_units) like ``gluon.nn.Dense``; ``in_units=0`` infers it.
    beta follows ``max(beta * scale**step, beta_min)``; ``step`` counts training backward
    passes and can be read or set (e.g. to resume from a checkpoint: it is not a Parameter,
    so save it next to the parameters).
    """

    def __init__(
        self,
        units: int,
        in_units: int = 0,
        margin: int = 2,
        beta: float = 0.0,
        scale: float = 1.0,
        beta_min: float = 0.0,
        weight_initializer: Any = None,
        dtype: Any = "float32",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._lsm = LSoftmaxParams.from_kwargs(
            num_hidden=_parse_int("units", units, 1),
            margin=margin,
            beta=beta,
            scale=scale,
            beta_min=beta_min,
            step_key=uuid.uuid4().hex,
        )
        in_units = _parse_int("in_units", in_units, 0)
        if np.dtype(dtype).type not in FLOAT_DTYPES:
            raise TypeError(f"dtype={dtype!r} is not supported (float32, float64)")
        self._units = self._lsm.num_hidden
        # Forget this block's counters with it; at interpreter exit there is nothing to free.
        weakref.finalize(self, _SHARED_STEPS.drop, self._lsm.step_key).atexit = False
        with self.name_scope():
            self.weight = self.params.get(
                "weight",
                shape=(self._units, in_units),
                init=weight_initializer,
                dtype=dtype,
                allow_deferred_init=True,
            )

    @property
    def margin(self) -> int:
        return self._lsm.margin

    @property
    def step(self) -> int:
        """Training iterations counted so far (the largest over devices).

        Reading or setting waits for MXNet's queued work (``mx.nd.waitall()``) first, so
        that backward passes still in flight are counted (or do not advance a reset).
        """
        mx.nd.waitall()
        return _SHARED_STEPS.get(self._lsm.step_key)

    @step.setter
    def step(self, value: int) -> None:
        step = _parse_int("step", value, 0)
        mx.nd.waitall()
        _SHARED_STEPS.set(self._lsm.step_key, step)

    @property
    def beta(self) -> float:
        """The beta the next training forward will use."""
        return self._lsm.schedule()(self.step)

    def hybrid_forward(self, F: Any, x: Any, label: Any, weight: Any) -> Any:
        if F is mx.nd:
            # Imperative: check here so a bad label is a ValueError, not MXNet's generic error.
            label_indices(as_numpy(label, "label"), self._units)
        return F.Custom(x, label, weight, op_type=OP_TYPE, **self._lsm.to_kwargs())

    def __repr__(self) -> str:
        p = self._lsm
        return (
            f"{type(self).__name__}({p.num_hidden}, margin={p.margin}, beta={p.beta}, "
            f"scale={p.scale}, beta_min={p.beta_min})"
        )
