"""lsoftmax-demo: the seed's MNIST feature pictures, reproduced in one command, with numbers.

A small CNN whose last hidden layer is 2-D (the seed's conv-pool-conv-pool-fc-fc(2),
scaled to the input) feeds the L-Softmax layer of the PyTorch adapter; one network is
trained per margin and its test-set features are drawn in the plane.  With a larger
margin each class becomes a thinner ray, further apart in angle; ``results.json`` and the
printed table give the numbers (accuracy, intra-class and inter-class angles).  With
``--kinds`` it trains one network per margin kind instead (L-Softmax, SphereFace, CosFace,
ArcFace, each with the parameters in KINDS) and draws them side by side the same way.

    pip install -e '.[demo]' && lsoftmax-demo          # digits 8x8, no download, about 1 min
    lsoftmax-demo --kinds lsoftmax,sphereface,cosface,arcface   # the kinds side by side
    lsoftmax-demo --mnist ~/data/mnist                 # real MNIST, the seed's recipe, ~1 h on a CPU

(shell commands; ``main(argv)`` runs the same from Python).

Data: scikit-learn's bundled 8x8 digits by default (fixed stratified 70/30 split), or
MNIST with ``--mnist DIR`` (the four IDX files, standard or dotted names, plain or .gz, in
DIR or where torchvision's download puts them, DIR/MNIST/raw).
Annealing (the seed's): beta_t = max(beta0 * 0.99**t, beta_min), t counted in optimizer
steps, beta0 = 100 (1000 for margins >= 6, as the seed did for margin 6); beta_min and
the rest of the recipe come from the dataset's preset (DIGITS, MNIST): the digits need
batch normalisation and a floor of 2, MNIST trains best with the seed's own settings.

A run is reproducible: every margin starts from ``torch.manual_seed(seed)`` and PyTorch
runs deterministic algorithms on one CPU thread, so on the CPU the same seed gives the
same results.json (except train_seconds) and figures with the same library versions
(recorded in results.json), and a margin's run does not depend on which other margins
were asked for, nor a kind's on the other kinds.  (--device cuda asks for deterministic
algorithms too, but the L-Softmax kernels' own reductions decide what that means there.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lsoftmax_core import (
    MAX_MARGIN,
    ArcFace,
    ConstantSchedule,
    CosFace,
    ExponentialSchedule,
    LSoftmax,
    Margin,
    Schedule,
    SphereFace,
)

from .data import DataError, Dataset, load_digits_split, load_mnist
from .plot import angle_stats, markdown_table, save_combined, save_features

if TYPE_CHECKING:
    import torch

__all__ = [
    "BETA_MIN",
    "DEFAULT_MARGINS",
    "KINDS",
    "Kind",
    "Preset",
    "beta0_for",
    "main",
    "run_kind",
    "run_margin",
]

DEFAULT_MARGINS = (1, 2, 3, 4, 6)
DEFAULT_OUT = "demo-out"

SCALE = 0.99  # the seed's decay of beta per iteration

#: Floor of the annealed beta (the seed's was 0).  With beta 0 a feature on the wrong side
#: is pulled towards the origin, where its angle and so its gradient are lost; 2 is the
#: smallest floor with which margin 6 trained on every seed tried on the 8x8 digits
#: (docs/design.md, "The demo's beta floor", has the runs).
BETA_MIN = 2.0


def beta0_for(margin: int) -> float:
    """The seed's starting beta: 100, and 1000 for its margin-6 run (a longer plain-softmax
    phase before the larger margin takes over)."""
    return 1000.0 if margin >= 6 else 100.0


@dataclass(frozen=True)
class Preset:
    """Training settings per dataset: SGD with momentum and weight decay (the seed's
    optimizer), the learning rate divided by 10 after ``lr_drop_fraction`` of the epochs;
    the network's batch normalisation, the floor of beta and the initialisation too,
    because the 8x8 digits and MNIST need different ones (docs/design.md, "The demo's
    MNIST recipe")."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 5e-4
    momentum: float = 0.9
    lr_drop_fraction: float = 0.75
    batch_norm: bool = True
    beta_min: float = BETA_MIN
    #: Glorot-uniform weights and zero biases (MXNet's ``mx.init.Xavier()``, the seed's)
    #: instead of PyTorch's default initialisation.
    xavier_init: bool = False

    @property
    def lr_drop_epoch(self) -> int:
        return max(1, int(self.epochs * self.lr_drop_fraction))


#: 1257 training images in batches of 64: 20 steps per epoch, 1200 in all, so beta
#: (0.99 per step) has left its plain-softmax phase after about 460 steps (690 for
#: margin 6) and the margin shapes the features for the rest.  Batch normalisation and
#: the floor of 2 are what these few images need (see _feature_net and BETA_MIN).
DIGITS = Preset(epochs=60, batch_size=64, lr=0.02)
#: MNIST: the seed's own recipe (mx-lsoftmax's mnist.py): no batch normalisation, Xavier
#: initialisation, lr 0.01 divided by 10 after 10 of 20 epochs, batch 128, beta floor 0.
#: 468 steps per epoch; beta falls under 0.01 within the second epoch (the third for margin
#: 6), so the pure margin term shapes the features for 18 epochs.  The demo's earlier
#: MNIST settings (the digits' network and floor, lr 0.02, 5 epochs) gave a 2.5 deg
#: intra-class angle at margin 4 instead of the seed's ~1.2 (docs/design.md has the runs).
#: An epoch takes about 25 s on one idle CPU thread (about 8 min per margin; more on a
#: shared machine): --device cuda, or fewer --epochs for a first look.
MNIST = Preset(
    epochs=20, batch_size=128, lr=0.01, lr_drop_fraction=0.5, batch_norm=False, beta_min=0.0, xavier_init=True
)


@dataclass(frozen=True)
class Kind:
    """A margin kind as ``--kinds`` trains it: its name there, the head's margin, and
    whether beta anneals (the seed's schedule with the preset's floor, as for the
    L-Softmax margins) or stays 0 throughout."""

    name: str
    margin: Margin
    annealed: bool

    def schedule(self, preset: Preset) -> Schedule:
        if not self.annealed:
            return ConstantSchedule(0.0)
        m = getattr(self.margin, "m", 1)
        return ExponentialSchedule(beta0=beta0_for(int(m)), scale=SCALE, beta_min=preset.beta_min)


#: ``--kinds``: one network per kind, the same network, data, optimizer and epochs as the
#: L-Softmax margins, each kind with the parameters below, chosen for a 2-D embedding and
#: 10 classes (about 36 degrees per class) from one-seed runs on the digits (docs/demo.md,
#: "The margin kinds side by side", has them):
#:
#: - lsoftmax: L-Softmax(4), exactly the margins' run of margin 4 (same schedule, same numbers).
#: - sphereface: SphereFace(4), the paper's m, annealed as L-Softmax(4): the same psi(theta)
#:   with the weight rows normalised needs the same plain-softmax start (beta from 100) and
#:   the floor of 2 (BETA_MIN).
#: - cosface, arcface: features and weights normalised, logits s times cosines.  s = 4, far
#:   below face recognition's 30..64 (hundreds of dimensions, where the classes can be near
#:   orthogonal): in the plane a class's neighbours are 36 deg away, and s = 4 generalised
#:   best here (s = 8 and 16: 93.5-96.9% test accuracy, 4.2-7.0 deg intra-class; s = 4:
#:   96.1-98.0%, 3.5-4.9 deg).  At s = 4 even a feature on its class's centre keeps a
#:   probability under 0.5 (s = 16: 0.91), so the loss never saturates and keeps pulling.
#:   The margins fit inside a 36-degree sector: ArcFace's m = 0.3 rad (17 deg) is just under
#:   the 18 deg half-sector, CosFace's m = 0.2 is about 1 - cos(36 deg) = 0.19, the cosine gap
#:   to a neighbour's centre; these gave the tightest classes of m = 0.1..0.4 (ArcFace) and
#:   0.1..0.5 (CosFace) at s = 4.  beta stays 0: their target is bounded, so no plain-softmax
#:   start is needed, and the seed's schedule with its floor of 2 keeps a third of the margin
#:   (s (cos - m/3) for CosFace); annealed, both trained worse.
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("lsoftmax", LSoftmax(4), annealed=True),
        Kind("sphereface", SphereFace(4), annealed=True),
        Kind("cosface", CosFace(m=0.2, s=4.0), annealed=False),
        Kind("arcface", ArcFace(m=0.3, s=4.0), annealed=False),
    )
}


