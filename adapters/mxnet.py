"""MXNet 1.9.1 adapter: the seed's ``LSoftmax`` CustomOp and a Gluon ``LSoftmaxDense`` block.

Importing this module registers a CustomOp named ``LSoftmax`` that is a drop-in for the
seed (luoyetx/mx-lsoftmax); the seed's own call works unchanged:

>>> import mxnet as mx
>>> import lsoftmax_core.adapters.mxnet  # registers op_type='LSoftmax'
>>> embedding, label, weight = mx.sym.var("embedding"), mx.sym.var("label"), mx.sym.var("weight")
>>> fc = mx.sym.Custom(data=embedding, label=label, weight=weight, num_hidden=10,
...                    beta=100, margin=2, scale=0.99, beta_min=0, op_type='LSoftmax')
>>> fc.list_arguments()
['embedding', 'label', 'weight']
>>> fc.infer_shape(embedding=(4, 2))[1]
[(4, 10)]

Inputs are ``(data, label, weight)`` in that order: data (N, D), label (N,) class indices
(MXNet labels are usually floats), weight (num_hidden, D).  The maths is the core's, on
the NumPy backend (``docs/derivatives.md``), so this runs on CPU contexts only.

Semantics, as in the seed: training (``is_train``) gives the large-margin logits,
evaluation the plain ``x @ w.T``; beta (lambda in the paper) follows
:class:`lsoftmax_core.ExponentialSchedule` ``(beta, scale, beta_min)`` at step t, t
counting the training backward passes.  The counter is explicit operator state, read at
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
(:func:`label_indices`).  The plain GEMMs run on those views and the core's
``add_margin``/``add_margin_grad`` finish them in place.  When MXNet asks for a result to
be overwritten (``req == 'write'``, the default of ``simple_bind``, Module and Gluon) this
happens in MXNet's own buffer (:func:`output_view`, a writeable view); for ``'add'``
(gradient accumulation) and ``'inplace'`` the result goes through ``self.assign``, one
engine copy or add.

Validation.  Each forward and backward checks its arguments once: :func:`label_indices`
checks the label values (the one check that reads data), ``lsoftmax_core.checks.check_arrays``
the shapes, dtypes, margin and beta, and the resulting ``Problem`` is passed to the core as
``checked=``.

Errors.  MXNet 1.9.1 runs CustomOp callbacks behind ctypes: an exception raised inside them
is printed by MXNet and surfaces as a generic ``MXNetError`` (a ``RuntimeError``) whose text
does not contain the Python message, and an exception in ``CustomOpProp.__init__`` is
ignored and can crash the process.  So bad keyword arguments are stored by
:class:`LSoftmaxProp` and raised from ``list_arguments`` (MXNet prints the ``ValueError``
naming the argument, then raises ``MXNetError``); bad labels inside a graph do the same.
For a real ``ValueError``/``TypeError`` at the call site use :func:`lsoftmax_symbol` or
:class:`LSoftmaxDense` (both validate in Python first; the block also checks labels before
the operator runs when it is not hybridised).

Threads: set ``MXNET_CPU_WORKER_NTHREADS=2`` (or more) before importing mxnet, as the seed
asked for CustomOps on CPU.
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
from lsoftmax_core.checks import check_arrays, check_integer, check_nonnegative

__all__ = [
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

# The dtypes of data and weight: the NumPy backend's (this adapter runs on CPU only).
_DTYPES = lsm.supported_dtypes("numpy")

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


def _dtype_names() -> str:
    return ", ".join(str(t) for t in _DTYPES)


def _result_buffer(dst: Any, req: str) -> Any:
    """Where to compute a result that MXNet wants in ``dst`` with ``req``: ``dst`` itself for
    'write', otherwise a new MXNet-owned array of the same shape and dtype (then assigned).

    Results never reach MXNet as NumPy-owned memory (``mx.nd.from_numpy(zero_copy=True)``):
    MXNet frees such an array through a Python callback, on the engine thread that drops it
    last, which can be after ``mx.nd.waitall()`` has returned; at interpreter exit Python
    ends that thread when it asks for the GIL, inside a C++ destructor, and the process
    aborts ("terminate called without an active exception").
    """
    if req == "write":
        return dst
    return mx.nd.empty(dst.shape, ctx=dst.context, dtype=dst.dtype)


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
        try:
            supported = np.dtype(dtype) in _DTYPES
        except TypeError:
            supported = False
        if not supported:
            raise TypeError(f"dtype={dtype!r} is not supported ({_dtype_names()})")
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
