"""The Gluon block :class:`LSoftmaxDense`: a Dense layer without bias whose target logit
carries the L-Softmax margin, running the ``LSoftmax`` CustomOp of :mod:`.layer`.  Its
beta-schedule step counters outlive the operator instances that imperative and
non-static hybridised calls create (the package docstring says why).
"""

from __future__ import annotations

import uuid
import weakref
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from ._bridge import _DTYPES, _dtype_names, as_numpy, label_indices
from .layer import _SHARED_STEPS, OP_TYPE, LSoftmaxParams, _parse_int

__all__ = ["LSoftmaxDense"]


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
