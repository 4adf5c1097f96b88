"""What the class-parallel head's ranks check before any data moves: a rank's own input
(:func:`_local_problem`), and its settings as int64 codes, to compare in one all-gather
(:data:`.parallel._SETTINGS`): floats by their float64 bits, a margin by a hash of its
kind and parameters, and the way back for the error naming another rank's value."""

from __future__ import annotations

import hashlib
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lsoftmax_core.checks import supported_dtypes
from lsoftmax_core.margins import ArcFace, CombinedMargin, CosFace, LSoftmax, Margin, SphereFace, margin_of

from ._bridge import Resolved

# Dtypes by a small code, so that the ranks can compare theirs in one int64 all-gather.
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_CPU_DTYPES = tuple(t for t in _DTYPES if str(t).split(".")[1] in {str(d) for d in supported_dtypes("numpy")})


def _dtype_code(dtype: torch.dtype) -> int:
    """1 + the dtype's index in :data:`_DTYPES`, 0 for another."""
    return 1 + _DTYPES.index(dtype) if dtype in _DTYPES else 0


def _code_dtype(code: int) -> torch.dtype | str:
    return _DTYPES[code - 1] if code else "another"


def _float_bits(value: float) -> int:
    return int(np.array(value, dtype=np.float64).view(np.int64))


def _bits_float(code: int) -> float:
    return float(np.array(code, dtype=np.int64).view(np.float64))


# A margin in full as int64s, for the error that names another rank's: its kind's index,
# then its parameters' float64 bits (in the dataclass's order, zeros after the last).
_MARGIN_KINDS: tuple[type[Margin], ...] = (LSoftmax, SphereFace, CosFace, ArcFace, CombinedMargin)
_MARGIN_WIDTH = 1 + max(len(fields(kind)) for kind in _MARGIN_KINDS)  # type: ignore[arg-type]


def _margin_code(margin: Resolved) -> int:
    """One int64 that equals another rank's exactly when the margins are equal: L-Softmax's
    m (>= 1), or minus one minus a 63-bit hash of another kind's :func:`_margin_codes`."""
    if not isinstance(margin, Margin):
        return margin
    digest = hashlib.blake2b(np.array(_margin_codes(margin), dtype=np.int64).tobytes(), digest_size=8).digest()
    return -1 - (int.from_bytes(digest, "little") >> 1)


def _margin_codes(margin: Resolved) -> list[int]:
    kind = margin_of(margin)
    params = [_float_bits(float(getattr(kind, f.name))) for f in fields(kind)]  # type: ignore[arg-type]
    return [_MARGIN_KINDS.index(type(kind)), *params, *[0] * (_MARGIN_WIDTH - 1 - len(params))]


def _margin_of_codes(codes: list[int]) -> Resolved:
    """The inverse of :func:`_margin_codes`, L-Softmax as its int m (as the margin is resolved)."""
    kind = _MARGIN_KINDS[codes[0]]
    names = [f.name for f in fields(kind)]  # type: ignore[arg-type]
    values: list[Any] = [_bits_float(c) for c in codes[1 : 1 + len(names)]]
    if kind in (LSoftmax, SphereFace):
        values = [int(v) for v in values]
    margin = kind(**dict(zip(names, values)))
    return margin.m if isinstance(margin, LSoftmax) else margin  # type: ignore[attr-defined]


def _local_problem(x: Any, target: Any, weight: Tensor, in_features: int) -> Exception | None:
    """This rank's input problem, if any (raised on every rank once the ranks have compared)."""
    for name, t in (("x", x), ("target", target)):
        if not isinstance(t, Tensor):
            return TypeError(f"{name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__qualname__}")
        if t.layout != torch.strided:
            return TypeError(f"{name} must be a dense (strided) tensor, got {name}.layout={t.layout}")
        if t.device != weight.device:
            return ValueError(f"{name}.device={t.device} must be the weight's device {weight.device}")
    if x.dim() != 2 or x.shape[1] != in_features:
        return ValueError(f"x must have shape (N, in_features) = (N, {in_features}), got x.shape={tuple(x.shape)}")
    if x.dtype != weight.dtype:
        return TypeError(
            f"x and weight must have the same dtype: x.dtype={x.dtype}, weight.dtype={weight.dtype} "
            "(no silent promotion; under torch.autocast float16/bfloat16 inputs are computed in float32)"
        )
    if x.device.type == "cpu" and x.dtype not in _CPU_DTYPES:
        names = ", ".join(str(t) for t in _CPU_DTYPES)
        return TypeError(f"x.dtype={x.dtype} is not supported on the CPU (supported: {names})")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        return TypeError(f"target must have an integer dtype, got target.dtype={target.dtype}")
    if tuple(target.shape) != (x.shape[0],):
        return ValueError(f"target must have shape (N,) = ({x.shape[0]},), got target.shape={tuple(target.shape)}")
    if target.requires_grad:
        return ValueError("target must not require grad (it holds class indices)")
    return None