# --------------------------------------------------------------------------- model


def _feature_net(image_size: int, *, batch_norm: bool = True) -> torch.nn.Module:
    """conv-pool-conv-pool-fc-fc(2), the seed's network scaled to the input.

    28x28 MNIST gets the seed's layers (5x5 convs without padding, 32 and 64 filters, fc
    256); smaller images keep the widths but use padded 3x3 convs so that the two 2x2
    poolings leave a 2x2 map (8 -> 4 -> 2 for the digits).  ``batch_norm`` adds batch
    normalisation after each hidden layer (the seed had none): on the 1257 digit images,
    without it the 2-D features stayed blurred blobs (93% test accuracy), with it they
    form the seed's rays (~99%); MNIST trains without it (see the MNIST preset).  The last
    layer is linear: its 2-D output is what the pictures show.
    """
    from torch import nn

    kernel, pad = (5, 0) if image_size >= 28 else (3, 1)
    side = image_size
    for _ in range(2):
        side = (side + 2 * pad - kernel + 1) // 2
    if side < 1:
        raise ValueError(f"images of {image_size}x{image_size} pixels are too small for the network")

    def norm(layer: type[nn.Module], width: int) -> list[nn.Module]:
        return [layer(width)] if batch_norm else []

    return nn.Sequential(
        nn.Conv2d(1, 32, kernel, padding=pad),
        *norm(nn.BatchNorm2d, 32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel, padding=pad),
        *norm(nn.BatchNorm2d, 64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 256),
        *norm(nn.BatchNorm1d, 256),
        nn.ReLU(),
        nn.Linear(256, 2),
    )


