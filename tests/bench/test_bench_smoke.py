"""The one benchmark harness (`python -m bench`) runs end to end at tiny sizes and writes well-formed files.

CPU runs go through the same code as GPU runs (size table, harness, files, doc section);
the GPU run itself is marked ``gpu`` and skipped without a device.  No timing is
asserted: speed is for `python -m bench`, not for tests.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from support.bench_loader import load_bench  # noqa: E402

load_bench()

from bench import report
from bench.__main__ import main
from bench.contenders import (
    CP_LINEAR,
    CP_LSM,
    DTYPES,
    FUSED,
    LOSS_DTYPES,
    NP_LINEAR,
    NP_LSM,
    NP_UNFUSED,
    SIZES,
    TORCH_ADAPTER,
    TORCH_FUSED,
    TORCH_LINEAR,
    TORCH_NAIVE,
    TORCH_PML,
    Fused,
    Size,
    loss_cases,
    naive_lsoftmax,
    sizes_for,
)
from bench.harness import peak_rss_delta
from bench.runner import Settings, run_cpu, run_gpu, run_loss


def _gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver
        return False


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

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
        return {"size": "face", "n": 256, "d": 512, "c": 10_000, "dtype": "float32", "contender": contender,
                "ratio_to_floor": ratio}

    met = report.goals("cpu", [row(NP_LSM, 1.01), row(TORCH_ADAPTER, 1.2), row(TORCH_PML, 4.8)])
    assert [g["status"] for g in met] == ["met", "met"]
    missed = report.goals("cpu", [row(NP_LSM, 1.2), row(TORCH_ADAPTER, 2.0), row(TORCH_PML, 4.0)])
    assert [g["status"] for g in missed] == ["MISSED", "MISSED"]
    assert [g["status"] for g in report.goals("gpu", [])] == ["not measured"] * 3
    # Goals are found by shape: the same ratios at another N x D x C measure nothing.
    other = [dict(r, c=100) for r in (row(NP_LSM, 1.01), row(TORCH_ADAPTER, 1.2), row(TORCH_PML, 4.8))]
    assert [g["status"] for g in report.goals("cpu", other)] == ["not measured"] * 2


def test_one_size_table_for_both_devices() -> None:
    cpu, gpu = sizes_for("cpu"), sizes_for("gpu")
    loss = set(sizes_for("cpu", suite="loss")) | set(sizes_for("gpu", suite="loss"))
    assert set(cpu) | set(gpu) | loss == set(SIZES)  # every size of the table runs somewhere, nothing else does
    assert not loss & (set(cpu) | set(gpu))  # the loss suite runs only with --loss
    for device, sizes in (("cpu", cpu), ("gpu", gpu)):
        assert len({s.name for s in sizes}) == len(sizes), device  # a name means one shape per device
        assert all(device in s.devices for s in sizes)
        # Every goal's shape is a size measured on its device.
        shapes = {(s.n, s.d, s.c) for s in sizes}
        assert {(n, d, c) for _, n, d, c, *_ in report.GOALS[device]} <= shapes, device
        assert "float32" in DTYPES[device]
    # The per-call overhead size (the seed's LeNet head) is on both devices; 100k classes on GPU only.
    assert Size("mnist", 256, 2, 10) in cpu and Size("mnist", 256, 2, 10) in gpu
    assert {s.dims for s in gpu if s.name == "face"} == {"512x512x100k"}
    assert {s.dims for s in cpu if s.name == "face"} == {"256x512x10k"}
    assert sizes_for("gpu", ["mnist"]) == (Size("mnist", 256, 2, 10),)
    with pytest.raises(ValueError, match="no size nope"):
        sizes_for("cpu", ["nope"])


def test_cli_quick_layer_only_cpu_run_writes_what_render_reads(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["--cpu", "--quick", "--layer-only", "--sizes", "mnist", "--no-plot", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cpu.csv", "cpu.md", "cpu_env.json", "cpu_lenet.csv"]
    rows = _csv(out / "cpu.csv")
    assert [(r["size"], r["contender"]) for r in rows] == [("mnist", NP_LINEAR), ("mnist", NP_LSM)]
    assert all(r["note"] == "" and float(r["median_ms"]) > 0 for r in rows), rows
    # The memory probe ran in its own process and found bench and lsoftmax_core there.
    assert all(math.isfinite(float(r["peak_mib"])) for r in rows), rows
    assert _csv(out / "cpu_lenet.csv") == []  # --layer-only: no LeNet
    env = json.loads((out / "cpu_env.json").read_text())
    assert env["command"] == "python -m bench --cpu --quick --layer-only --sizes mnist --no-plot"  # no local path

    # --render rebuilds the same section from the files alone (how a GPU run comes back).
    again = tmp_path / "rendered"
    assert main(["--render", "cpu", "--from", str(out), "--out", str(again), "--no-doc", "--no-plot"]) == 0
    assert (again / "cpu.md").read_text() == (out / "cpu.md").read_text()


def test_render_gpu_files_into_the_gpu_section_only(tmp_path: Path) -> None:
    """A GPU run's files (made up here, never published) become the GPU section; the CPU one stays."""
    source = tmp_path / "from-gpu"
    source.mkdir()
    rows = []
    for size in sizes_for("gpu"):
        for dtype in DTYPES["gpu"]:
            for name, ratio in ((CP_LINEAR, 1.0), (CP_LSM, 1.2)):
                rows.append({"device": "gpu", "size": size.name, "n": size.n, "d": size.d, "c": size.c,
                             "dtype": dtype, "contender": name, "library": "cupy", "kind": "layer",
                             "floor": CP_LINEAR, "median_ms": 1.0 * ratio, "ratio_to_floor": ratio,
                             "peak_mib": 1.0, "repeats": 3, "inner": 1, "note": ""})
    report.write_csv(source / "gpu.csv", rows, report.COLUMNS)
    report.write_csv(source / "gpu_lenet.csv", [], report.LENET_COLUMNS)
    (source / "gpu_env.json").write_text(json.dumps({"command": "python -m bench --gpu --layer-only"}))
    out = tmp_path / "out"
    assert main(["--render", "gpu", "--from", str(source), "--out", str(out), "--no-doc", "--no-plot"]) == 0
    text = (out / "gpu.md").read_text()
    assert "#### GPU, float32: time" in text and "#### GPU, float16: time" in text
    assert "| 1.20x (1.2 ms) |" in text and "512x512x100k" in text
    status = {g["goal"]: g["status"] for g in report.goals("gpu", report.read_csv(out / "gpu.csv"))}
    assert status == {
        "CuPy backend fwd+bwd vs 3 cuBLAS GEMMs, 512x512x100k float32": "MISSED",
        "CuPy backend fwd+bwd vs 3 cuBLAS GEMMs, 256x2x10 float32": "met",
        "torch adapter + CE vs pytorch-metric-learning, 512x512x100k float32": "not measured",
    }
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n<!-- bench:cpu:begin -->\nCPU text\n<!-- bench:cpu:end -->\n")
    env = json.loads((out / "gpu_env.json").read_text())
    report.publish(doc, None, "gpu", report.read_csv(out / "gpu.csv"), [], env, None)
    published = doc.read_text()
    assert "CPU text" in published and published.count("<!-- bench:gpu:begin -->") == 1
    assert text.strip() in published


