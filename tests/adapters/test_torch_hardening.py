"""The torch modules and the fused loss under hostile use: a checkpoint that a module
refuses leaves it bit for bit as it was (nothing is loaded before everything is checked),
and rows labelled ``ignore_index`` take no part in the backward whatever their upstream
gradient, as in ``F.cross_entropy`` (an infinite one must not give 0 * inf = NaN)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F

import lsoftmax_core as lsm
from lsoftmax_core.adapters.torch import LSoftmaxLinear, LSoftmaxLoss, lsoftmax, lsoftmax_cross_entropy

IGNORE = -100


# --------------------------------------------------------------------------- refused checkpoints


def _snapshot(module: torch.nn.Module) -> dict[str, Any]:
    """Everything a load could change: the tensors' bits, the settings, the schedule object."""
    return {
        "tensors": {k: v.detach().clone() for k, v in [*module.named_parameters(), *module.named_buffers()]},
        "extra": module.get_extra_state(),
        "schedule": module.schedule,
        "beta": (module.beta, module._beta_tensor.item()),
        "settings": {k: getattr(module, k, None) for k in ("margin", "normalize_weight", "reduction", "ignore_index")},
    }


def _assert_unchanged(module: torch.nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(module)
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, t in before["tensors"].items():
        assert torch.equal(after["tensors"][k], t) and after["tensors"][k].dtype == t.dtype, f"{k} changed"
    assert after["schedule"] is before["schedule"]
    for key in ("extra", "beta", "settings"):
        assert after[key] == before[key], key


def _saved(module_type: type, **kw: Any) -> dict[str, Any]:
    """A checkpoint of a trained-looking module: another weight, three steps taken."""
    kw.setdefault("schedule", lsm.ExponentialSchedule(beta0=50.0, scale=0.5))
    other = module_type(4, 5, **kw)
    for _ in range(3):
        other.step()
    return other.state_dict()


def _edited(state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**state, "_extra_state": {**state["_extra_state"], **extra}}


# Each: (module type, the module's own settings, the refused checkpoint, the error, its words).
_REFUSED = [
    ("margin", LSoftmaxLoss, {"margin": 2}, lambda: _saved(LSoftmaxLoss, margin=4), ValueError,
     "checkpoint has margin=4 but this loss has margin=2"),
    ("normalize_weight", LSoftmaxLoss, {}, lambda: _saved(LSoftmaxLoss, normalize_weight=True), ValueError,
     "checkpoint has normalize_weight=True but this loss has normalize_weight=False"),
    ("negative-iteration", LSoftmaxLoss, {}, lambda: _edited(_saved(LSoftmaxLoss), iteration=-1), ValueError,
     "iteration=-1"),
    ("unknown-schedule", LSoftmaxLoss, {}, lambda: _edited(_saved(LSoftmaxLoss), schedule={"type": "mine"}),
     ValueError, "cannot be rebuilt"),
    ("bad-beta-at-the-iteration", LSoftmaxLoss, {},
     lambda: _edited(_saved(LSoftmaxLoss), schedule={"type": "constant", "beta": -1.0}), ValueError,
     "cannot be rebuilt"),
    ("not-a-dict", LSoftmaxLoss, {}, lambda: {**_saved(LSoftmaxLoss), "_extra_state": 3}, ValueError,
     "extra state must be a dict"),
    ("weight-shape", LSoftmaxLoss, {}, lambda: {**_saved(LSoftmaxLoss), "weight": torch.zeros(6, 4)}, ValueError,
     "weight has shape (6, 4) but this loss's weight has shape (5, 4)"),
    ("weight-not-a-tensor", LSoftmaxLoss, {}, lambda: {**_saved(LSoftmaxLoss), "weight": [[0.0] * 4] * 5},
     TypeError, "weight must be a torch.Tensor, got list"),
    ("strict-without-extra-state", LSoftmaxLoss, {}, lambda: {"weight": torch.zeros(5, 4)}, RuntimeError,
     "missing key(s) ['_extra_state'], unexpected key(s) []; nothing was loaded"),
    ("strict-with-an-unexpected-key", LSoftmaxLoss, {}, lambda: {**_saved(LSoftmaxLoss), "bias": torch.zeros(5)},
     RuntimeError, "missing key(s) [], unexpected key(s) ['bias']"),
    ("layer-margin", LSoftmaxLinear, {"margin": 2}, lambda: _saved(LSoftmaxLinear, margin=3), ValueError,
     "checkpoint has margin=3 but this layer has margin=2"),
    ("layer-negative-iteration", LSoftmaxLinear, {}, lambda: _edited(_saved(LSoftmaxLinear), iteration=-2),
     ValueError, "iteration=-2"),
    ("layer-weight-shape", LSoftmaxLinear, {}, lambda: {**_saved(LSoftmaxLinear), "weight": torch.zeros(5, 3)},
     ValueError, "weight has shape (5, 3)"),
]  # fmt: skip


@pytest.mark.parametrize(("module_type", "own", "make", "exc", "words"), [p[1:] for p in _REFUSED],
                         ids=[p[0] for p in _REFUSED])  # fmt: skip
def test_a_refused_checkpoint_leaves_the_module_bit_for_bit_as_it_was(module_type, own, make, exc, words) -> None:
    module = module_type(4, 5, schedule=lsm.ExponentialSchedule(beta0=8.0, scale=0.5), **own)
    module.step()
    before = _snapshot(module)
    state = make()
    with pytest.raises(exc) as info:
        module.load_state_dict(state)
    assert words in str(info.value)
    _assert_unchanged(module, before)
    # The module still loads a good checkpoint of its own kind afterwards.
    good = module_type(4, 5, **own)
    good.load_state_dict(module.state_dict())
    assert torch.equal(good.weight, module.weight) and good.iteration == 1


def test_a_non_strict_load_of_a_bare_weight_keeps_the_iteration_and_schedule() -> None:
    criterion = LSoftmaxLoss(4, 5, schedule=lsm.ExponentialSchedule(beta0=8.0, scale=0.5))
    criterion.step()
    weight = torch.randn(5, 4)
    result = criterion.load_state_dict({"weight": weight}, strict=False)
    assert result.missing_keys == ["_extra_state"]
    assert torch.equal(criterion.weight, weight) and criterion.iteration == 1 and criterion.beta == 4.0


def test_a_refused_checkpoint_inside_a_model_names_the_module_and_leaves_it_unchanged() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), LSoftmaxLoss(4, 5, margin=2))
    state = model.state_dict()
    state["1._extra_state"] = {**state["1._extra_state"], "margin": 3}
    before = _snapshot(model[1])
    with pytest.raises(ValueError, match="checkpoint has margin=3 but this loss has margin=2"):
        model.load_state_dict(state)
    _assert_unchanged(model[1], before)


