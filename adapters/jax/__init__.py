"""JAX adapter: ``lsoftmax(x, w, label, margin=, beta=)``, the fused loss
``lsoftmax_cross_entropy(x, w, label, margin=, beta=, reduction=, ignore_index=)`` and the
class-parallel loss ``class_parallel_cross_entropy(...)`` for ``jax.shard_map``, all
differentiable with ``jax.grad``.

L-Softmax logits and their cross-entropy (the maths: ``docs/derivatives.md``) as JAX
functions: the core's ``forward``/``backward`` (and ``cross_entropy``,
``cross_entropy_with_grad``, ``cross_entropy_backward``, ``cross_entropy_shard_stats``) run
inside an XLA callback and ``jax.custom_vjp`` wires the backward into JAX's reverse mode.
This package adds no maths of its own: it checks the arguments, hands XLA's buffers to the
core and says which backend runs them.  Every function runs on the CPU and on CUDA (the
fused losses' CUDA path is the core's CuPy cross-entropy, through the same callback as the
logits; not yet measured on a GPU).

Margins.  ``margin=`` is an int m (L-Softmax; ``lsoftmax_core.LSoftmax(m)`` is the same
path, bit for bit) or a margin object of the core (``SphereFace``, ``CosFace``, ``ArcFace``,
``CombinedMargin``: docs/derivatives.md, "The margin family"), in every function.  It is
static: margin objects are frozen, hashable and compare by value, so an equal object made
anew re-uses a compiled computation.  The kinds that normalise have no per-sample
statistics: :func:`lsoftmax` keeps no statistics residual for them and its backward calls
the core with ``stats=None``; the losses hand the object to the core's loss functions.
Both losses take ``subcenters=k`` (static) for those kinds: w has C·k rows, class j's
centres rows j·k ... j·k + k - 1, and the class-parallel loss's shards hold whole classes.

Modules: ``_bridge`` (checks, beta's encoding, the buffer callback and the zero-copy views),
``layer`` (:func:`lsoftmax`), ``loss`` (:func:`lsoftmax_cross_entropy`), ``parallel``
(:func:`class_parallel_cross_entropy`, with its own docstring on sharding W).

Execution.  Both devices go through ``jax.experimental.buffer_callback``, which hands
the callback XLA's own buffers:

* CPU: the operands are wrapped as NumPy arrays without a copy (``Buffer.__array__``;
  the views are marked read-only, since XLA owns them) and the NumPy backend runs on
  them.  ``jax.pure_callback`` is not used because in JAX 0.10 it copies every operand
  before the callback sees it (the copy is measurable: the callback's pointer differs
  from ``Array.unsafe_buffer_pointer()``), whereas buffer_callback's views alias the
  operands (tested).
* CUDA: the operands are wrapped as CuPy arrays without a copy
  (``__cuda_array_interface__``) and the CuPy backend runs on XLA's compute stream,
  under ``jit`` and eagerly; nothing goes through the host.

The logits and their gradients are written straight into XLA's output buffers (``layer``);
the fused loss's results are copied into them once (``loss``).  Other platforms (TPU, ROCm)
are not supported: buffer_callback does not lower on TPU, and the CUDA kernels are CUDA-only.
On CUDA, CuPy allocates the backend's temporaries and results from its own memory pool,
next to XLA's: if XLA preallocates most of the GPU (its default), set
``XLA_PYTHON_CLIENT_MEM_FRACTION`` lower or ``XLA_PYTHON_CLIENT_PREALLOCATE=false``.

Dtypes.  x and w are accepted in the dtypes of the backend that will run them
(``lsoftmax_core.checks.supported_dtypes``): float32 and float64 on the CPU; on CUDA also
float16, and bfloat16 where the installed CuPy computes in it.  The device is x's (or
w's) device when it is a concrete array, else (under ``jit``, or for NumPy inputs)
``jax.default_backend()``.  float64 needs ``jax_enable_x64``.

Errors.  Shapes, dtypes, margin and a Python beta are checked at the call (under ``jit``:
while tracing), with the core's messages.  Label values (and a traced beta) can only be
checked when the callback runs; JAX re-raises the core's error as
``jax.errors.JaxRuntimeError`` whose message ends with the core's
``ValueError: label must lie in [0, C) ...``; on CUDA the core checks them on the device
without synchronising, so the error comes from the next call on that device (of this
adapter or the core) or from ``lsoftmax_core.check_labels()``, and the computation with
the bad label completes (such a row gets no margin).  The core's call inside the callback repeats
its O(1) shape and dtype checks (they also catch a computation compiled for another
platform than the one checked at the call); the label values are scanned there once
(NumPy labels given to :func:`lsoftmax` are also scanned at the call, before JAX may
narrow int64 to int32).

beta is an operand, not a static argument: a new value (a schedule changing every step)
re-uses the compiled computation.  A Python number is checked at the call and reaches
the core exactly, as the float64 the core computes with (its 64 bits travel as two
uint32 words, so this holds without ``jax_enable_x64`` and for values beyond float32's
range).  A jax scalar (e.g. a traced argument of your jitted function) reaches the core
in its own dtype, unrounded, and is checked when the callback runs (ValueError naming
beta); note that without x64 JAX itself turns a Python float passed to a jitted function
into float32 (1e39 becomes inf), so pass such a beta with x64 enabled or directly to
:func:`lsoftmax`.  beta is treated as a constant: the gradient with respect to it is zero
(``stop_gradient``), as for a hyper-parameter.  On CUDA the callback reads beta from the
device, which waits for XLA's stream (an 8-byte copy) because the CuPy backend takes
beta as a host number.

vmap: each slice of the mapped axis is an independent L-Softmax problem (its own x, w,
label and beta), computed by one call of the core after the other (buffer_callback's
``vmap_method="sequential"``).  Samples that share w need no vmap: fold them into N
(``x.reshape(-1, D)``, ``label.reshape(-1)``), which is one call with the same result.

Not supported: forward-mode autodiff (``jax.jvp``) and second derivatives, since the
backward pass is itself a callback without a derivative rule.
"""

from __future__ import annotations

from .layer import lsoftmax
from .loss import lsoftmax_cross_entropy
from .parallel import class_parallel_cross_entropy

__all__ = ["class_parallel_cross_entropy", "lsoftmax", "lsoftmax_cross_entropy"]
