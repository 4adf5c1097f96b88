"""The demo (lsoftmax-demo): IDX reading, MNIST folder errors, flags, metrics, a quick run.

The runs train for one epoch only: they check the plumbing (files, JSON schema, table,
reproducibility), not the pictures; the committed docs/demo/ holds a real default run.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from lsoftmax_core.demo import app as demo  # noqa: E402
from lsoftmax_core.demo.data import MNIST_FILES, DataError, load_mnist, mnist_names, read_idx  # noqa: E402
from lsoftmax_core.demo.plot import angle_stats, class_palette, markdown_table  # noqa: E402

RUN_KEYS = {"margin", "test_accuracy", "intra_class_angle_deg", "inter_class_min_angle_deg", "train_seconds"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(a: np.ndarray) -> bytes:
    """An IDX file's bytes, written from the format's description (independent of read_idx)."""
    header = bytes([0, 0, _IDX_CODES[a.dtype], a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, a: np.ndarray) -> Path:
    data = idx_bytes(a)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def mnist_name(key: str, *, dotted: bool = False) -> str:
    """A file's standard name (train-images-idx3-ubyte) or dotted one (train-images.idx3-ubyte)."""
    return MNIST_FILES[key].replace("-idx", ".idx") if dotted else MNIST_FILES[key]


