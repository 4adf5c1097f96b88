"""Per-class sums of per-sample rows for the NumPy backend's gradient: grad_w[j] += the sum
of the rows of the samples labelled j, deterministic (each class's sum runs strictly in
sample order), in few NumPy calls, since after the GEMMs each small call costs 5-10 us
(its code and data are out of the caches).  Also the cached index arrays they and the
backend share."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["add_per_class", "arange", "feature_index"]


@functools.lru_cache(maxsize=16)
def feature_index(n: int, d: int) -> npt.NDArray[np.intp]:
    """0..d-1 repeated n times (read-only, cached): the feature of each entry of an (n, d) block."""
    a = np.tile(np.arange(d, dtype=np.intp), n)
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=16)
def arange(n: int) -> npt.NDArray[np.intp]:
    """0..n-1 (read-only, cached: the row indices of every call of one batch size)."""
    a = np.arange(n, dtype=np.intp)
    a.flags.writeable = False
    return a


def add_per_class(grad_w: npt.NDArray[Any], label: npt.NDArray[Any], rows: npt.NDArray[Any]) -> None:
    """grad_w[j] += sum of rows[i] over the samples i with label j, in sample order.
    ``rows`` is scratch: it may be overwritten.

    Deterministic: each class's sum runs in sample order.  Few features and few classes (a
    small head such as 2-D features and 10 classes): one bincount sums every (class,
    feature) pair in float64, added to grad_w once.  Otherwise a stable sort by label fixes
    the order; only the samples of repeated classes are summed (``_segment_sums``), each of
    them then carries its class's total, and one gather-add-scatter over the batch adds
    every row.  After the GEMMs each small NumPy call here costs 5-10 us (its code and data
    are out of the caches; 1 us in a loop), so the common cases take few calls: every class
    once (large C) or every class repeated (small C).
    """
    n, d = rows.shape
    c = grad_w.shape[0]
    if d <= 8 and c <= 4 * n:
        cells = label.astype(np.intp, copy=False).repeat(d)  # flat (class, feature) of each entry
        cells *= d
        cells += feature_index(n, d)
        grad_w += np.bincount(cells, weights=rows.ravel(), minlength=c * d).reshape(c, d)
        return
    order = np.argsort(label, kind="stable")
    sorted_label = label.take(order)
    cont = np.empty(n, dtype=bool)  # sorted position p continues the class of position p - 1
    cont[:1] = False
    np.equal(sorted_label[1:], sorted_label[:-1], out=cont[1:])
    if not cont.any():  # every class once
        _add_rows(grad_w, label, rows)
        return
    repeated = cont.copy()  # sorted positions of classes met more than once
    repeated[:-1] |= cont[1:]
    if repeated.all():  # every class of the batch repeats (a small C): one row per class
        starts = np.flatnonzero(~cont)
        sums = _segment_sums(rows, order, starts, _lengths(starts, n))
        _add_rows(grad_w, sorted_label.take(starts), sums)
        return
    pos = np.flatnonzero(repeated)
    members = order.take(pos)  # the samples of repeated classes, class by class, in sample order
    starts = np.flatnonzero(~cont.take(pos))
    counts = _lengths(starts, pos.size)
    sums = _segment_sums(rows, members, starts, counts)
    rows[members] = sums.repeat(counts, axis=0)  # every sample of a class now carries its total
    _add_rows(grad_w, label, rows)


def _lengths(starts: npt.NDArray[np.intp], total: int) -> npt.NDArray[np.intp]:
    """The lengths of the segments that start at ``starts`` (ascending, at least one) and
    end at ``total``: ``np.diff(starts, append=total)`` without its Python wrapper (6 us)."""
    out = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=out[:-1])
    out[-1] = total - starts[-1]
    return out


def _add_rows(grad_w: npt.NDArray[Any], classes: npt.NDArray[Any], rows: npt.NDArray[Any]) -> None:
    """grad_w[classes] += rows for distinct classes (or repeated ones whose rows are equal:
    their scatters then write the same values): a ``take`` (cheaper than fancy indexing's
    gather: 21 against 27 us for 256 rows of 512 features, measured once) and an in-place
    add, then one scatter; the same bits as ``grad_w[classes] += rows``."""
    dest = grad_w.take(classes, axis=0)
    dest += rows
    grad_w[classes] = dest


def _segment_sums(
    rows: npt.NDArray[Any], members: npt.NDArray[np.intp], starts: npt.NDArray[np.intp], counts: npt.NDArray[np.intp]
) -> npt.NDArray[Any]:
    """The sums of ``rows`` over segments of ``members`` (segment k: the ``counts[k] >= 1``
    row indices from ``starts[k]``), one per segment in segment order, each formed strictly
    in member order, ((r_0 + r_1) + r_2) + ...: never pairwise or reordered (tested).

    NumPy adds along a non-contiguous axis one row after the other (along a contiguous
    one, as at D = 1, it sums pairwise).  Three ways, by cost:

    * a small padded (segments, longest, D) block, summed over its middle axis: six calls.
      The padding, and the start of every reduction, is -0.0, which leaves any sum as it is
      (NumPy's own start, +0.0, would turn a sum of -0.0 into +0.0);
    * otherwise a loop over ranks (step r adds every segment's r-th row to its sum; the
      segments are kept longest first, so those still running are a prefix: one slice add
      per rank) or, when the segments are fewer than the ranks, over segments (one
      reduction each over its contiguous rows).  No buffer beyond the gathered rows: a
      large block would cost more than the loop in data, and in page faults after the GEMMs.
    """
    g, d = starts.size, rows.shape[1]
    longest = int(np.maximum.reduce(counts))
    segment = np.repeat(arange(g), counts)
    rank = arange(members.size) - starts.take(segment)  # each member's place in its segment
    if g * longest * d <= _SMALL_BLOCK and d > 1:
        block = np.full((g, longest, d), -0.0, dtype=rows.dtype)
        block[segment, rank] = rows.take(members, axis=0)
        return np.add.reduce(block, axis=1, initial=-0.0)  # type: ignore[no-any-return]
    if longest > g and d > 1:
        grouped = rows.take(members, axis=0)
        sums = np.empty((g, d), dtype=rows.dtype)
        for k, (s, c) in enumerate(zip(starts.tolist(), counts.tolist())):
            np.add.reduce(grouped[s : s + c], axis=0, out=sums[k], initial=-0.0)
        return sums
    by_length = np.argsort(-counts, kind="stable")  # segments, longest first
    place = np.empty(g, dtype=np.intp)  # segment k's row within each rank's block
    place[by_length] = arange(g)
    rank *= g
    rank += place.take(segment)
    ranked = rows.take(members.take(np.argsort(rank)), axis=0)  # rank 0 of every segment, then rank 1, ...
    running = g - np.cumsum(np.bincount(counts, minlength=longest))  # running[r]: segments longer than r
    sums = ranked[:g]  # rank 0, then each rank's rows added to the prefix of segments still running
    offset = g
    for k in running[1:longest].tolist():
        sums[:k] += ranked[offset : offset + k]
        offset += k
    return sums.take(place, axis=0)


#: Padded blocks up to this many entries (128 KiB of float32): fewer NumPy calls than a loop.
_SMALL_BLOCK = 1 << 15
