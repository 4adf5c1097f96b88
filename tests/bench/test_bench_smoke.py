"""The benchmark harness runs end to end at a tiny size and writes well-formed files.

No timing is asserted: speed is for `python -m bench`, not for tests.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not installed

from bench import report
from bench.contenders import (
    NP_LINEAR,
    NP_LSM,
    TORCH_ADAPTER,
    TORCH_LINEAR,
    TORCH_NAIVE,
    TORCH_PML,
    Size,
    naive_lsoftmax,
)
from bench.harness import peak_rss_delta
from bench.runner import Settings, run_cpu

FOREIGN = "## GPU kernels\n\nsomeone else's text, kept verbatim\n"


# pytorch-metric-learning 2.9 calls scipy with a NumPy scalar, which NumPy 2 deprecates.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cpu_harness_writes_csv_markdown_and_plot(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n" + FOREIGN)
    size = Size("tiny", 8, 3, 5)
    run_cpu(Settings(repeat=1, warmup=1, min_time=0.0, lenet_batches=(4,)), out_dir=tmp_path / "results",
            doc=doc, plot_dir=tmp_path / "plots", sizes=(size,), memory=False, threads=1)

    with open(tmp_path / "results" / "cpu.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == report.COLUMNS
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    names = [r["contender"] for r in body]
    has_pml = any(r["contender"] == TORCH_PML and not r["note"] for r in body)
    expected = {NP_LINEAR, NP_LSM, TORCH_LINEAR, TORCH_ADAPTER, TORCH_NAIVE, TORCH_PML}
    assert sorted(names) == sorted(expected)
    for r in body:
        if r["contender"] == TORCH_PML and not has_pml:
            continue  # pytorch-metric-learning missing: a skipped row with its note
        assert r["note"] == "", r  # every contender ran
        assert r["repeats"] == "1"
        assert float(r["median_ms"]) > 0.0
        ratio = float(r["ratio_to_floor"])
        assert ratio == 1.0 if r["contender"] == r["floor"] else math.isfinite(ratio) and ratio > 0.0

    with open(tmp_path / "results" / "cpu_lenet.csv", newline="") as f:
        lenet = list(csv.reader(f))
    assert tuple(lenet[0]) == report.LENET_COLUMNS
    assert len(lenet) == 3 and all(float(r[3]) > 0.0 for r in lenet[1:])  # samples/s of both heads

    text = doc.read_text()
    assert FOREIGN in text  # another author's section survives
    for name in ("howto", "cpu"):
        assert text.count(f"<!-- bench:{name}:begin -->") == 1 and text.count(f"<!-- bench:{name}:end -->") == 1
    section = text.split("<!-- bench:cpu:begin -->")[1].split("<!-- bench:cpu:end -->")[0]
    time_table = [ln for ln in section.split("#### CPU, float32: time")[1].split("####")[0].splitlines()
                  if ln.startswith("|")]
    assert len(time_table) == 2 + len(expected)  # header, rule, one row per contender
    assert {ln.count("|") for ln in time_table} == {5}  # contender, work, ratio to, one size
    assert "#### Goals" in section and "LeNet" in section
    assert (tmp_path / "results" / "cpu.md").read_text().strip() in text

    # Publishing again replaces the section instead of adding a second one.
    report.update_doc(doc, "cpu", "## CPU results", "new text")
    again = doc.read_text()
    assert again.count("<!-- bench:cpu:begin -->") == 1 and FOREIGN in again and "new text" in again
    assert "#### Goals" not in again.split("<!-- bench:cpu:begin -->")[1]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plots" / "cpu_ratio.png").stat().st_size > 1000


def test_goals_say_met_missed_and_not_measured() -> None:
    def row(contender: str, ratio: float) -> dict[str, object]:
        return {"size": "face", "dtype": "float32", "contender": contender, "ratio_to_floor": ratio}

    met = report.goals("cpu", [row(NP_LSM, 1.01), row(TORCH_ADAPTER, 1.2), row(TORCH_PML, 4.8)])
    assert [g["status"] for g in met] == ["met", "met"]
    missed = report.goals("cpu", [row(NP_LSM, 1.2), row(TORCH_ADAPTER, 2.0), row(TORCH_PML, 4.0)])
    assert [g["status"] for g in missed] == ["MISSED", "MISSED"]
    assert [g["status"] for g in report.goals("gpu", [])] == ["not measured"] * 3


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_delta_sees_a_transient_allocation() -> None:
    # 64 MiB, above glibc's largest dynamic mmap threshold: mapped and unmapped by itself.
    peak = peak_rss_delta(lambda: np.ones(8 * 2**20).sum())
    assert 60.0 < peak < 200.0


def test_naive_autograd_agrees_with_the_core() -> None:
    import torch

    import lsoftmax_core as lsm

    rng = np.random.default_rng(1)
    x, w, y = rng.standard_normal((16, 5)), rng.standard_normal((7, 5)), rng.integers(0, 7, 16)
    ours = lsm.forward(x, w, y, margin=4, beta=0.5)
    naive = naive_lsoftmax(torch.tensor(x), torch.tensor(w), torch.tensor(y), 4, 0.5).numpy()
    np.testing.assert_allclose(naive, ours, rtol=1e-9, atol=1e-9)