def write_mnist(
    folder: Path, n_train: int = 96, n_test: int = 40, *, gz: bool = False, dotted: bool = False
) -> Path:
    """A small MNIST-format folder: the 8x8 digits blown up to 28x28 (3x3 pixel blocks)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images, np.ones((3, 3)))  # 24x24, values 0..16
    images = np.pad(images, ((0, 0), (2, 2), (2, 2))) * (255.0 / 16.0)
    images = np.round(images).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    parts = {
        "train_images": images[:n_train],
        "train_labels": labels[:n_train],
        "test_images": images[n_train : n_train + n_test],
        "test_labels": labels[n_train : n_train + n_test],
    }
    for key, arr in parts.items():
        write_idx(folder / (mnist_name(key, dotted=dotted) + suffix), arr)
    return folder


# --------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([7, 0, 255, 3], dtype=np.uint8),
        np.array([[-5, 300], [70000, -1]], dtype=np.int32),
        np.array([-3, 4, -128, 127], dtype=np.int8),
        np.array([[1.5, -2.25, 1e30]], dtype=np.float32),
        np.array([math.pi, -0.0, 1e-300], dtype=np.float64),
        np.zeros((0, 28, 28), dtype=np.uint8),
    ],
    ids=["u8-3d", "u8-1d", "i32", "i8", "f32", "f64", "empty"],
)
def test_read_idx_round_trip(tmp_path, array, suffix):
    path = write_idx(tmp_path / f"a.idx{suffix}", array)
    got = read_idx(path)
    assert got.dtype == array.dtype and got.dtype.isnative
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "shorter than the 4-byte magic"),
        (b"\x00\x00\x08", "shorter than the 4-byte magic"),
        (b"\x01\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x00", "bad magic number 0x01000801"),
        (b"\x00\x00\x07\x01" + (1).to_bytes(4, "big") + b"\x00", "bad magic number 0x00000701"),
        (b"\x00\x00\x08\x00", "bad magic number"),
        (b"\x00\x00\x08\x03" + (2).to_bytes(4, "big"), "header of 3 dimensions truncated"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00" * 4, "need 5 data bytes, found 4"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00" * 6, "need 5 data bytes, found 6"),
        (b"\x00\x00\x0c\x01" + (2).to_bytes(4, "big") + b"\x00" * 4, "need 8 data bytes, found 4"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, data, needle):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match="malformed IDX file") as info:
        read_idx(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_read_idx_rejects_a_broken_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(good[: len(good) // 2])
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(idx_bytes(np.arange(3, dtype=np.uint8)))
    for path in (truncated, not_gzip):
        with pytest.raises(DataError, match="cannot read IDX file") as info:
            read_idx(path)
        assert str(path) in str(info.value)


# --------------------------------------------------------------------------- MNIST folder


@pytest.mark.parametrize("dotted", [False, True], ids=["standard-names", "dotted-names"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_load_mnist_reads_the_four_files(tmp_path, gz, dotted):
    data = load_mnist(write_mnist(tmp_path / "mnist", 30, 12, gz=gz, dotted=dotted))
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_test.shape == (12, 1, 28, 28)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.x_train.min() == -1.0 and data.x_train.max() == 1.0
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(data.y_test, load_digits().target[30:42])


def test_load_mnist_accepts_a_mix_of_gzipped_and_plain_files(tmp_path):
    folder = write_mnist(tmp_path / "mnist", 20, 10)
    plain = folder / MNIST_FILES["test_labels"]
    (folder / (plain.name + ".gz")).write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    assert load_mnist(folder).y_test.shape == (10,)


def test_mnist_names_are_standard_then_dotted_each_plain_then_gzipped():
    assert mnist_names("t10k-images-idx3-ubyte") == (
        "t10k-images-idx3-ubyte",
        "t10k-images-idx3-ubyte.gz",
        "t10k-images.idx3-ubyte",
        "t10k-images.idx3-ubyte.gz",
    )


def test_load_mnist_prefers_the_standard_name_when_both_styles_are_present(tmp_path):
    folder = write_mnist(tmp_path / "mnist", 20, 10)
    # A dotted copy holding other labels must be ignored: the standard file is read.
    write_idx(folder / mnist_name("test_labels", dotted=True), np.zeros(10, dtype=np.uint8))
    np.testing.assert_array_equal(load_mnist(folder).y_test, read_idx(folder / MNIST_FILES["test_labels"]))


def test_load_mnist_names_the_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_mnist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    folder = write_mnist(tmp_path / "mnist", 20, 10)
    (folder / MNIST_FILES["train_labels"]).unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz") as info:
        load_mnist(folder)
    assert str(folder) in str(info.value) and "has no train-labels-idx1-ubyte" in str(info.value)
    assert "train-labels.idx1-ubyte.gz" in str(info.value)  # every name looked for is named


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("given", ["root", "root/MNIST"], ids=["download-root", "its-MNIST-folder"])
def test_load_mnist_reads_torchvisions_download_layout(tmp_path, gz, given):
    """torchvision.datasets.MNIST(root=DIR, download=True) leaves the files in DIR/MNIST/raw:
    --mnist takes DIR itself, or DIR/MNIST."""
    root = tmp_path / "data"
    raw = write_mnist(root / "MNIST" / "raw", 30, 12, gz=gz)
    (root / "MNIST" / "processed").mkdir()  # what older torchvision releases also left there
    data = load_mnist(root if given == "root" else root / "MNIST")
    flat = load_mnist(raw)
    assert data.x_train.shape == (30, 1, 28, 28) and data.y_test.shape == (12,)
    np.testing.assert_array_equal(data.x_train, flat.x_train)
    np.testing.assert_array_equal(data.y_test, flat.y_test)
    assert str(raw) in data.name  # the run records where the files came from


def test_files_directly_in_the_folder_win_over_torchvisions_layout(tmp_path):
    folder = write_mnist(tmp_path / "data", 20, 10)
    write_mnist(folder / "MNIST" / "raw", 30, 12)
    assert load_mnist(folder).y_test.shape == (10,)


def test_a_folder_without_mnist_files_names_itself_every_place_looked_and_the_first_file(tmp_path):
    empty = tmp_path / "data"
    (empty / "MNIST" / "raw").mkdir(parents=True)  # torchvision's folders, but no download
    with pytest.raises(DataError) as info:
        load_mnist(empty)
    message = str(info.value)
    assert f"MNIST folder {empty} has no train-images-idx3-ubyte" in message
    assert str(empty / "MNIST" / "raw") in message and str(empty / "raw") in message
    assert "torchvision.datasets.MNIST(root=" in message


def test_torchvisions_layout_missing_a_file_names_the_raw_folder_and_the_file(tmp_path):
    raw = write_mnist(tmp_path / "data" / "MNIST" / "raw", 20, 10, gz=True)
    (raw / (MNIST_FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path / "data")
    assert f"MNIST folder {raw} has no t10k-labels-idx1-ubyte" in str(info.value)


@pytest.mark.parametrize(
    ("key", "array", "needle"),
    [
        ("train_images", np.zeros((20, 28), dtype=np.uint8), "expected 3-D uint8 images"),
        ("test_images", np.zeros((10, 28, 28), dtype=np.float32), "expected 3-D uint8 images"),
        ("train_labels", np.zeros((20, 1), dtype=np.uint8), "expected 1-D uint8 labels"),
        ("test_labels", np.zeros(9, dtype=np.uint8), "9 labels"),
        ("test_labels", np.full(10, 10, dtype=np.uint8), "label 10 is not a digit"),
        ("test_images", np.zeros((10, 20, 20), dtype=np.uint8), "differ in size"),
    ],
)
def test_load_mnist_rejects_inconsistent_files(tmp_path, key, array, needle):
    folder = write_mnist(tmp_path / "mnist", 20, 10)
    write_idx(folder / MNIST_FILES[key], array)
    with pytest.raises(DataError, match=needle):
        load_mnist(folder)


# --------------------------------------------------------------------------- metrics and table


def test_angle_stats_on_known_rays():
    deg = np.radians
    # class 0 at +-5 deg around 0 deg, class 1 at +-3 deg around 90 deg, class 2 at 200 deg;
    # different norms must not matter.
    angles = np.array([-5.0, 5.0, 87.0, 93.0, 200.0])
    norms = np.array([1.0, 9.0, 0.5, 2.0, 3.0])
    feats = norms[:, None] * np.stack([np.cos(deg(angles)), np.sin(deg(angles))], axis=1)
    intra, inter = angle_stats(feats, np.array([0, 0, 1, 1, 2]))
    assert intra == pytest.approx((5 + 5 + 3 + 3 + 0) / 5, abs=1e-9)
    assert inter == pytest.approx(90.0, abs=1e-9)  # 0 vs 90; 90 vs 200 is 110, 0 vs 200 is 160


def test_class_palette_is_ten_distinct_colours():
    colours = class_palette(10)
    assert len(set(colours)) == 10
    assert all(0.0 <= c <= 1.0 for rgb in colours for c in rgb)


def test_markdown_table():
    row = {
        "margin": 4,
        "test_accuracy": 0.98765,
        "intra_class_angle_deg": 2.345,
        "inter_class_min_angle_deg": 31.0,
        "train_seconds": 12.34,
    }
    lines = markdown_table([row]).splitlines()
    assert len(lines) == 3 and lines[0].startswith("| margin |")
    assert lines[2] == "| 4 | 98.77% | 2.35 | 31.00 | 12.3 |"
    kind = {**row, "kind": "arcface", "margin": {"kind": "arcface", "m": 0.3, "s": 4.0}}
    lines = markdown_table([kind]).splitlines()
    assert lines[0].startswith("| kind |") and lines[1].startswith("|:-----|")
    assert lines[2] == "| ArcFace(m=0.3, s=4.0) | 98.77% | 2.35 | 31.00 | 12.3 |"


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--margins", "1,x"], "not a comma-separated list of integers"),
        (["--margins", ""], "not a comma-separated list of integers"),
        (["--margins", "0,2"], "margins [0] out of range"),
        (["--margins", "2,65"], "margins [65] out of range"),
        (["--margins", "2,2"], "repeats a margin"),
        (["--epochs", "0"], "--epochs: 0 must be >= 1"),
        (["--epochs", "two"], "--epochs: 'two' is not an integer"),
        (["--seed", "-1"], "--seed: -1 must be in [0, 2**63)"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--kinds", "normface"], "--kinds: unknown kind 'normface' in 'normface': the kinds are "),
        (["--kinds", "arcface,"], "unknown kind '' in 'arcface,'"),
        (["--kinds", ""], "unknown kind ''"),
        (["--kinds", "cosface,CosFace"], "'cosface,CosFace' repeats a kind"),
        (["--kinds", "arcface", "--margins", "2"], "--kinds and --margins exclude each other"),
    ],
)
def test_bad_flags_exit_with_a_clear_message(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_cuda_without_a_device_is_a_clear_error(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        demo.main(["--device", "cuda", "--out", str(tmp_path / "o")])
    assert "PyTorch sees no CUDA device" in capsys.readouterr().err


def test_cuda_without_cupy_is_a_clear_error_before_any_data_is_loaded(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(SystemExit) as info:
        demo.main(["--device", "cuda", "--mnist", str(tmp_path / "no-mnist"), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "through the CuPy backend" in err and "cupy" in err
    assert "--mnist folder" not in err and not (tmp_path / "o").exists()


def test_out_must_not_be_a_file(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(f)])
    assert f"--out {f} exists and is not a folder" in capsys.readouterr().err


def test_missing_mnist_folder_or_file_is_a_clear_error(capsys, tmp_path):
    missing = tmp_path / "no-mnist"
    with pytest.raises(SystemExit) as info:
        demo.main(["--mnist", str(missing), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert f"--mnist folder {missing} does not exist" in capsys.readouterr().err

    folder = write_mnist(tmp_path / "mnist", 20, 10)
    (folder / MNIST_FILES["test_images"]).unlink()
    with pytest.raises(SystemExit):
        demo.main(["--mnist", str(folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert str(folder) in err and "t10k-images-idx3-ubyte" in err
    assert not (tmp_path / "o").exists()  # nothing written before the data is known good


def test_malformed_mnist_file_is_a_clear_error(capsys, tmp_path):
    folder = write_mnist(tmp_path / "mnist", 20, 10)
    bad = folder / MNIST_FILES["train_images"]
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(SystemExit):
        demo.main(["--mnist", str(folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert f"malformed IDX file {bad}" in err and "found" in err


def test_module_entry_point_prints_help():
    done = subprocess.run(
        [sys.executable, "-m", "lsoftmax_core.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    for flag in ("--out", "--margins", "--kinds", "--epochs", "--mnist", "--device", "--seed"):
        assert flag in done.stdout


# --------------------------------------------------------------------------- quick runs


def _load(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _without_time(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in runs]


def test_quick_run_writes_figures_json_and_table(tmp_path, capsys):
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--margins", "3,1", "--epochs", "1"]) == 0
    for name in ("features-margin-1.png", "features-margin-3.png", "features-all-margins.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    results = _load(out)
    runs = results["runs"]
    assert [r["margin"] for r in runs] == [1, 3]  # in increasing order, whatever the order asked
    assert results["config"]["margins"] == [1, 3]
    for r in runs:
        assert RUN_KEYS <= set(r)
        assert isinstance(r["margin"], int)
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert 0.0 <= r["intra_class_angle_deg"] <= 180.0
        assert 0.0 <= r["inter_class_min_angle_deg"] <= 36.0 + 1e-9  # ten rays: at most 360/10 apart
        assert r["train_seconds"] > 0.0
    assert results["config"]["test_size"] == 540 and results["config"]["epochs"] == 1
    import torch

    versions = results["config"]["versions"]  # the numbers hold for these versions only
    assert versions["torch"] == torch.__version__ and versions["numpy"] == np.__version__
    assert set(versions) == {"python", "lsoftmax-core", "torch", "numpy", "scikit-learn"}
    assert runs[1]["schedule"] == {
        "kind": "exponential",
        "beta0": 100.0,
        "scale": 0.99,
        "beta_min": demo.BETA_MIN,
    }
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 4 and table[2].startswith("| 1 | ") and table[3].startswith("| 3 | ")

    # Same seed, same numbers; and a margin's run does not depend on the others asked for.
    again = tmp_path / "again"
    assert demo.main(["--out", str(again), "--margins", "3", "--epochs", "1"]) == 0
    assert _without_time(_load(again)["runs"]) == _without_time(runs[1:])


def test_a_run_stopped_early_keeps_the_margins_it_finished(tmp_path, monkeypatch):
    real = demo.run_margin

    def stop_at_margin_3(data, margin, **kw):
        if margin == 3:
            raise KeyboardInterrupt
        return real(data, margin, **kw)

    monkeypatch.setattr(demo, "run_margin", stop_at_margin_3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        demo.main(["--out", str(out), "--margins", "2,3", "--epochs", "1"])
    results = _load(out)
    assert [r["margin"] for r in results["runs"]] == [2] and results["config"]["margins"] == [2, 3]
    assert (out / "features-all-margins.png").read_bytes()[:8] == PNG_MAGIC


def test_kinds_are_the_four_with_their_documented_parameters():
    import lsoftmax_core as lsm

    assert list(demo.KINDS) == ["lsoftmax", "sphereface", "cosface", "arcface"]
    assert [k.margin for k in demo.KINDS.values()] == [
        lsm.LSoftmax(4),
        lsm.SphereFace(4),
        lsm.CosFace(m=0.2, s=4.0),
        lsm.ArcFace(m=0.3, s=4.0),
    ]
    # the multiplicative kinds anneal as the margins do; the cosine kinds keep beta 0
    assert [k.annealed for k in demo.KINDS.values()] == [True, True, False, False]
    assert demo.KINDS["sphereface"].schedule(demo.DIGITS) == lsm.ExponentialSchedule(
        100.0, 0.99, demo.BETA_MIN
    )
    assert demo.KINDS["arcface"].schedule(demo.MNIST) == lsm.ConstantSchedule(0.0)


def test_quick_kinds_run_writes_one_picture_per_kind_side_by_side_json_and_table(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        demo.main(["--out", str(out), "--kinds", "arcface,lsoftmax,cosface,sphereface", "--epochs", "1"]) == 0
    )
    names = ["lsoftmax", "sphereface", "cosface", "arcface"]  # KINDS's order, whatever the order asked
    for name in [*(f"features-kind-{n}.png" for n in names), "features-all-kinds.png"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert not list(out.glob("features-margin-*")) and not (out / "features-all-margins.png").exists()
    results = _load(out)
    runs = results["runs"]
    assert [r["kind"] for r in runs] == names
    assert results["config"]["kinds"] == names and "margins" not in results["config"]
    for r in runs:
        assert RUN_KEYS | {"kind", "schedule"} <= set(r)
        assert r["margin"] == demo.KINDS[r["kind"]].margin.to_dict()  # the parameters, recorded
        assert r["schedule"] == demo.KINDS[r["kind"]].schedule(demo.DIGITS).to_dict()
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["train_seconds"] > 0.0
        assert 0.0 <= r["inter_class_min_angle_deg"] <= 36.0 + 1e-9
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 6 and table[0].startswith("| kind |")
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| LSoftmax(m=4)",
        "| SphereFace(m=4)",
        "| CosFace(m=0.2, s=4.0)",
        "| ArcFace(m=0.3, s=4.0)",
    ]

    # The lsoftmax kind is the margins' run of margin 4, and a kind's run does not depend
    # on the other kinds asked for.
    margin4 = tmp_path / "margin4"
    assert demo.main(["--out", str(margin4), "--margins", "4", "--epochs", "1"]) == 0
    (plain,) = _without_time(_load(margin4)["runs"])
    lsoftmax = _without_time(runs[:1])[0]
    assert lsoftmax.pop("kind") == "lsoftmax" and lsoftmax.pop("margin") == {"kind": "lsoftmax", "m": 4}
    assert plain.pop("margin") == 4 and lsoftmax == plain
    alone = tmp_path / "alone"
    assert demo.main(["--out", str(alone), "--kinds", "ArcFace", "--epochs", "1"]) == 0
    assert _without_time(_load(alone)["runs"]) == _without_time(runs[3:])


@pytest.mark.parametrize(
    ("gz", "dotted", "torchvision"),
    [(True, False, True), (False, True, False)],
    ids=["torchvision-layout-gz", "flat-dotted-plain"],
)
def test_quick_run_on_mnist_files(tmp_path, capsys, gz, dotted, torchvision):
    folder = tmp_path / "mnist"
    write_mnist(folder / "MNIST" / "raw" if torchvision else folder, 96, 40, gz=gz, dotted=dotted)
    out = tmp_path / "out"
    assert (
        demo.main(
            ["--mnist", str(folder), "--out", str(out), "--margins", "2", "--epochs", "1", "--seed", "3"]
        )
        == 0
    )
    results = _load(out)
    assert results["config"]["train_size"] == 96 and results["config"]["test_size"] == 40
    assert results["config"]["seed"] == 3 and results["config"]["batch_size"] == demo.MNIST.batch_size
    assert [r["margin"] for r in results["runs"]] == [2]
    assert (out / "features-margin-2.png").read_bytes()[:8] == PNG_MAGIC
    # MNIST trains with the seed's recipe, recorded in results.json
    assert results["runs"][0]["schedule"]["beta_min"] == demo.MNIST.beta_min == 0.0
    config = results["config"]
    assert config["batch_norm"] is False and config["xavier_init"] is True and config["lr"] == 0.01


def test_mnist_preset_is_the_seeds_recipe_and_the_digits_keep_theirs():
    m = demo.MNIST
    assert (m.epochs, m.lr_drop_epoch, m.batch_size, m.lr, m.momentum, m.weight_decay) == (
        20,
        10,
        128,
        0.01,
        0.9,
        5e-4,
    )
    assert (m.batch_norm, m.beta_min, m.xavier_init) == (False, 0.0, True)
    d = demo.DIGITS
    assert (d.epochs, d.lr_drop_epoch, d.batch_size, d.lr) == (60, 45, 64, 0.02)
    assert (d.batch_norm, d.beta_min, d.xavier_init) == (True, demo.BETA_MIN, False)


@pytest.mark.parametrize("image_size", [8, 28])
def test_feature_net_has_batch_norm_only_when_asked(image_size):
    import torch

    for batch_norm, count in ((True, 3), (False, 0)):
        net = demo._feature_net(image_size, batch_norm=batch_norm)
        norms = [m for m in net.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
        assert len(norms) == count
        assert net(torch.zeros(2, 1, image_size, image_size)).shape == (2, 2)


def test_xavier_init_is_mxnets_glorot_uniform_with_zero_biases():
    import torch

    torch.manual_seed(0)
    net = demo._feature_net(28, batch_norm=False)
    demo._xavier_(net.modules())
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight.detach()
            receptive = w[0, 0].numel() if w.dim() > 2 else 1
            bound = math.sqrt(6.0 / ((w.shape[0] + w.shape[1]) * receptive))
            assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
            assert not m.bias.any()
