"""The margin family against pytorch-metric-learning (PML) in float64: for the same
embeddings (N x D) and class weights, lsm.cross_entropy_with_grad(reduction="mean") gives
PML's loss, its embeddings' gradient and its weight's gradient (PML's W is (D, C): ours is
W.T; autograd gives PML's gradients).

The kinds and their names elsewhere (angles in radians unless marked):

=================  ====================================  ===========================  ===========================
kind (ours)        PML 2.9 class (params, units, defaults)  InsightFace arcface_torch    paper's defaults
=================  ====================================  ===========================  ===========================
LSoftmax(m)        LargeMarginSoftmaxLoss(num_classes,     -                            m = 2, 3, 4 (L-Softmax,
                   embedding_size, margin=4 (int),                                      Liu et al. 2016), beta
                   scale=1): logits |x||w| cos, times                                   (lambda) annealed
                   scale; ours is scale = 1
SphereFace(m)      SphereFaceLoss(..., margin=4, scale=1)  -                            m = 4, lambda annealed
                   (|x| times the margin's bracket)                                     (Liu et al. 2017)
CosFace(m, s)      CosFaceLoss(..., margin=0.35,           CosFace(s=64.0, m=0.40);     m = 0.35, s = 64 (Wang et
                   scale=64)                               configs margin_list          al. 2018; AM-Softmax:
                                                           (1.0, 0.0, 0.4), s = 64      m = 0.35, s = 30)
ArcFace(m, s)      ArcFaceLoss(..., margin=28.6 DEGREES    ArcFace(s=64.0, margin=0.5); m = 0.5, s = 64 (Deng et
                   (np.radians inside: 0.4992 rad),        configs margin_list          al. 2019)
                   scale=64)                               (1.0, 0.5, 0.0), s = 64
CombinedMargin     -                                       CombinedMarginLoss(s, m1,    (m1, m2, m3) = (1, 0.3,
(m1, m2, m3, s)                                            m2, m3,                      0.2) and (0.9, 0.4,
                                                           interclass_filtering_        0.15), s = 64 (ArcFace
                                                           threshold=0)                 paper's combined margins)
ArcFace +          SubCenterArcFaceLoss(..., margin=28.6   (sub-centre configs: k = 3)  k = 3 (Deng et al. 2020)
subcenters=k       DEGREES, scale=64, sub_centers=3);
                   W (D, C*k), class j's centres are
                   columns j*k .. j*k+k-1
=================  ====================================  ===========================  ===========================

What matches, and what cannot (found by reading PML's and InsightFace's sources):

- PML's classes match ours exactly in the maths: PML normalises with F.normalize
  (max(|v|, 1e-12), so norms here are >> 1e-12), computes L-Softmax/SphereFace's psi from
  the paper's binomial expansion (eq. 7) with k = floor(acos(c) m / pi) (no clamp to m - 1:
  at theta = pi exactly it takes k = m, which gives the same value 1 - 2m), ArcFace's
  cos(acos(c) + m) with the same fallback cos(theta) - m sin(m) past theta = pi - m
  (threshold included in the margin's branch), CosFace's c - m, and sub-centres as the max
  over a class's columns.  They have no beta (annealing): compare at beta = 0.  PML's
  LargeMarginSoftmaxLoss has a ``scale`` that multiplies every logit; LSoftmax has none
  (scale = 1 here).  PML's torch.pow in the binomial expansion has a NaN gradient at a
  cosine of exactly 0 (0 * 0**-1), which random data never hits.  SubCenterArcFaceLoss'
  get_outliers (dropping samples far from their dominant centre) is a separate utility,
  not part of the loss.
- InsightFace's CombinedMarginLoss only implements two of its cases: m1 == 1 and m3 == 0
  (ArcFace m2; in one version the margin is applied with arccos_/cos_ in place under
  torch.no_grad(), so its gradient is the plain cosine's, s, not s h'(c): the margin
  changes the forward only; the current version computes cos(theta + m2) with a real
  gradient and the fallback c - m2 sin(pi - m2) = c - m2 sin m2, as ours), and m3 > 0
  (then m1 and m2 are IGNORED: CosFace m3).  Anything else raises.  So InsightFace's
  (1, 0.3, 0.2) is CosFace(0.2), not the combined margin of the ArcFace paper, which
  ours computes.  Not tested here (InsightFace is not a package).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import lsoftmax_core as lsm

from support import family_reference as fr
from support.tolerances import TOLERANCES, assert_close

torch = pytest.importorskip("torch")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

#: PML's LargeMarginSoftmaxLoss builds scipy.special.binom of a torch scalar (NumPy 2 deprecation).
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")

C, D, N = 7, 6, 19


def _pml(name: str, k: int = 1, **kw):
    if name == "SubCenterArcFaceLoss":
        return pml_losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, sub_centers=k, **kw)
    return getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kw)


def _run_pml(loss_fn, x, w, label):
    """PML's loss and (grad_x, grad_w) for our x (N, D) and w (C*k, D), in float64."""
    emb = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss_fn.W.data = torch.tensor(np.ascontiguousarray(w.T), dtype=torch.float64)
    loss_fn.W.grad = None
    loss = loss_fn(emb, torch.tensor(label, dtype=torch.int64))
    loss.backward()
    return float(loss.detach()), emb.grad.numpy(), loss_fn.W.grad.numpy().T


