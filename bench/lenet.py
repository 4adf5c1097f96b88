"""The seed's own table, reproduced: LeNet training throughput, plain last layer vs L-Softmax.

The seed (mx-lsoftmax, MXNet, one GTX 1070) trained LeNet on MNIST with margin 4,
beta 1 and reported samples/s for a plain fully connected last layer and for its CUDA
L-Softmax operator: ~45000 vs ~40000 at batch 128, ~54000 vs ~47000 at batch 256, i.e.
L-Softmax / plain = 0.89 and 0.87.

Here the network is the demo's reading of the seed's (conv5x5(32)-relu-pool-conv5x5(64)-
relu-pool-fc(256)-relu-fc(2), the 2-D embedding of the seed's pictures), then the last
layer: ``nn.Linear(2, 10, bias=False)`` or ``LSoftmaxLinear(2, 10, margin=4)`` with beta
fixed at 1.  One training step is forward, cross-entropy, backward, SGD step (and
``layer.step()`` for L-Softmax) on a fixed random 1x28x28 batch with 10 classes: data
loading is not timed, only the training step.  The two heads are timed round-robin like
the other contenders (see :mod:`bench.harness`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Callable

from .harness import Case, Measured, cpu_clock, measure, paired_ratio, threads, torch_cuda_clock
from .record import Options, Suite, ok, table

__all__ = ["SEED", "SUITE", "lenet_cases"]

#: The seed's GTX 1070 figures (samples/s): batch -> (plain, L-Softmax CUDA).
SEED = {128: (45000.0, 40000.0), 256: (54000.0, 47000.0)}

PLAIN = "LeNet, plain linear head"
LSOFTMAX = "LeNet, L-Softmax head (m=4, beta=1)"


def _net(torch: Any) -> Any:
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 2),
    )


def lenet_cases(batch: int, device: str, seed: int = 0) -> list[Case]:
    """One training step of each head at ``batch`` on ``device`` (``run()`` = one step)."""
    import torch
    import torch.nn.functional as F

    from lsoftmax_core import ConstantSchedule
    from lsoftmax_core.adapters.torch import LSoftmaxLinear

    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    clock = torch_cuda_clock if device.startswith("cuda") else cpu_clock

    def step_fn(head_kind: str) -> Callable[[], object]:
        torch.manual_seed(seed)
        net = _net(torch).to(device)
        if head_kind == "plain":
            head: Any = torch.nn.Linear(2, 10, bias=False).to(device)
        else:
            head = LSoftmaxLinear(2, 10, margin=4, schedule=ConstantSchedule(1.0), device=device)
        params = list(net.parameters()) + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        net.train()
        head.train()

        def step() -> object:
            feats = net(images)
            logits = head(feats) if head_kind == "plain" else head(feats, labels)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if head_kind != "plain":
                head.step()
            return loss

        return step

    return [
        Case(PLAIN, "torch", PLAIN, step_fn("plain"), clock),
        Case(LSOFTMAX, "torch", PLAIN, step_fn("lsoftmax"), clock),
    ]


COLUMNS = ("device", "threads", "batch", "head", "samples_per_s", "ratio_to_plain", "seed_samples_per_s",
           "seed_ratio", "repeats", "inner", "note")
#: A full run's batches; a run with one repetition (``--quick``) takes the first only.
BATCHES = (128, 256)


def _run(opts: Options) -> Iterator[list[dict[str, Any]]]:
    """Samples/s per head and batch, with the L-Softmax/plain ratio (paired) and the seed's."""
    import torch  # noqa: F401 - imported first, so that threads() caps its pool

    with threads(opts.threads):
        for batch in BATCHES[:1] if opts.repeat <= 2 else BATCHES:
            measured: list[Measured] = measure(lenet_cases(batch, "cuda" if opts.device == "gpu" else "cpu"),
                                               repeat=opts.repeat, warmup=opts.warmup, min_time=opts.min_time)
            plain = measured[0]
            yield [{"device": opts.device, "threads": opts.threads or "default", "batch": batch,
                    "head": m.case.name, "samples_per_s": batch / m.median,
                    "ratio_to_plain": 1.0 / paired_ratio(m, plain),  # samples/s: the inverse of the time ratio
                    "seed_samples_per_s": SEED[batch][m is not plain],
                    "seed_ratio": 1.0 if m is plain else SEED[batch][1] / SEED[batch][0],
                    "repeats": len(m.samples), "inner": m.inner, "note": m.error} for m in measured]


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    body = []
    for plain, lsm in zip(rows[::2], rows[1::2]):
        def f(v: Any, fmt: str) -> str:
            return format(v, fmt) if ok(v) else "n/a"

        body.append([str(plain["batch"]), f(plain["samples_per_s"], ".0f"), f(lsm["samples_per_s"], ".0f"),
                     f(lsm["ratio_to_plain"], ".3f"), f(lsm["seed_ratio"], ".3f")])
    return [*table(["batch", "plain head (samples/s)", "L-Softmax head (samples/s)", "L-Softmax / plain",
                    "seed's ratio (GTX 1070, CUDA op)"], body), ""]


SUITE = Suite(
    name="lenet", title="The seed's table: LeNet training throughput", devices=("cpu", "gpu"), columns=COLUMNS, table=None,
    about=("One training step (forward, cross-entropy, backward, SGD) of the demo's LeNet on a fixed random "
           "batch, plain linear head against `LSoftmaxLinear(2, 10, margin=4)` with beta 1, timed round-robin; "
           "the seed (mx-lsoftmax, one GTX 1070) reported the ratio in the last column."),
    run=_run, markdown=markdown,
)
