"""PyTorch adapter: ``lsoftmax`` (a differentiable function), ``LSoftmaxLinear`` (a layer),
and the fused loss ``lsoftmax_cross_entropy`` with its module ``LSoftmaxLoss``.

L-Softmax logits (the maths: ``docs/derivatives.md``) for torch tensors on the CPU and
on CUDA.  A thin DLPack bridge with no maths of its own.  Both directions are
``torch.library.custom_op`` operators with a fake (meta) implementation and an autograd
formula, so the function works under ``torch.compile(fullgraph=True)``, ``torch.jit.trace``
and dispatch modes (``make_fx``), and passes ``torch.library.opcheck``.  A plain eager call
skips the operator dispatch: an ``autograd.Function`` runs the same implementations (the
same bits, tested) and hands the forward's per-sample statistics to the backward
(``lsoftmax_core.forward(..., return_stats=True)``), which keeps the per-call cost low at
small sizes (``python -m bench overhead``).

CPU: the plain layer's GEMMs run in torch (its BLAS and its thread pool: NumPy's OpenBLAS
workers and torch's OpenMP workers slow each other down badly when they alternate on the
same cores), and the core's :func:`lsoftmax_core.add_margin` /
:func:`lsoftmax_core.add_margin_grad` then apply the margin in place on those results,
reading the inputs through read-only NumPy views of the tensors' memory (no copy).  The arguments are checked once per call, by
:func:`lsoftmax_core.check_arguments` before the forward's GEMM (labels included), whose
result lets ``add_margin`` skip its checks; the backward extends it to the upstream
gradient (``Problem.with_grad_logits``) for ``add_margin_grad``.

CUDA: the CuPy backend runs on PyTorch's current stream, and every array it allocates
(outputs and temporaries) comes from PyTorch's caching allocator, so the returned tensors
belong to PyTorch like any other (they show in ``torch.cuda.memory_allocated``) and no
memory is held in CuPy's pool.  The core's ``forward``/``backward`` check the arguments
once; labels are checked on the GPU (see :func:`lsoftmax_core.check_labels`).

Autocast: the forward operator is on autocast's float32 list (a registered autocast rule
for CPU and CUDA, like torch's own numerically sensitive ops): under
``torch.autocast`` float16 and bfloat16 inputs are computed in float32 and the logits are
float32; float32 and float64 inputs run in their own dtype, unchanged.  So features that
an autocast layer produced in bfloat16 meet a float32 weight in float32.  Outside
autocast x and weight must have the same dtype (a TypeError naming both otherwise), and
float16/bfloat16 run on CUDA only.  The backward operator is never autocast (also when
``backward()`` is called inside the autocast region): it runs in the dtype the forward
computed in.

beta travels to the operators as a 0-d float64 CPU tensor rather than a Python float:
custom operators specialise on float arguments, so a float beta that changes every step
(an annealing schedule) would recompile a compiled model every step; a tensor is a graph
input instead.  Reading it on the host is free because it lives on the CPU.

Gradients are first order (the backward operator has no derivative of its own).

``margin=`` takes an int (L-Softmax, unchanged) or a margin object of the core
(``lsoftmax_core.LSoftmax``, ``SphereFace``, ``CosFace``, ``ArcFace``,
``CombinedMargin``), in every function and module.  The operators carry it as ``(margin,
kind, params)``: ``(m, "", None)`` for L-Softmax, ``(m, "sphereface", None)``, and ``(1,
kind, [its real parameters])`` for the cosine kinds, read from the object by plain
attribute reads that Dynamo traces (a margin made inside a compiled function is read as
it is); a compiled graph specialises on the margin, which does not anneal (beta, a
tensor, does, without recompiling).  On the
CPU a kind that normalises runs the GEMMs on the core's normalised rows
(:func:`lsoftmax_core.normalized`) and the core's ``add_margin``/``add_margin_grad`` as
above; CUDA tensors run the core's CuPy backend for every kind (layer and fused loss; not
yet run on a GPU).

``subcenters=k`` (the core's sub-centres, SubCenter-ArcFace) on the fused losses
(:func:`lsoftmax_cross_entropy`, :class:`LSoftmaxLoss`, :class:`ClassParallelLSoftmaxLoss`),
for the kinds that normalise the weights: the weight has k rows per class, class j's
centres being rows j·k ... j·k + k - 1, and a class's cosine is the largest of its
centres'; labels, class bounds and ``num_classes`` count classes.  The fused-loss operators
carry k as a trailing int argument (default 1, so the call forms without it are unchanged);
a compiled graph specialises on it.

The fused loss (:func:`lsoftmax_cross_entropy`, :class:`LSoftmaxLoss`) is the core's
:func:`lsoftmax_core.cross_entropy` behind three more custom operators, with the same
beta, autocast and checking rules; it never holds the (N, C) logits.  On the CPU its GEMMs
run in NumPy (the core walks the logits in chunks); on CUDA it goes through the same bridge
as the logits (the CuPy backend's cuBLAS GEMMs per chunk and kernels, on PyTorch's current
stream, allocating from PyTorch's caching allocator; the loss, the float64 per-row
log-sum-exp kept for the backward and the gradients come back as CUDA tensors through
DLPack, a 0-d loss as a 0-d tensor, without a host synchronisation).  The CUDA path has
not yet been run on a GPU.

The class-parallel head (:class:`ClassParallelLSoftmaxLoss`) shards the fused loss's
class weights by class across the ranks of a ``torch.distributed`` process group (NCCL on
GPUs, gloo on CPUs): each rank holds its classes' rows and its chunk of logits, and the
ranks combine the exact loss and gradients of the whole batch through collectives of
O(N) values and the gathered features, never of size N x C or C x D
(``docs/distributed.md``).  CUDA tensors run the CuPy backend's class shards over the same
bridge (not yet run on a GPU).

``sample_rate`` (:class:`LSoftmaxLoss`, :class:`ClassParallelLSoftmaxLoss`; default 1.0):
Partial FC's class sampling, the training loss over every target class plus uniformly
drawn negatives, reproducibly (``seed``, and a sampling step saved in ``state_dict``);
``head.sampled_step(optimizer)`` is Partial FC v1's optimizer step
(``adapters/torch/sampling.py``, ``docs/distributed.md``).

>>> import torch
>>> from lsoftmax_core.adapters.torch import lsoftmax
>>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
>>> weight = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
>>> label = torch.tensor([0, 1])
>>> lsoftmax(x, weight, label, margin=1).tolist()  # margin 1: the plain x @ weight.T
[[1.0, 1.0], [2.0, -2.0]]
>>> logits = lsoftmax(x, weight, label, margin=2)
>>> bool(logits[0, 0] < 1.0), bool(logits[1, 1] < -2.0), logits[0, 1].item()  # targets only
(True, True, 1.0)
>>> torch.nn.functional.cross_entropy(logits, label).backward()
>>> x.grad.shape
torch.Size([2, 2])
"""

from __future__ import annotations

from .layer import lsoftmax
from .loss import lsoftmax_cross_entropy
from .modules import LSoftmaxLinear, LSoftmaxLoss
from .parallel import ClassParallelLSoftmaxLoss

__all__ = ["ClassParallelLSoftmaxLoss", "LSoftmaxLinear", "LSoftmaxLoss", "lsoftmax", "lsoftmax_cross_entropy"]
