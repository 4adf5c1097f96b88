"""MXNet 1.9.1 adapter: the seed's ``LSoftmax`` CustomOp and a Gluon ``LSoftmaxDense`` block.

Importing this package registers a CustomOp named ``LSoftmax`` that is a drop-in for the
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

Modules: ``_bridge`` (NDArrays as NumPy views through DLPack, labels as class indices),
``layer`` (the parameters, the step counters, the CustomOp ``LSoftmaxOp`` and its
``LSoftmaxProp``, :func:`lsoftmax_symbol`), ``gluon`` (:class:`LSoftmaxDense`).

Threads: set ``MXNET_CPU_WORKER_NTHREADS=2`` (or more) before importing mxnet, as the seed
asked for CustomOps on CPU.
"""

from __future__ import annotations

from ._bridge import as_numpy, label_indices, output_view
from .gluon import LSoftmaxDense
from .layer import OP_TYPE, LSoftmaxOp, LSoftmaxParams, LSoftmaxProp, StepCounter, lsoftmax_symbol

__all__ = [
    "LSoftmaxDense",
    "LSoftmaxOp",
    "LSoftmaxParams",
    "LSoftmaxProp",
    "OP_TYPE",
    "StepCounter",
    "as_numpy",
    "label_indices",
    "lsoftmax_symbol",
    "output_view",
]