def test_gpu_run_steps_with_numpy_standing_in_for_cupy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU run's own steps (sizes x dtypes, files after each, the section) on any machine.

    NumPy's pair stands in for CuPy's under CuPy's names: what is checked is the runner,
    not a measurement (the files go to a temporary folder and nowhere else).
    """
    from bench import runner
    from bench.contenders import numpy_cases

    def stand_in(size: Size, dtype: str, seed: int = 0) -> list:
        cases = numpy_cases(size, dtype, seed)
        for case, name in zip(cases, (CP_LINEAR, CP_LSM)):
            case.name, case.floor, case.library = name, CP_LINEAR, "cupy"
        return cases

    written: list[int] = []
    real_write = runner._write

    def write(*args: object, **kwargs: object) -> None:
        written.append(len(args[2]))  # type: ignore[arg-type]
        real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "cupy_cases", stand_in)
    monkeypatch.setattr(runner, "_cupy_device", lambda: None)
    monkeypatch.setattr(runner, "cupy_peak", lambda fn: 0.0)
    monkeypatch.setattr(runner, "_free_gpu_memory", lambda torch: None)
    monkeypatch.setattr(runner, "_write", write)
    sizes = (Size("tiny", 8, 3, 5), Size("small", 16, 4, 7))
    run_gpu(Settings(repeat=1, warmup=1, min_time=0.0, lenet_batches=()), out_dir=tmp_path, doc=None,
            plot_dir=None, sizes=sizes, layer_only=True, command="python -m bench --gpu --layer-only")
    rows = _csv(tmp_path / "gpu.csv")
    assert [(r["size"], r["dtype"], r["contender"]) for r in rows] == [
        (s.name, dtype, name) for s in sizes for dtype in DTYPES["gpu"] for name in (CP_LINEAR, CP_LSM)]
    assert written == [2, 4, 6, 8, 8]  # after every (size, dtype): a run cut short keeps its rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.csv", "gpu.md", "gpu_env.json", "gpu_lenet.csv"]
    md = (tmp_path / "gpu.md").read_text()
    assert "#### GPU, float32: time" in md and "#### GPU, float16: time" in md and "LeNet" not in md
    assert json.loads((tmp_path / "gpu_env.json").read_text())["command"] == "python -m bench --gpu --layer-only"


@pytest.mark.skipif(_gpu(), reason="a GPU is present: the layer run is tested by the gpu test below")
def test_gpu_layer_run_refuses_without_a_device(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="nothing to measure"):
        main(["--gpu", "--layer-only", "--quick", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # no half-written files


@pytest.mark.gpu
def test_gpu_layer_run_measures_the_cupy_pair(tmp_path: Path) -> None:
    size = Size("tiny", 8, 3, 5)
    run_gpu(Settings(repeat=2, warmup=1, min_time=0.0, lenet_batches=()), out_dir=tmp_path, doc=None,
            plot_dir=None, sizes=(size,), layer_only=True)
    rows = _csv(tmp_path / "gpu.csv")
    assert [(r["dtype"], r["contender"]) for r in rows] == [
        (dtype, name) for dtype in DTYPES["gpu"] for name in (CP_LINEAR, CP_LSM)]
    for r in rows:
        assert r["note"] == "" and float(r["median_ms"]) > 0 and r["repeats"] == "2", r
        assert math.isfinite(float(r["ratio_to_floor"])) and math.isfinite(float(r["peak_mib"])), r
    assert _csv(tmp_path / "gpu_lenet.csv") == []
    assert "cupy" in json.loads((tmp_path / "gpu_env.json").read_text())


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


def test_profile_cpu_runs_at_a_size_of_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import profile_cpu

    assert profile_cpu.main(["--size", "mnist", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("N=256 D=2 C=10 float32") and "lsoftmax-core numpy fwd+bwd" in out


# --------------------------------------------------------------------------- the fused cross-entropy (--loss)


def test_loss_suite_sizes_are_the_issues() -> None:
    cpu = {s.name: s.dims for s in sizes_for("cpu", suite="loss")}
    gpu = {s.name: s.dims for s in sizes_for("gpu", suite="loss")}
    assert cpu["ce-large"] == "2048x256x100k" and len(cpu) >= 2  # the issue's size and a smaller one
    assert gpu == {"ce-large": "8192x512x1000k"}
    assert LOSS_DTYPES == {"cpu": ("float32",), "gpu": ("float32", "bfloat16")}
    # The goals' shape is a CPU size of the loss suite.
    assert report.LOSS_GOAL_SHAPE in {(s.n, s.d, s.c) for s in sizes_for("cpu", suite="loss")}
    with pytest.raises(ValueError, match="no size face on cpu --loss"):
        sizes_for("cpu", ["face"], suite="loss")
    with pytest.raises(ValueError, match="suite"):
        Size("x", 1, 1, 1, suite="nope")


def _grads(result: object) -> tuple[np.ndarray, np.ndarray]:
    """(grad_x, grad_w as C x D) from what a loss contender's run returns."""
    if isinstance(result, tuple) and len(result) == 3:  # cross_entropy_with_grad: loss, grad_x, grad_w
        gx, gw = result[1], result[2]
    elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], tuple):  # unfused NumPy
        gx, gw = result[1]
    else:  # torch.autograd.grad
        gx, gw = result  # type: ignore[misc]
    gx, gw = (np.asarray(a.detach() if hasattr(a, "detach") else a, dtype=np.float64) for a in (gx, gw))
    return gx, gw


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_loss_contenders_compute_the_same_gradients() -> None:
    """Every contender but the floor does the same work: the benchmark compares like with like."""
    size = Size("tiny", 12, 4, 9, suite="loss")
    cases = {c.name: c for c in loss_cases(size, "float32", "cpu")}
    fused = {f.name for f in FUSED["numpy"]}
    assert fused | {TORCH_LINEAR, TORCH_ADAPTER, TORCH_PML, TORCH_FUSED, NP_UNFUSED} == set(cases)
    assert {f.chunking for f in FUSED["numpy"]} == {"rows", "classes"} and len({f.budget_mib for f in FUSED["numpy"]}) >= 2
    assert all(c.floor == TORCH_LINEAR and c.kind == "loss" for c in cases.values())
    ref_x, ref_w = _grads(cases[TORCH_ADAPTER].run())
    checked = 0
    for name, case in cases.items():
        if name == TORCH_LINEAR:
            continue
        try:
            result = case.run()
        except (ImportError, NotImplementedError):  # pytorch-metric-learning or the torch op missing
            assert name in (TORCH_PML, TORCH_FUSED), name
            continue
        gx, gw = _grads(result)
        if gw.shape != ref_w.shape:
            gw = gw.T  # pytorch-metric-learning's W is (D, C)
        np.testing.assert_allclose(gx, ref_x, rtol=2e-4, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(gw, ref_w, rtol=2e-4, atol=2e-6, err_msg=name)
        checked += 1
    assert checked >= len(fused) + 1
    floor_x, _ = _grads(cases[TORCH_LINEAR].run())
    assert not np.allclose(floor_x, ref_x)  # the floor has no margin


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cpu_loss_run_writes_csv_section_plot_and_memory(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n<!-- bench:cpu:begin -->\nCPU text\n<!-- bench:cpu:end -->\n\n" + FOREIGN)
    size = Size("tiny", 16, 3, 7, suite="loss")
    out = tmp_path / "results"
    run_loss("cpu", Settings(repeat=2, warmup=1, min_time=0.0, lenet_batches=()), out_dir=out, doc=doc,
             plot_dir=tmp_path / "plots", sizes=(size,), threads=1, command="python -m bench --cpu --loss")
    assert sorted(p.name for p in out.iterdir()) == ["cpu_loss.csv", "cpu_loss.md", "cpu_loss_env.json"]
    rows = _csv(out / "cpu_loss.csv")
    names = {r["contender"] for r in rows}
    assert {TORCH_LINEAR, TORCH_ADAPTER, NP_UNFUSED} | {f.name for f in FUSED["numpy"]} <= names
    for r in rows:
        if r["note"]:  # only a missing peer or torch op may be skipped, with its reason
            assert r["contender"] in (TORCH_PML, TORCH_FUSED), r
            continue
        assert r["repeats"] == "2" and float(r["median_ms"]) > 0, r
        assert math.isfinite(float(r["ratio_to_floor"])), r
        # The separate-process probe measured every contender that ran.
        assert math.isfinite(float(r["peak_mib"])) and float(r["peak_mib"]) >= 0, r
    text = doc.read_text()
    assert "CPU text" in text and FOREIGN in text  # other sections stay
    assert text.count("<!-- bench:cpu-loss:begin -->") == 1
    section = text.split("<!-- bench:cpu-loss:begin -->")[1].split("<!-- bench:cpu-loss:end -->")[0]
    assert "#### CPU, float32, tiny 16x3x7" in section and "Memory budget sweep" in section
    assert "(default)" in section and "#### Goals of the fused loss" in section
    assert (out / "cpu_loss.md").read_text().strip() in text
    # The goals are at 2048x256x100k: a tiny run measures none of them.
    assert {g["status"] for g in report.loss_goals("cpu", report.read_csv(out / "cpu_loss.csv"))} == {"not measured"}
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plots" / "cpu_loss.png").stat().st_size > 1000

    # --render --loss rebuilds the same section from the files alone (how a GPU run comes back).
    again = tmp_path / "rendered"
    assert main(["--render", "cpu", "--loss", "--from", str(out), "--out", str(again), "--no-doc", "--no-plot"]) == 0
    def without_plot(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln and not ln.startswith("![")]

    assert without_plot((again / "cpu_loss.md").read_text()) == without_plot((out / "cpu_loss.md").read_text())


def _loss_row(contender: str, ratio: float, peak: float, library: str = "numpy") -> dict[str, object]:
    return {"device": "cpu", "size": "ce-large", "n": 2048, "d": 256, "c": 100_000, "dtype": "float32",
            "contender": contender, "library": library, "kind": "loss", "floor": TORCH_LINEAR,
            "median_ms": 1000.0 * ratio, "ratio_to_floor": ratio, "peak_mib": peak, "repeats": 3, "inner": 1,
            "note": ""}


def test_loss_goals_say_met_missed_and_not_measured() -> None:
    rows = [_loss_row(TORCH_LINEAR, 1.0, 2000.0, "torch"), _loss_row(TORCH_ADAPTER, 1.2, 4000.0, "torch"),
            _loss_row(TORCH_PML, 5.0, 9000.0, "torch"),
            _loss_row(Fused("numpy", "rows", 64).name, 1.25, 300.0),  # 1.04x the unfused, 1/13 of its memory
            _loss_row(Fused("numpy", "classes", 64).name, 1.8, 250.0)]  # 1.5x: over 1.4x
    status = {g["goal"].split(",")[0] + " " + g["contender"]: g["status"] for g in report.loss_goals("cpu", rows)}
    # The default settings are whatever the core plans at its default budget for this shape.
    mode, _ = report.chunk_plan(2048, 100_000, "float32", None, None)
    default = Fused("numpy", mode, report.default_budget_mib()).name
    assert status[f"fused peak memory (default settings) vs unfused {default}"] == "met"  # 1/13 or 1/16
    assert status[f"fused time {Fused('numpy', 'rows', 64).name}"] == "met"
    assert status[f"fused time {Fused('numpy', 'classes', 64).name}"] == "MISSED"
    # 5 / 1.25 = 4x faster (rows), 5 / 1.8 = 2.8x (classes)
    assert status[f"fused (default settings) vs pytorch-metric-learning {default}"] == (
        "met" if mode == "rows" else "MISSED")
    assert status[f"torch lsoftmax_cross_entropy time vs unfused {TORCH_FUSED}"] == "not measured"
    worse = [dict(r, peak_mib=600.0) if r["contender"] == default else r for r in rows]
    assert report.loss_goals("cpu", worse)[0]["status"] == "MISSED"  # 600/4000 > 1/8
    assert report.loss_goals("gpu", rows) == []  # the issue sets no GPU goal


def test_cli_loss_refuses_layer_only_and_unknown_sizes(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--cpu", "--loss", "--layer-only", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no size mnist on cpu --loss"):
        main(["--cpu", "--loss", "--sizes", "mnist", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_gpu_loss_cases_skip_the_missing_cupy_fused_loss_with_a_note() -> None:
    """Without a CuPy fused loss (or without CuPy) the GPU run keeps one skipped row saying why."""
    from bench.contenders import CP_FUSED_MISSING, _cupy_fused_cases

    cases = _cupy_fused_cases(Size("tiny", 4, 3, 5, suite="loss"), "bfloat16", 0)
    assert [c.name for c in cases] == [CP_FUSED_MISSING]
    with pytest.raises((NotImplementedError, ImportError), match="not measured"):
        cases[0].run()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_loss_cases_exclude_leaves_out_by_name_but_never_the_references() -> None:
    size = Size("tiny", 4, 3, 5, suite="loss")
    names = [c.name for c in loss_cases(size, "float32", "cpu", exclude=["numpy fused CE", "lsoftmax_cross_entropy"])]
    assert TORCH_FUSED not in names and not any("numpy fused CE" in n for n in names)
    assert {TORCH_LINEAR, TORCH_ADAPTER, NP_UNFUSED} <= set(names)
    with pytest.raises(ValueError, match="floor or the unfused"):
        loss_cases(size, "float32", "cpu", exclude=["torch adapter"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gpu_loss_run_steps_with_the_cpu_standing_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU loss run's own steps (files after every size and dtype, the section) on any machine.

    The CPU contenders stand in for the CUDA ones: what is checked is the runner, not a
    measurement (the files go to a temporary folder and nowhere else).
    """
    import torch

    from bench import runner

    devices: list[str] = []

    def stand_in(size: Size, dtype: str, device: str, seed: int = 0, exclude: object = ()) -> list:
        devices.append(device)
        return loss_cases(size, dtype, "cpu", seed, exclude=exclude)  # type: ignore[arg-type]

    written: list[int] = []
    real_write = runner._write

    def write(*args: object, **kwargs: object) -> None:
        written.append(len(args[2]))  # type: ignore[arg-type]
        real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner, "loss_cases", stand_in)
    monkeypatch.setattr(runner, "torch_cuda_peak", lambda fn: 1.0)
    monkeypatch.setattr(runner, "cupy_peak", lambda fn: 1.0)
    monkeypatch.setattr(runner, "_free_gpu_memory", lambda torch: None)
    monkeypatch.setattr(runner, "_write", write)
    sizes = (Size("tiny", 8, 3, 5, suite="loss"), Size("small", 6, 4, 7, suite="loss"))
    dtypes = ("float32", "float64")
    run_loss("gpu", Settings(repeat=1, warmup=1, min_time=0.0, lenet_batches=()), out_dir=tmp_path, doc=None,
             plot_dir=None, sizes=sizes, dtypes=dtypes, exclude=["numpy"], command="python -m bench --gpu --loss")
    rows = _csv(tmp_path / "gpu_loss.csv")
    per = len(rows) // 4
    assert [(r["size"], r["dtype"]) for r in rows] == [(s.name, d) for d in dtypes for s in sizes for _ in range(per)]
    assert not any("numpy" in r["contender"] for r in rows)
    assert devices[-4:] == ["cuda"] * 4  # the contenders are asked for on CUDA
    assert written == [per, 2 * per, 3 * per, 4 * per, 4 * per]  # after every (size, dtype): a cut run keeps its rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_loss.csv", "gpu_loss.md", "gpu_loss_env.json"]
    md = (tmp_path / "gpu_loss.md").read_text()
    assert "#### GPU, float32, tiny 8x3x5" in md and "#### GPU, float64, small 6x4x7" in md
    assert "No goal is set for the fused loss on GPU" in md
    assert json.loads((tmp_path / "gpu_loss_env.json").read_text())["command"] == "python -m bench --gpu --loss"
