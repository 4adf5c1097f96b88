"""Every suite of `python -m bench` runs end to end at a tiny size on the CPU and writes files
that parse; the contenders compute what their names say.  No timing is asserted: speed is
measured by `python -m bench`, not by tests."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from support.bench_loader import ROOT, load_bench  # noqa: E402

load_bench()

from bench import (  # noqa: E402
    class_parallel_memory,
    class_parallel_sampling,
    layer,
    lenet,
    loss,
    margins,
    overhead,
    suites,
)
from bench.__main__ import main  # noqa: E402
from bench.harness import peak_rss_delta  # noqa: E402
from bench.record import Goal, Options, publish, read_csv, render  # noqa: E402
from bench.sizes import Size, host_arrays, sizes_for  # noqa: E402

QUICK = {"repeat": 2, "warmup": 1, "min_time": 0.0}
# pytorch-metric-learning 2.9 calls scipy with a NumPy scalar, which NumPy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver
        return False


def _run(name: str, out: Path, device: str = "cpu", **options: object) -> tuple[list[dict[str, str]], str]:
    """Run suite ``name`` as `python -m bench` does; return its CSV rows (as text) and markdown."""
    suite = suites()[name]
    rows: list[dict[str, object]] = []
    for batch in suite.run(Options(device=device, **{**QUICK, **options})):  # type: ignore[arg-type]
        rows += batch
        publish(suite, device, rows, {"command": f"test {name}"}, out)
    with open(out / f"{device}_{name}.csv", newline="") as f:
        text_rows = list(csv.DictReader(f))
    assert tuple(text_rows[0]) == suite.columns
    assert json.loads((out / f"{device}_{name}_env.json").read_text())["suite"] == name
    return text_rows, (out / f"{device}_{name}.md").read_text()


def _measured(rows: list[dict[str, str]], skippable: tuple[str, ...] = ()) -> None:
    for r in rows:
        if r["note"] and r["contender"] in skippable:
            continue  # a missing peer: a skipped row with its reason
        assert float(r["median_ms"]) > 0 and r["repeats"] == "2", r
        assert (float(r["ratio"]) == 1.0) if r["contender"] == r["floor"] else math.isfinite(float(r["ratio"])), r


def test_help_lists_every_suite(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(f"  {name} " in text for name in ("layer", "loss", "margins", "overhead", "lenet",
                                                  "class-parallel-memory", "class-parallel-sampling"))


def test_layer_suite_writes_rows_memory_and_a_table_that_render_reproduces(tmp_path: Path) -> None:
    rows, md = _run("layer", tmp_path, sizes=(Size("tiny", 8, 3, 5),), threads=1)
    names = [r["contender"] for r in rows]
    assert names == [layer.NP_LINEAR, layer.NP_LSM, layer.TORCH_LINEAR, layer.TORCH_ADAPTER, layer.TORCH_NAIVE,
                     layer.TORCH_PML]
    _measured(rows, (layer.TORCH_PML,))
    assert all(math.isfinite(float(r["peak_mib"])) for r in rows if not r["note"])  # the probe's process ran
    assert md.count(f"| {layer.NP_LSM} |") == 2 and "## Goals" in md  # time and memory tables
    (tmp_path / "cpu_layer.md").unlink()
    assert render(tmp_path, suites()) == [tmp_path / "cpu_layer.md"]
    assert (tmp_path / "cpu_layer.md").read_text() == md


def test_layer_suite_without_torch_keeps_the_backend_pair(tmp_path: Path) -> None:
    rows, _ = _run("layer", tmp_path, sizes=(Size("tiny", 8, 3, 5),), exclude=("torch",), memory=False)
    assert [r["contender"] for r in rows] == [layer.NP_LINEAR, layer.NP_LSM]


def test_loss_suite_has_the_peers_the_three_gemms_and_the_defaults(tmp_path: Path) -> None:
    rows, md = _run("loss", tmp_path, sizes=(Size("tiny", 16, 3, 7, table="loss"),), threads=1)
    names = {r["contender"] for r in rows}
    assert {layer.TORCH_LINEAR, loss.TORCH_LCE, loss.GEMMS, layer.TORCH_ADAPTER, loss.TORCH_FUSED,
            loss.fused_name("numpy"), loss.NP_UNFUSED} <= names
    assert {loss.fused_name("numpy", m, b) for m, b in loss.SETTINGS["cpu"]} <= names
    _measured(rows, (layer.TORCH_PML,))
    assert all(math.isfinite(float(r["peak_mib"])) for r in rows if not r["note"] or "plan" in r["note"])
    assert "| time / 3 GEMMs |" in md and "default plan at" in md


def test_loss_contenders_compute_the_same_gradients() -> None:
    """Every L-Softmax contender does the same work: the benchmark compares like with like."""
    (group,) = loss.cases(Size("tiny", 12, 4, 9, table="loss"), "float32", "cpu")
    by = {c.name: c for c in group}

    def grads(result: object) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(result, tuple) and len(result) == 3:  # cross_entropy_with_grad: loss, grad_x, grad_w
            result = result[1:]
        elif isinstance(result, tuple) and isinstance(result[1], tuple):  # the unfused NumPy loss
            result = result[1]
        return tuple(np.asarray(a.detach() if hasattr(a, "detach") else a, np.float64) for a in result)  # type: ignore

    ref_x, ref_w = grads(by[layer.TORCH_ADAPTER].run())
    skip = {layer.TORCH_LINEAR, loss.TORCH_LCE, loss.GEMMS, layer.TORCH_PML}
    for name, case in by.items():
        if name not in skip:
            gx, gw = grads(case.run())
            np.testing.assert_allclose(gx, ref_x, rtol=2e-4, atol=2e-6, err_msg=name)
            np.testing.assert_allclose(gw, ref_w, rtol=2e-4, atol=2e-6, err_msg=name)
    floor_x, floor_w = grads(by[layer.TORCH_LINEAR].run())
    np.testing.assert_allclose(grads(by[loss.TORCH_LCE].run())[1], floor_w, rtol=1e-4, atol=1e-6)
    assert not np.allclose(floor_x, ref_x)  # the floors have no margin
    with pytest.raises(ValueError, match="floor or the unfused"):
        loss.cases(Size("tiny", 4, 3, 5, table="loss"), "float32", "cpu", exclude=["torch adapter"])


def test_three_gemms_are_x_wt_then_both_products_in_class_chunks() -> None:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 3)), rng.standard_normal((11, 3))
    gx, gw = loss.three_gemms(np, x, w, chunk_bytes=5 * 8 * 4)()  # chunks of 4 classes: 4, 4, 3
    z = x @ w.T
    np.testing.assert_allclose(gx, z @ w, rtol=1e-12)
    np.testing.assert_allclose(gw, z.T @ x, rtol=1e-12)


def test_margins_suite_has_every_kind_in_the_layer_and_the_fused_loss(tmp_path: Path) -> None:
    sizes = (Size("tiny-layer", 8, 3, 5), Size("tiny-loss", 16, 3, 7, table="loss"))
    rows, md = _run("margins", tmp_path, sizes=sizes, threads=1)
    by_size = {s.name: [r["contender"] for r in rows if r["size"] == s.name] for s in sizes}
    assert by_size["tiny-layer"] == [layer.NP_LINEAR, *(margins.layer_name(k) for k in margins.KINDS)]
    assert by_size["tiny-loss"] == [loss.TORCH_LCE, loss.GEMMS, *(margins.fused_name(k) for k in margins.KINDS),
                                    margins.subcenter_name()]
    _measured(rows)
    assert all(math.isfinite(float(r["peak_mib"])) for r in rows)  # the probe's process ran both sizes
    assert "time / numpy linear" in md and "| time / F.linear_cross_entropy |" in md and "## Goals" in md
    (tmp_path / "cpu_margins.md").unlink()
    assert render(tmp_path, suites()) == [tmp_path / "cpu_margins.md"]
    assert (tmp_path / "cpu_margins.md").read_text() == md


def test_margins_contenders_compute_what_their_names_say() -> None:
    """Each kind's row runs that kind: the layer's outputs and the fused loss's gradients equal
    the core's forward/backward of the kind its name gives (the unfused loss, float64)."""
    import lsoftmax_core as lsm

    size = Size("tiny", 12, 4, 9)
    (group,) = margins.cases(size, "float32", "cpu")
    by = {c.name: c for c in group}
    x64, w64, y, g64 = host_arrays(size)
    x, w, g = (a.astype(np.float32).astype(np.float64) for a in (x64, w64, g64))  # the float32 inputs, exactly
    for kind in margins.KINDS:
        logits, (gx, gw) = by[margins.layer_name(kind)].run()
        np.testing.assert_allclose(logits, lsm.forward(x, w, y, margin=kind), rtol=1e-4, atol=1e-4, err_msg=str(kind))
        ref_x, ref_w = lsm.backward(g, x, w, y, margin=kind)
        np.testing.assert_allclose(gx, ref_x, rtol=1e-4, atol=1e-4, err_msg=str(kind))
        np.testing.assert_allclose(gw, ref_w, rtol=1e-4, atol=1e-4, err_msg=str(kind))

    size = Size("tiny", 12, 4, 9, table="loss")
    (group,) = margins.cases(size, "float32", "cpu")
    by = {c.name: c for c in group}
    x64, w64, y, _ = host_arrays(size)
    x, w = (a.astype(np.float32).astype(np.float64) for a in (x64, w64))
    rows = np.arange(len(y))
    for kind in margins.KINDS:
        f = lsm.forward(x, w, y, margin=kind)
        p = np.exp(f - f.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[rows, y] -= 1.0
        ref_x, ref_w = lsm.backward(p / len(y), x, w, y, margin=kind)
        _, gx, gw = by[margins.fused_name(kind)].run()
        np.testing.assert_allclose(gx, ref_x, rtol=2e-3, atol=2e-4, err_msg=str(kind))
        np.testing.assert_allclose(gw, ref_w, rtol=2e-3, atol=2e-4, err_msg=str(kind))
    _, gx, gw = by[margins.subcenter_name()].run()
    assert gw.shape == (margins.SUBCENTERS * size.c, size.d) and np.isfinite(gx).all()
    import torch
    import torch.nn.functional as F

    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    F.cross_entropy(F.linear(tx, tw), torch.tensor(y)).backward()
    np.testing.assert_allclose(by[loss.TORCH_LCE].run()[1], tw.grad.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="every ratio needs"):
        margins.cases(size, "float32", "cpu", exclude=["L-Softmax"])
    assert loss.TORCH_LCE not in {c.name for c in margins.cases(size, "float32", "cpu", exclude=["torch"])[0]}


def test_margins_sizes_are_the_face_layer_and_the_loss_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    assert main(["margins", "--dry-run", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert "sizes face 256x512x10k, ce-small 2048x256x10k, ce-large 2048x256x100k; 7 repetitions; threads 1" in \
        capsys.readouterr().out
    assert main(["margins", "--dry-run", "--sizes", "ce-small,mnist", "--out", str(tmp_path)]) == 0
    assert "sizes mnist 256x2x10, ce-small 2048x256x10k;" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["margins", "--sizes", "cp-1m", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_overhead_suite_runs_at_one_thread_and_the_default(tmp_path: Path) -> None:
    import lsoftmax_core

    rows, md = _run("overhead", tmp_path, sizes=sizes_for("cpu", "layer", ["mnist"]))
    assert {r["threads"] for r in rows} == {"1", "default"}
    assert {overhead.NP_CE_STEP, overhead.NP_FWD_BWD, overhead.NP_STATS, layer.TORCH_ADAPTER} <= {
        r["contender"] for r in rows}
    _measured(rows)
    assert lsoftmax_core.cpu_kernels() == "numpy"  # the run restores the choice it found
    assert "## threads: 1" in md and "x GEMMs" in md and "## Goals" in md


def test_numpy_ce_step_is_softmax_cross_entropy_and_its_gradients() -> None:
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    x, w, y = rng.standard_normal((9, 4)), rng.standard_normal((5, 4)), rng.integers(0, 5, 9)
    loss_, gx, gw = overhead.numpy_ce_step(x, w, y)()
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    F.cross_entropy(F.linear(tx, tw), torch.tensor(y)).backward()
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_lenet_suite_reports_both_heads(tmp_path: Path) -> None:
    rows, md = _run("lenet", tmp_path)
    assert [r["head"] for r in rows] == [lenet.PLAIN, lenet.LSOFTMAX] and all(float(r["samples_per_s"]) > 0
                                                                               for r in rows)
    assert "| 128 |" in md


def test_class_parallel_memory_suite_measures_every_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(class_parallel_memory, "RANKS", (2,))
    rows, md = _run("class-parallel-memory", tmp_path, sizes=(Size("tiny", 4, 16, 20_000, table="class-parallel"),))
    assert [(r["ranks"], r["rank"], r["local_classes"]) for r in rows] == [
        ("single", "0", "20000"), ("2", "0", "10000"), ("2", "1", "10000")]
    assert all(float(r["step_mib"]) >= 0 for r in rows) and "| single |" in md


def test_class_parallel_sampling_suite_times_and_measures_every_rank_at_each_rate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(class_parallel_sampling, "CASES", (("lsoftmax4", 1.0), ("arcface", 0.1)))
    rows, md = _run("class-parallel-sampling", tmp_path, sizes=(Size("tiny", 8, 16, 2000),))
    # 1000 classes per rank; at 0.1 ceil(0.1 * 1000) = 100, more than the 8 targets.
    assert [(r["margin"], r["sample_rate"], r["rank"], r["local_classes"], r["sampled_classes"]) for r in rows] == [
        ("lsoftmax4", "1", "0", "1000", "1000"), ("lsoftmax4", "1", "1", "1000", "1000"),
        ("arcface", "0.1", "0", "1000", "100"), ("arcface", "0.1", "1", "1000", "100")]
    for r in rows:
        assert r["steps"] == "2" and float(r["steps_per_s"]) > 0 and float(r["step_mib"]) >= 0, r
        assert float(r["state_mib"]) == float(r["weight_mib"]), r  # SGD's momentum buffer, made in the warm-up
    assert "| L-Softmax(4) | 1 | 1,000 / 1,000 |" in md and "| ArcFace(0.5, 64) | 0.1 | 100 / 1,000 |" in md
    assert "## Goals" not in md  # no margin has both 1.0 and 0.1 here
    assert class_parallel_sampling.markdown([dict(rows[0], margin="arcface")] + rows[2:3])[-2].endswith(
        ("| met |", "| MISSED |"))


def test_goals_say_met_missed_and_not_measured() -> None:
    row = {"n": 2, "d": 3, "c": 4, "dtype": "float32", "threads": 1, "contender": "a", "ratio": 1.1, "peak_mib": 10.0}
    rows = [row, dict(row, contender="b", ratio=2.2, peak_mib=100.0)]
    assert Goal("t", (2, 3, 4), "a", 1.2).check(rows)[2:] == ["1.100x", "met"]
    assert Goal("t", (2, 3, 4), "b", 1.2, vs="a", at_least=True).check(rows)[2:] == ["2.000x", "met"]
    assert Goal("t", (2, 3, 4), "a", 0.05, vs="b", column="peak_mib").check(rows)[3] == "MISSED"
    assert Goal("t", (2, 3, 4), "a", 1.2, threads="default").check(rows)[3] == "not measured"
    assert Goal("t", (9, 3, 4), "a", 1.2).check(rows)[2:] == ["unverified: not measured", "not measured"]


def test_sizes_and_arguments_are_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no size nope for the loss table on cpu"):
        sizes_for("cpu", "loss", ["nope"])
    assert [s.dims for s in sizes_for("gpu", "loss")] == ["8192x512x256k"]  # 1M only when asked for
    assert [s.dims for s in sizes_for("gpu", "loss", ["ce-1m"])] == ["8192x512x1M"]
    for argv in (["nope"], ["loss", "--sizes", "mnist"], ["class-parallel-memory", "--gpu"]):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(_gpu(), reason="a GPU is present: the GPU runs are tested below")
def test_gpu_run_refuses_without_a_device(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="nothing to measure"):
        main(["layer", "--gpu", "--exclude", "torch", "--quick", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_gpu_check_parses_and_its_loss_call_plans_the_default_size() -> None:
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = dict(os.environ, DRY_RUN="1", LOSS_BENCH="1", PYTHON=sys.executable)
    out = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=True, timeout=120).stdout
    assert "loss on gpu: sizes ce-256k 8192x512x256k; 5 repetitions" in out and "gpu tests" not in out
    out = subprocess.run([str(script)], env=dict(env, LOSS_SIZES="ce-1m"), capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "sizes ce-1m 8192x512x1M" in out


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_delta_sees_a_transient_allocation() -> None:
    peak = peak_rss_delta(lambda: np.ones(8 * 2**20).sum())  # 64 MiB, mapped and unmapped by itself
    assert 60.0 < peak < 200.0


def test_naive_autograd_agrees_with_the_core() -> None:
    import torch

    import lsoftmax_core as lsm

    rng = np.random.default_rng(1)
    x, w, y = rng.standard_normal((16, 5)), rng.standard_normal((7, 5)), rng.integers(0, 7, 16)
    naive = layer.naive_lsoftmax(torch.tensor(x), torch.tensor(w), torch.tensor(y), 4, 0.5).numpy()
    np.testing.assert_allclose(naive, lsm.forward(x, w, y, margin=4, beta=0.5), rtol=1e-9, atol=1e-9)


def test_profile_script_runs_the_numpy_path(capsys: pytest.CaptureFixture[str]) -> None:
    import runpy

    profile = runpy.run_path(str(ROOT / "scripts" / "profile_overhead.py"))
    assert profile["main"](["--paths", "numpy", "--repeat", "1", "--calls", "5", "--top", "3"]) == 0
    assert "=== numpy: 256x2x10" in capsys.readouterr().out


@pytest.mark.gpu
def test_gpu_layer_and_loss_suites_run(tmp_path: Path) -> None:
    rows, _ = _run("layer", tmp_path, device="gpu", sizes=(Size("tiny", 8, 3, 5),))
    _measured(rows, (layer.TORCH_PML,))
    rows, md = _run("loss", tmp_path, device="gpu", sizes=(Size("tiny", 64, 8, 100, table="loss"),))
    _measured(rows, (layer.TORCH_PML, loss.TORCH_LCE, loss.fused_name("cupy")))
    assert read_csv(tmp_path / "gpu_loss.csv")[0]["dtype"] == "float32" and "bfloat16" in md