# (PML class, its keyword arguments, our margin, sub-centres)
CASES = [
    ("LargeMarginSoftmaxLoss", dict(margin=4, scale=1), lsm.LSoftmax(4), 1),
    ("LargeMarginSoftmaxLoss", dict(margin=2, scale=1), lsm.LSoftmax(2), 1),
    ("LargeMarginSoftmaxLoss", dict(margin=3), lsm.LSoftmax(3), 1),
    ("SphereFaceLoss", dict(margin=4), lsm.SphereFace(4), 1),
    ("SphereFaceLoss", dict(margin=3, scale=1), lsm.SphereFace(3), 1),
    ("CosFaceLoss", dict(), lsm.CosFace(0.35, 64.0), 1),
    ("CosFaceLoss", dict(margin=0.4, scale=3.0), lsm.CosFace(0.4, 3.0), 1),
    ("ArcFaceLoss", dict(margin=math.degrees(0.5)), lsm.ArcFace(0.5, 64.0), 1),
    ("ArcFaceLoss", dict(margin=math.degrees(0.5), scale=2.0), lsm.ArcFace(0.5, 2.0), 1),
    ("ArcFaceLoss", dict(margin=28.6, scale=4.0), lsm.ArcFace(math.radians(28.6), 4.0), 1),
    ("SubCenterArcFaceLoss", dict(margin=math.degrees(0.5)), lsm.ArcFace(0.5, 64.0), 3),
    ("SubCenterArcFaceLoss", dict(margin=math.degrees(0.5), scale=2.0), lsm.ArcFace(0.5, 2.0), 3),
    ("SubCenterArcFaceLoss", dict(margin=math.degrees(0.3), scale=3.0), lsm.ArcFace(0.3, 3.0), 2),
]


def _ids(case) -> str:
    return f"{case[0]}-{case[2]!r}-k{case[3]}".replace(" ", "")


def _problem(mg, k, seed):
    rng = np.random.default_rng(seed)
    # Target angles over the whole of [0, pi] (ArcFace's fallback past pi - m included),
    # away from its step and the ends; norms 0.5..3, far above F.normalize's 1e-12.
    x, w, label = fr.problem(rng, N, C, D, mg.to_dict(), subcenters=k, width=1e-3)
    return x, w, label


def _scales(x, w, label, mg, k):
    """Loss and gradient scales: the logits' bound, and |dloss/dlogits| plus each row's
    weight 1/N (softmax minus one-hot cancels far below it for well-classified rows)."""
    p = mg.to_dict()
    _, G, _ = fr.loss_and_grad_logits(x, w, label, p, 0.0, "mean", -100, k)
    sx, sw = fr.grad_scales(np.abs(G) + 1.0 / len(x), x, w, p, k)
    return 2 * float(fr.logit_scale(x, w, p, k).max()), sx, sw


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_both_gradients_equal_pytorch_metric_learning(case, seed) -> None:
    name, kw, mg, k = case
    x, w, label = _problem(mg, k, seed)
    want_loss, want_gx, want_gw = _run_pml(_pml(name, k, **kw), x, w, label)
    sub = {} if k == 1 else {"subcenters": k}
    loss, gx, gw = lsm.cross_entropy_with_grad(x, w, label, margin=mg, beta=0.0, reduction="mean", **sub)
    ls, sx, sw = _scales(x, w, label, mg, k)
    tol = TOLERANCES["float64"]
    assert abs(float(loss) - want_loss) <= tol.forward * ls, f"loss {loss} vs PML {want_loss}"
    assert_close(gx, want_gx, sx, tol.grad, f"grad_x vs PML {name}")
    assert_close(gw, want_gw, sw, tol.grad, f"grad_w vs PML {name}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_pytorch_metric_learning_agrees_with_our_reference_too(case) -> None:
    """The independent reference and PML agree: a mismatch of the library with PML is then
    the library's, not a difference of conventions."""
    name, kw, mg, k = case
    x, w, label = _problem(mg, k, 5)
    want_loss, want_gx, want_gw = _run_pml(_pml(name, k, **kw), x, w, label)
    p = mg.to_dict()
    ref = fr.loss(x, w, label, p, 0.0, "mean", -100, k)
    rx, rw = fr.loss_grads(x, w, label, p, 0.0, "mean", -100, k)
    ls, sx, sw = _scales(x, w, label, mg, k)
    tol = TOLERANCES["float64"]
    assert abs(ref - want_loss) <= tol.forward * ls
    assert_close(rx, want_gx, sx, tol.grad, f"reference grad_x vs PML {name}")
    assert_close(rw, want_gw, sw, tol.grad, f"reference grad_w vs PML {name}")


def test_subcenter_arcface_orders_a_class_s_centres_as_consecutive_columns() -> None:
    """PML's cosine.view(-1, C, k): column j*k + r is centre r of class j, our row j*k + r."""
    k = 3
    loss_fn = _pml("SubCenterArcFaceLoss", k, margin=math.degrees(0.5), scale=2.0)
    x, w, label = _problem(lsm.ArcFace(0.5, 2.0), k, 9)
    loss_fn.W.data = torch.tensor(np.ascontiguousarray(w.T), dtype=torch.float64)
    got = loss_fn.get_cosine(torch.tensor(x, dtype=torch.float64)).detach().numpy()
    xu = x / np.linalg.norm(x, axis=1, keepdims=True)
    wu = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(got, (xu @ wu.T).reshape(N, C, k).max(axis=2), rtol=0, atol=1e-14)
