"""Data for the demo: scikit-learn's bundled 8x8 digits, or real MNIST from IDX files
(a folder of the four files, or torchvision's download folder).

NumPy only (scikit-learn is imported lazily, for the digits).  Images come back as
float32 arrays (N, 1, H, W) scaled to [-1, 1] the way the seed did for MNIST
((pixel - 128) / 128), labels as int64 (N,).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "MNIST_FILES",
    "MNIST_SUBFOLDERS",
    "DataError",
    "Dataset",
    "load_digits_split",
    "load_mnist",
    "mnist_folder",
    "mnist_names",
    "read_idx",
]

#: The four files of the standard MNIST distribution (each may also be gzipped, "+.gz",
#: or dotted, "train-images.idx3-ubyte": see mnist_names).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

#: The digits split is fixed (independent of --seed) so that every run, whatever its
#: seed, is scored on the same test images.
DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0


class DataError(ValueError):
    """A data folder or file that cannot be used; the message names it."""


class Dataset(NamedTuple):
    name: str
    x_train: npt.NDArray[np.float32]  # (N, 1, H, W) in [-1, 1]
    y_train: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """Read one IDX file (gzipped when its name ends in .gz) into a native-endian array.

    Format (yann.lecun.com/exdb/mnist): a 4-byte magic 0x00 0x00 <type> <ndim>, then
    <ndim> big-endian uint32 sizes, then the data, big-endian, row-major.
    """
    p = Path(path)
    try:
        if p.suffix == ".gz":
            with gzip.open(p, "rb") as f:
                raw = f.read()
        else:
            raw = p.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read IDX file {p}: {e}") from e
    if len(raw) < 4:
        raise DataError(f"malformed IDX file {p}: {len(raw)} bytes, shorter than the 4-byte magic number")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"malformed IDX file {p}: bad magic number 0x{raw[:4].hex()} "
            "(expected 0x0000TTDD with type TT in 08,09,0b,0c,0d,0e and DD >= 1 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"malformed IDX file {p}: header of {ndim} dimensions truncated ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        raise DataError(
            f"malformed IDX file {p}: dimensions {dims} of {dtype.name} need {expected} data bytes, "
            f"found {found}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def mnist_names(stem: str) -> tuple[str, ...]:
    """The names one MNIST file goes by: the standard ``train-images-idx3-ubyte``, the
    dotted ``train-images.idx3-ubyte`` (as some copies ship it), each plain or gzipped, in the
    order they are looked for."""
    dotted = stem.replace("-idx", ".idx")
    return (stem, stem + ".gz", dotted, dotted + ".gz")


#: Where the four files may lie under the folder given to ``--mnist``: in it, or where
#: ``torchvision.datasets.MNIST(root=DIR, download=True)`` puts them (DIR/MNIST/raw, or raw/
#: when DIR is torchvision's MNIST folder itself).
MNIST_SUBFOLDERS = (".", "MNIST/raw", "raw")

_EXPECTED = (
    "the four standard files: " + ", ".join(MNIST_FILES.values()) + " (each may be dotted, "
    "train-images.idx3-ubyte, and gzipped, +.gz)"
)


def _find(folder: Path, stem: str) -> Path | None:
    for name in mnist_names(stem):  # the first found wins (gunzip -k leaves both a file and its .gz)
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def mnist_folder(root: str | os.PathLike[str]) -> Path:
    """The folder under ``root`` that holds the MNIST files: ``root`` itself or one of
    :data:`MNIST_SUBFOLDERS` (torchvision's layout), the first holding any of the four."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"--mnist folder {base} does not exist or is not a folder")
    for sub in MNIST_SUBFOLDERS:
        folder = base / sub
        if folder.is_dir() and any(_find(folder, stem) is not None for stem in MNIST_FILES.values()):
            return folder
    looked = ", ".join(str(base / sub) for sub in MNIST_SUBFOLDERS)  # base / "." is base
    raise DataError(
        f"MNIST folder {base} has no {MNIST_FILES['train_images']} (looked in {looked}); it must hold "
        f"{_EXPECTED}, directly or where torchvision.datasets.MNIST(root={base}, download=True) "
        f"leaves them, {base / 'MNIST' / 'raw'}"
    )


def _require(folder: Path, stem: str) -> Path:
    found = _find(folder, stem)
    if found is None:
        raise DataError(
            f"MNIST folder {folder} has no {stem} (looked for {', '.join(mnist_names(stem))}); "
            f"it must hold {_EXPECTED}"
        )
    return found


def _to_unit_range(images: npt.NDArray[Any], top: float) -> npt.NDArray[np.float32]:
    """Pixels in [0, top] -> [-1, 1], as (N, 1, H, W) float32."""
    half = top / 2.0
    return ((images.astype(np.float32) - half) / half)[:, None, :, :]


def load_mnist(folder: str | os.PathLike[str]) -> Dataset:
    """MNIST from a folder holding the four IDX files (standard or dotted names, gzipped or
    not), directly or in torchvision's layout (``folder/MNIST/raw``, see :func:`mnist_folder`)."""
    root = mnist_folder(folder)
    arrays = {
        key: (path, read_idx(path)) for key, path in ((k, _require(root, s)) for k, s in MNIST_FILES.items())
    }
    for split in ("train", "test"):
        img_path, images = arrays[f"{split}_images"]
        lab_path, labels = arrays[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"malformed MNIST file {img_path}: expected 3-D uint8 images (N, rows, cols), "
                f"got {images.ndim}-D {images.dtype} of shape {images.shape}"
            )
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise DataError(
                f"malformed MNIST file {lab_path}: expected 1-D uint8 labels, "
                f"got {labels.ndim}-D {labels.dtype} of shape {labels.shape}"
            )
        if labels.shape[0] != images.shape[0]:
            raise DataError(
                f"MNIST files {img_path} and {lab_path} disagree: {images.shape[0]} images, "
                f"{labels.shape[0]} labels"
            )
        if labels.size and int(labels.max()) > 9:
            raise DataError(f"malformed MNIST file {lab_path}: label {int(labels.max())} is not a digit 0-9")
        if images.shape[0] == 0:
            raise DataError(f"MNIST file {img_path} holds no images")
    if arrays["train_images"][1].shape[1:] != arrays["test_images"][1].shape[1:]:
        raise DataError(
            f"MNIST train and test images differ in size: {arrays['train_images'][1].shape[1:]} "
            f"vs {arrays['test_images'][1].shape[1:]} (folder {root})"
        )
    return Dataset(
        name=f"MNIST ({root})",
        x_train=_to_unit_range(arrays["train_images"][1], 255.0),
        y_train=arrays["train_labels"][1].astype(np.int64),
        x_test=_to_unit_range(arrays["test_images"][1], 255.0),
        y_test=arrays["test_labels"][1].astype(np.int64),
    )


def load_digits_split() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, pixels 0..16), fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images,
        digits.target,
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    return Dataset(
        name="scikit-learn digits 8x8",
        x_train=_to_unit_range(x_train, 16.0),
        y_train=np.asarray(y_train, dtype=np.int64),
        x_test=_to_unit_range(x_test, 16.0),
        y_test=np.asarray(y_test, dtype=np.int64),
    )
