"""The demo's numbers (angles of the 2-D features) and pictures (the seed's style).

The pictures follow the seed (mx-lsoftmax's mnist.py): test features scattered in the
plane, one colour per class from an evenly spaced HLS hue circle, the class number at
the median of its points, outlined in white, on a white background without axes.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["angle_stats", "class_palette", "markdown_table", "run_label", "save_combined", "save_features"]

F64 = npt.NDArray[np.float64]


def _unit(v: F64) -> F64:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 0.0, n, 1.0)


def _angle_deg(u: F64, v: F64) -> F64:
    """Angle between unit vectors, via atan2(|u x v|, u.v): accurate near 0 and 180 deg."""
    cross = u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]
    dot = np.sum(u * v, axis=-1)
    return np.asarray(np.degrees(np.arctan2(np.abs(cross), dot)), dtype=np.float64)


def angle_stats(features: npt.NDArray[Any], labels: npt.NDArray[Any]) -> tuple[float, float]:
    """(intra-class angle, inter-class minimum angle), in degrees, of 2-D features.

    A class's mean direction is the normalised mean of its features' unit vectors, so that
    the few long features do not dominate it.  Intra-class angle: the mean, over all
    samples, of the angle between a feature and its class's mean direction.  Inter-class
    minimum angle: the smallest angle between two classes' mean directions (ten rays in
    the plane can be at most 36 degrees apart).
    """
    f = _unit(np.asarray(features, dtype=np.float64))
    y = np.asarray(labels)
    classes = np.unique(y)
    means = _unit(np.stack([f[y == c].mean(axis=0) for c in classes]))
    index = np.searchsorted(classes, y)
    intra = float(np.mean(_angle_deg(f, means[index])))
    if len(classes) < 2:
        return intra, float("nan")
    i, j = np.triu_indices(len(classes), k=1)
    inter = float(np.min(_angle_deg(means[i], means[j])))
    return intra, inter


def class_palette(n: int) -> list[tuple[float, float, float]]:
    """n colours evenly spaced in hue (lightness 0.6, saturation 0.65, first hue 0.01):
    the 'hls' palette the seed took from seaborn, computed here without seaborn."""
    hues = (np.linspace(0.0, 1.0, n, endpoint=False) + 0.01) % 1.0
    return [colorsys.hls_to_rgb(float(h), 0.6, 0.65) for h in hues]


def _draw(ax: Any, features: npt.NDArray[Any], labels: npt.NDArray[Any], *, size: float, font: float) -> None:
    import matplotlib.patheffects as path_effects

    classes = np.unique(labels)
    palette = np.array(class_palette(int(classes.max()) + 1))
    ax.scatter(features[:, 0], features[:, 1], s=size, lw=0, c=palette[labels])
    for c in classes:
        x, y = np.median(features[labels == c], axis=0)
        text = ax.text(x, y, str(int(c)), fontsize=font, ha="center", va="center")
        text.set_path_effects([path_effects.Stroke(linewidth=5, foreground="w"), path_effects.Normal()])
    ax.set_aspect("equal")
    ax.axis("off")


def save_features(path: Path, features: npt.NDArray[Any], labels: npt.NDArray[Any]) -> None:
    """One margin's (or kind's) picture, 800x800 pixels like the seed's."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 8), dpi=100, facecolor="white")
    ax = fig.add_subplot(1, 1, 1)
    _draw(ax, features, labels, size=40, font=14)
    fig.savefig(path, facecolor="white")
    plt.close(fig)


def save_combined(path: Path, panels: Sequence[tuple[str, npt.NDArray[Any], npt.NDArray[Any]]]) -> None:
    """All margins (or kinds) side by side; each panel is (title, features, labels)."""
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.9), dpi=100, facecolor="white", squeeze=False)
    for ax, (title, features, labels) in zip(axes[0], panels):
        _draw(ax, features, labels, size=8, font=10)
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, facecolor="white")
    plt.close(fig)


def run_label(row: dict[str, Any]) -> str:
    """A results row's name: its L-Softmax margin (an int), or a kind's margin as the
    library writes it (``ArcFace(m=0.3, s=4.0)``) from the row's ``to_dict()``."""
    margin = row["margin"]
    if isinstance(margin, dict):
        from lsoftmax_core.margins import margin_from_dict

        return repr(margin_from_dict(margin))
    return str(margin)


def markdown_table(runs: Sequence[dict[str, Any]]) -> str:
    """The results as a GitHub markdown table (one row per margin, or per kind)."""
    kinds = any("kind" in r for r in runs)
    first, rule = ("| kind ", "|:-----") if kinds else ("| margin ", "|-------:")
    lines = [
        f"{first}| test accuracy | intra-class angle (deg) | inter-class min angle (deg) | train time (s) |",
        f"{rule}|--------------:|------------------------:|----------------------------:|---------------:|",
    ]
    for r in runs:
        lines.append(
            f"| {run_label(r)} | {100.0 * r['test_accuracy']:.2f}% | {r['intra_class_angle_deg']:.2f} "
            f"| {r['inter_class_min_angle_deg']:.2f} | {r['train_seconds']:.1f} |"
        )
    return "\n".join(lines)