# --------------------------------------------------------------------------- ignored rows


def _problem(n: int = 7, c: int = 5, d: int = 3, *, ignored: tuple[int, ...] = (2,), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=g)
    target[list(ignored)] = IGNORE
    return x, w, target


def _unfused(x, w, target, *, margin, reduction):
    """torch's own cross-entropy on the L-Softmax logits (ignored rows get class 0 there)."""
    logits = lsoftmax(x, w, torch.where(target == IGNORE, 0, target), margin=margin)
    return F.cross_entropy(logits, target, reduction=reduction, ignore_index=IGNORE)


def _grads(loss_fn, x, w, then):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    then(loss_fn(xr, wr)).backward()
    return xr.grad, wr.grad


def _sqrt_sum(loss):
    return loss.sqrt().sum()


@pytest.mark.parametrize("margin", [1, 3])
def test_an_infinite_upstream_gradient_on_an_ignored_row_gives_torchs_finite_gradients(margin) -> None:
    """reduction="none": the ignored row's loss is 0, so sqrt's gradient there is inf."""
    x, w, target = _problem()
    got = _grads(lambda a, b: lsoftmax_cross_entropy(a, b, target, margin=margin, reduction="none"), x, w, _sqrt_sum)
    want = _grads(lambda a, b: _unfused(a, b, target, margin=margin, reduction="none"), x, w, _sqrt_sum)
    for name, a, b in zip(("grad_x", "grad_w"), got, want):
        assert torch.isfinite(b).all(), f"torch's own {name} is finite"
        assert torch.isfinite(a).all(), f"{name}: {int(torch.isnan(a).sum())} NaN of {a.numel()}"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not got[0][2].any()  # the ignored row's features get no gradient


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("path", ["eager", "retained", "traced"])
def test_a_non_finite_upstream_gradient_gives_zeros_on_ignored_rows(reduction, path) -> None:
    """Every path of "sum"/"mean": the forward's gradients scaled in place (eager), the
    backward operator (a second backward of a retained graph), the traced operators
    (make_fx): ignored rows get 0 whatever the upstream gradient, the others its NaN."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, target = _problem(ignored=(1, 4))
    nan = torch.tensor(float("nan"), dtype=torch.float64)

    def grads(a, b, t, g):
        loss = lsoftmax_cross_entropy(a, b, t, margin=3, beta=1.0, reduction=reduction)
        if path == "retained":
            torch.autograd.grad(loss, (a, b), retain_graph=True)
        return torch.autograd.grad(loss, (a, b), g)

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    if path == "traced":
        gx, gw = make_fx(grads, tracing_mode="fake")(xr, wr, target, nan)(xr, wr, target, nan)
    else:
        gx, gw = grads(xr, wr, target, nan)
    want_x, want_w = torch.autograd.grad(_unfused(xr, wr, target, margin=3, reduction=reduction), (xr, wr), nan)
    ignored = target == IGNORE
    assert not gx[ignored].any() and not want_x[ignored].any()
    assert torch.isnan(gx[~ignored]).all() and torch.isnan(gw).all() and torch.isnan(want_w).all()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("module", [False, True])
def test_an_all_ignored_batch_under_sqrt_gives_zero_gradients_as_torch_does(reduction, module) -> None:
    """Every row ignored: the loss is 0 and sqrt's gradient inf; torch's gradients are 0."""
    x, w, _ = _problem()
    target = torch.full((len(x),), IGNORE)
    if module:
        criterion = LSoftmaxLoss(3, 5, margin=3, reduction=reduction, normalize_weight=True, dtype=torch.float64)
        with torch.no_grad():
            criterion.weight.copy_(w)
        xr = x.clone().requires_grad_()
        criterion(xr, target).sqrt().backward()
        gx, gw = xr.grad, criterion.weight.grad
    else:
        gx, gw = _grads(lambda a, b: lsoftmax_cross_entropy(a, b, target, margin=3, reduction=reduction), x, w,
                        torch.sqrt)  # fmt: skip
    want_x, want_w = _grads(lambda a, b: F.cross_entropy(a @ b.T, target, reduction="sum"), x, w, torch.sqrt)
    assert not want_x.any() and not want_w.any()
    assert not gx.any() and not gw.any(), f"{int(torch.isnan(gw).sum())} NaN in grad_w"


@pytest.mark.parametrize("normalize_weight", [False, True])
def test_the_loss_module_with_reduction_none_keeps_ignored_rows_out_of_the_backward(normalize_weight) -> None:
    x, w, target = _problem()
    criterion = LSoftmaxLoss(3, 5, margin=3, reduction="none", normalize_weight=normalize_weight, dtype=torch.float64)
    with torch.no_grad():
        criterion.weight.copy_(w)
    xr = x.clone().requires_grad_()
    criterion(xr, target).sqrt().sum().backward()
    wr = w.clone().requires_grad_()
    xu = x.clone().requires_grad_()
    weight = F.normalize(wr, dim=1) if normalize_weight else wr
    _unfused(xu, weight, target, margin=3, reduction="none").sqrt().sum().backward()
    assert torch.isfinite(criterion.weight.grad).all() and torch.isfinite(xr.grad).all()
    torch.testing.assert_close(criterion.weight.grad, wr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xr.grad, xu.grad, rtol=1e-10, atol=1e-12)