def _xavier_(modules: Iterable[torch.nn.Module]) -> None:
    """MXNet's ``mx.init.Xavier()`` (the seed's): weights uniform in +-sqrt(6 / (fan_in +
    fan_out)), PyTorch's ``xavier_uniform_``; biases 0 (MXNet's Xavier leaves them at 0)."""
    import torch

    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters(recurse=False):
                if name == "weight" and param.dim() >= 2:
                    torch.nn.init.xavier_uniform_(param)
                elif name == "bias":
                    param.zero_()


@contextmanager
def _reproducible() -> Iterator[None]:
    """One CPU thread and deterministic algorithms, restored afterwards (tests run in-process)."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def run_margin(
    data: Dataset, margin: int, *, preset: Preset, seed: int, device: str, progress: bool = True
) -> tuple[dict[str, Any], np.ndarray]:
    """Train one network with the given L-Softmax margin; return its results row and test features."""
    schedule = ExponentialSchedule(beta0=beta0_for(margin), scale=SCALE, beta_min=preset.beta_min)
    row, features = _train(
        data,
        margin,
        schedule,
        preset=preset,
        seed=seed,
        device=device,
        desc=f"margin {margin}",
        progress=progress,
    )
    return {"margin": margin, **row}, features


def run_kind(
    data: Dataset, kind: Kind, *, preset: Preset, seed: int, device: str, progress: bool = True
) -> tuple[dict[str, Any], np.ndarray]:
    """Train one network with the head of a margin kind (KINDS); return its results row
    (``kind``, the margin's ``to_dict()``, the numbers) and test features."""
    schedule = kind.schedule(preset)
    row, features = _train(
        data,
        kind.margin,
        schedule,
        preset=preset,
        seed=seed,
        device=device,
        desc=kind.name,
        progress=progress,
    )
    return {"kind": kind.name, "margin": kind.margin.to_dict(), **row}, features


def _train(
    data: Dataset,
    margin: int | Margin,
    schedule: Schedule,
    *,
    preset: Preset,
    seed: int,
    device: str,
    desc: str,
    progress: bool,
) -> tuple[dict[str, Any], np.ndarray]:
    """One network, its head's margin and beta schedule given: the numbers (without the
    margin) and the test features."""
    import torch
    from tqdm import tqdm

    from lsoftmax_core.adapters.torch import LSoftmaxLinear

    torch.manual_seed(seed)
    dev = torch.device(device)
    net = _feature_net(data.x_train.shape[-1], batch_norm=preset.batch_norm).to(dev)
    head = LSoftmaxLinear(2, 10, margin=margin, schedule=schedule, device=dev)
    if preset.xavier_init:
        _xavier_([*net.modules(), head])
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=preset.lr, momentum=preset.momentum, weight_decay=preset.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()

    x_train = torch.from_numpy(data.x_train).to(dev)
    y_train = torch.from_numpy(data.y_train).to(dev)
    n = x_train.shape[0]
    # Full batches only (a reshuffle each epoch, so every image is still used): a last
    # batch of one image would break batch normalisation's training statistics.
    batch = min(preset.batch_size, n)
    batches = n // batch
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(
        total=preset.epochs * batches,
        desc=desc,
        unit="it",
        disable=not progress,
        leave=True,
        dynamic_ncols=True,
    )
    net.train()
    head.train()
    start = time.perf_counter()
    for epoch in range(preset.epochs):
        lr = preset.lr * (0.1 if epoch >= preset.lr_drop_epoch else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=gen).to(dev)
        total = torch.zeros((), device=dev)
        for b in range(batches):
            idx = order[b * batch : (b + 1) * batch]
            logits = head(net(x_train[idx]), y_train[idx])
            loss = loss_fn(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            head.step()
            total += loss.detach()
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{float(total) / batches:.3f}", beta=f"{head.beta:.3g}")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    bar.close()

    net.eval()
    head.eval()
    with torch.no_grad():
        feats, correct = [], 0
        for b in range(0, data.x_test.shape[0], 1000):
            f = net(torch.from_numpy(data.x_test[b : b + 1000]).to(dev))
            # eval mode: the kind's plain logits (x @ W^T for L-Softmax; cosines for the others)
            pred = head(f).argmax(dim=1).cpu().numpy()
            correct += int((pred == data.y_test[b : b + 1000]).sum())
            feats.append(f.cpu().numpy().astype(np.float64))
    features = np.concatenate(feats)
    intra, inter = angle_stats(features, data.y_test)
    row = {
        "test_accuracy": correct / data.y_test.shape[0],
        "intra_class_angle_deg": intra,
        "inter_class_min_angle_deg": inter,
        "train_seconds": round(seconds, 2),
        "schedule": schedule.to_dict(),
    }
    return row, features


# --------------------------------------------------------------------------- command line


def _margins(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers (e.g. 1,2,4)"
        ) from None
    bad = [m for m in values if not 1 <= m <= MAX_MARGIN]
    if bad:
        raise argparse.ArgumentTypeError(f"margins {bad} out of range: each must be in [1, {MAX_MARGIN}]")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a margin")
    return values


def _kinds(text: str) -> tuple[str, ...]:
    names = tuple(p.strip().lower() for p in text.split(","))
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown kind {unknown[0]!r} in {text!r}: the kinds are {','.join(KINDS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a kind")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 2**63)")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lsoftmax-demo",
        description="Train a small CNN with a 2-D feature layer and an L-Softmax head, once per "
        "margin (or once per margin kind with --kinds), and draw the learned test-set features "
        "(the seed's MNIST pictures) with their accuracy and angles.",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument(
        "--margins",
        type=_margins,
        default=None,
        help="comma-separated L-Softmax margins (default: 1,2,3,4,6)",
    )
    p.add_argument(
        "--kinds",
        type=_kinds,
        default=None,
        help=f"comma-separated margin kinds instead of L-Softmax margins, one network each, "
        f"drawn side by side (features-all-kinds.png): {','.join(KINDS)}, trained as "
        + ", ".join(f"{k.margin!r}" for k in KINDS.values())
        + " (docs/demo.md)",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"training epochs per margin (default: {DIGITS.epochs} for the digits, "
        f"{MNIST.epochs} for MNIST); the lr drops 10x after 3/4 of them for the digits, "
        "after half of them for MNIST (the seed's 10 of 20)",
    )
    p.add_argument(
        "--mnist",
        metavar="DIR",
        default=None,
        help="train on MNIST from DIR holding the four IDX files, standard or dotted names "
        "(train-images-idx3-ubyte or train-images.idx3-ubyte, ..., each optionally .gz), directly "
        "or in torchvision's layout DIR/MNIST/raw (torchvision.datasets.MNIST(root=DIR, download=True)), "
        "with the seed's recipe, instead of the scikit-learn 8x8 digits",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="default: cpu; cuda runs the network in PyTorch and the L-Softmax layer through the CuPy backend",
    )
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    return p


def _preset(base: Preset, epochs: int | None) -> Preset:
    return base if epochs is None else replace(base, epochs=epochs)


def _versions(device: str = "cpu") -> dict[str, str]:
    """The libraries a run's numbers depend on: the same seed gives the same results.json
    only with the same versions (another torch release rounds the CNN differently)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("lsoftmax-core", "torch", "numpy", "scikit-learn"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    if device == "cuda":
        # On CUDA the layer's numbers also depend on CuPy (its kernels and cuBLAS calls); its
        # distribution is named per CUDA version (cupy-cuda12x), so ask the module.
        import cupy

        found["cupy"] = cupy.__version__
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.kinds is not None and args.margins is not None:
        parser.error(
            "--kinds and --margins exclude each other: --kinds trains each kind with its own "
            "parameters (L-Softmax at margin 4); use --margins alone for L-Softmax margins"
        )
    if args.kinds is None and args.margins is None:
        args.margins = DEFAULT_MARGINS
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a folder")
    try:
        import matplotlib
        import torch
    except ImportError as e:
        parser.error(f"the demo needs the 'demo' extra (pip install 'lsoftmax-core[demo]'): {e}")
    matplotlib.use("Agg")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: PyTorch sees no CUDA device (torch.cuda.is_available() is False)")
        # The PyTorch adapter runs CUDA tensors through the core's CuPy backend: without
        # CuPy the first training step would fail deep inside the layer, after the data load.
        try:
            import cupy  # noqa: F401
        except ImportError as e:
            parser.error(
                "--device cuda: the L-Softmax layer runs on CUDA through the CuPy backend, and CuPy "
                f"cannot be imported ({e}); install the CuPy wheel for your CUDA, e.g. pip install cupy-cuda12x"
            )
        # cuBLAS is deterministic only with a fixed workspace (set before its first use).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        data = load_digits_split() if args.mnist is None else load_mnist(args.mnist)
    except DataError as e:
        parser.error(str(e))
    if len(data.y_train) < 2:
        parser.error(f"{data.name}: the training set needs at least 2 images, found {len(data.y_train)}")
    preset = _preset(DIGITS if args.mnist is None else MNIST, args.epochs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {out}: cannot create the folder: {e}")
    if args.kinds is None:
        what = f"margins {','.join(map(str, args.margins))}"
        # (sort key, file name, title's label, the run)
        jobs = [
            (margin, f"features-margin-{margin}.png", f"margin {margin}", partial(run_margin, data, margin))
            for margin in args.margins
        ]
        combined = "features-all-margins.png"
        chosen: dict[str, Any] = {"margins": sorted(args.margins)}
    else:
        kinds = [KINDS[name] for name in args.kinds]
        what = f"kinds {','.join(args.kinds)}"
        order = list(KINDS)
        jobs = [
            (order.index(k.name), f"features-kind-{k.name}.png", repr(k.margin), partial(run_kind, data, k))
            for k in kinds
        ]
        combined = "features-all-kinds.png"
        chosen = {"kinds": [name for name in KINDS if name in args.kinds]}
    print(
        f"lsoftmax-demo: {data.name}, {len(data.y_train)} train / {len(data.y_test)} test images, "
        f"{what}, {preset.epochs} epochs, device {args.device}, "
        f"seed {args.seed} -> {out}",
        file=sys.stderr,
    )

    config = {
        "dataset": data.name,
        "train_size": int(len(data.y_train)),
        "test_size": int(len(data.y_test)),
        "seed": args.seed,
        "device": args.device,
        **chosen,
        **asdict(preset),
        "lr_drop_epoch": preset.lr_drop_epoch,
        "torch": torch.__version__,
        "versions": _versions(args.device),
    }
    runs: list[tuple[int, dict[str, Any]]] = []
    panels = []
    with _reproducible():
        for key, filename, label, run in jobs:
            row, features = run(preset=preset, seed=args.seed, device=args.device)
            save_features(out / filename, features, data.y_test)
            runs.append((key, row))
            panels.append((key, f"{label}: {100 * row['test_accuracy']:.1f}%", features))
            # Written after every run, in increasing margin order (the kinds in KINDS's order)
            # whatever the order asked for: an MNIST run takes an hour on a CPU, and one
            # stopped early keeps the runs it finished (results.json then has fewer runs
            # than config.margins or config.kinds).
            runs.sort(key=lambda r: r[0])
            panels.sort(key=lambda p: p[0])
            save_combined(out / combined, [(title, f, data.y_test) for _, title, f in panels])
            results = {"runs": [r for _, r in runs], "config": config}
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table([r for _, r in runs]))
    return 0
