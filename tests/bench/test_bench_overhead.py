"""`python -m bench --overhead` (the per-call overhead table) and `python -m bench.profile_overhead`
run end to end at tiny settings and write well-formed files.  No timing is asserted."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from support.bench_loader import load_bench  # noqa: E402

load_bench()

from bench import overhead
from bench.__main__ import main
from bench.contenders import NP_LINEAR, TORCH_ADAPTER, TORCH_LINEAR, numpy_ce_step


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_numpy_ce_step_floor_computes_the_softmax_cross_entropy_and_its_gradients() -> None:
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    x, w, y = rng.standard_normal((9, 4)), rng.standard_normal((5, 4)), rng.integers(0, 5, 9)
    loss, gx, gw = numpy_ce_step(x, w, y)()
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    want = F.cross_entropy(F.linear(tx, tw), torch.tensor(y))
    want.backward()
    np.testing.assert_allclose(loss, want.item(), rtol=1e-12)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_cpu_overhead_run_writes_both_thread_settings_and_renders_the_same(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["--cpu", "--overhead", "--quick", "--sizes", "mnist", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cpu_overhead.csv", "cpu_overhead.md", "cpu_overhead_env.json"]
    rows = _csv(out / "cpu_overhead.csv")
    numba = [overhead.NP_NUMBA] if overhead._numba_available() else []
    names = [overhead.NP_LINEAR, overhead.NP_CE_STEP, overhead.NP_FWD_BWD, overhead.NP_STATS, *numba,
             TORCH_LINEAR, TORCH_ADAPTER, *([overhead.TORCH_NUMBA] if numba else [])]
    assert [(r["threads"], r["contender"]) for r in rows] == [(t, n) for t in ("1", "default") for n in names]
    for r in rows:
        assert r["note"] == "" and float(r["median_us"]) > 0, r
    ours = [r for r in rows if r["contender"] in (overhead.NP_FWD_BWD, overhead.NP_STATS, *numba)]
    assert all(math.isfinite(float(r["ratio_ce_step"])) and math.isfinite(float(r["ratio_gemms"])) for r in ours)
    adapter = [r for r in rows if r["contender"] in (TORCH_ADAPTER, overhead.TORCH_NUMBA)]
    import lsoftmax_core

    assert lsoftmax_core.cpu_kernels() == "numpy"  # the run restores the choice it found
    assert all(math.isfinite(float(r["ratio_torch_floor"])) for r in adapter)
    text = (out / "cpu_overhead.md").read_text()
    assert "#### CPU, threads: 1" in text and "#### CPU, threads: default" in text and "#### Goals (issue 13)" in text
    env = json.loads((out / "cpu_overhead_env.json").read_text())
    assert env["command"] == "python -m bench --cpu --overhead --quick --sizes mnist"
    again = tmp_path / "rendered"
    assert main(["--render", "cpu", "--overhead", "--from", str(out), "--out", str(again), "--no-doc"]) == 0
    assert (again / "cpu_overhead.md").read_text() == text


def test_overhead_goals_say_met_missed_and_not_measured() -> None:
    def row(contender: str, size: str, threads: str, **ratios: float) -> dict[str, object]:
        base = dict.fromkeys(overhead.FLOORS, math.nan)
        return {"size": size, "dtype": "float32", "threads": threads, "contender": contender, "median_us": 50.0,
                **base, **ratios}

    good = [row(overhead.NP_FWD_BWD, "mnist", "1", ratio_ce_step=1.9),
            row(overhead.NP_STATS, "mnist", "1", ratio_ce_step=1.5),
            row(TORCH_ADAPTER, "mnist", "1", ratio_torch_floor=1.8),
            row(overhead.NP_NUMBA, "mnist", "1", ratio_ce_step=0.8),
            row(overhead.TORCH_NUMBA, "mnist", "1", ratio_torch_floor=1.9),
            *(row(overhead.NP_FWD_BWD, "face", t, ratio_gemms=1.02) for t in ("1", "default")),
            *(row(TORCH_ADAPTER, "face", t, ratio_torch_floor=1.04) for t in ("1", "default"))]
    assert [g["status"] for g in overhead.goals("cpu", good)] == ["met"] * 9
    bad = [dict(r, ratio_ce_step=3.0, ratio_gemms=1.1, ratio_torch_floor=2.5) for r in good]
    assert [g["status"] for g in overhead.goals("cpu", bad)] == ["MISSED"] * 9
    assert [g["status"] for g in overhead.goals("cpu", good[:3])][3:] == ["not measured"] * 6
    host = [{"size": "mnist", "dtype": "float32", "threads": "default", "contender": overhead.CP_HOST,
             "median_us": v} for v in (55.0, 75.0)]
    assert [g["status"] for g in overhead.goals("gpu", host[:1])] == ["met"]
    assert [g["status"] for g in overhead.goals("gpu", host[1:])] == ["MISSED"]
    assert [g["status"] for g in overhead.goals("gpu", [])] == ["not measured"]
    assert NP_LINEAR in overhead.FLOORS.values()


def test_goals_show_the_quartiles_of_the_per_repetition_ratios() -> None:
    from bench.harness import Case, Measured, paired_ratio, paired_ratio_quartiles

    def measured(samples: list[float]) -> Measured:
        m = Measured(Case("x", "numpy", "layer", "x", lambda: None, lambda fn, k: 0.0))
        m.samples = samples
        return m

    floor = measured([1.0, 1.0, 2.0, 1.0, 1.0])
    ours = measured([2.0, 2.2, 4.2, 1.8, 2.6])  # ratios 2.0, 2.2, 2.1, 1.8, 2.6
    assert paired_ratio(ours, floor) == 2.1
    assert paired_ratio_quartiles(ours, floor) == pytest.approx((2.0, 2.2))
    assert all(math.isnan(q) for q in paired_ratio_quartiles(measured([2.0]), measured([1.0])))
    row = {"size": "mnist", "dtype": "float32", "threads": "1", "contender": overhead.NP_FWD_BWD,
           "median_us": 50.0, **dict.fromkeys(overhead.FLOORS, math.nan), "ratio_ce_step": 2.1,
           "ratio_ce_step_q1": 2.0, "ratio_ce_step_q3": 2.2}
    first = overhead.goals("cpu", [row])[0]
    assert first["measured"] == "2.100x (2.000-2.200)" and first["status"] == "MISSED"
    older = {k: v for k, v in row.items() if not k.endswith(("_q1", "_q3"))}  # a file from before the quartiles
    assert overhead.goals("cpu", [older])[0]["measured"] == "2.100x"


def test_overhead_refuses_loss_and_layer_only(tmp_path: Path) -> None:
    for extra in ("--loss", "--layer-only"):
        with pytest.raises(SystemExit):
            main(["--cpu", "--overhead", extra, "--quick", "--out", str(tmp_path)])


def test_gpu_overhead_run_refuses_without_a_device(tmp_path: Path) -> None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is visible: the refusal cannot be tested here")
    except Exception:  # noqa: BLE001, S110 - no CuPy or no driver: the run must refuse
        pass
    with pytest.raises(SystemExit, match="nothing to measure"):
        main(["--gpu", "--overhead", "--quick", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@pytest.mark.gpu
def test_gpu_overhead_run_measures_the_cupy_host_time(tmp_path: Path) -> None:
    assert main(["--gpu", "--overhead", "--quick", "--out", str(tmp_path)]) == 0
    rows = _csv(tmp_path / "gpu_overhead.csv")
    assert [r["contender"] for r in rows] == [
        overhead.CP_GEMMS_HOST, overhead.CP_HOST, overhead.CP_DEVICE, overhead.CP_GEMM_PLAN
    ]
    assert all(float(r["median_us"]) > 0 and r["note"] == "" for r in rows)
    assert "CuPy backend host time per fwd+bwd" in (tmp_path / "gpu_overhead.md").read_text()


def test_profile_overhead_runs_every_cpu_path(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import profile_overhead

    assert profile_overhead.main(["--repeat", "1", "--calls", "3", "--top", "3", "--paths", "numpy,torch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mnist 256x2x10 float32") and "=== numpy:" in out and "=== torch:" in out
    assert "function calls per forward+backward" in out


def test_profile_overhead_between_times_every_path_after_each_step(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import profile_overhead

    assert profile_overhead.main(["--between", "--repeat", "1", "--paths", "numpy,torch"]) == 0
    out = capsys.readouterr().out
    assert "function calls" not in out  # the table replaces the profiles
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    for step in ("back to back", "1 ms busy wait", "1 ms sleep", "torch CE step"):
        times = [float(v) for v in re.findall(r"([0-9.]+) us", rows[step])]  # numpy ours, floor, torch ours, floor
        ratios = [float(v) for v in re.findall(r"([0-9.]+)x", rows[step])]
        assert len(times) == 4 and all(t > 0 for t in times) and len(ratios) == 2, rows[step]
        assert all(r > 0 and math.isfinite(r) for r in ratios), rows[step]
