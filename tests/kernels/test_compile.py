"""Every kernel instantiation the CuPy backend can launch compiles with NVRTC, on a
machine without a GPU, for sm_70, sm_75, sm_80 and sm_90 (each one the installed NVRTC
still supports: CUDA 13 dropped sm_70, so with ``cupy-cuda13x`` it is skipped and sm_75 is
the oldest target), with the options CuPy uses at run time
(ours plus -ftz=true and --device-as-default-execution-space), and ptxas reports no
register spills.

Needs CuPy and NVRTC only (no device, no CUDA toolkit): ``cupy-cuda12x`` plus the NVRTC
wheel ``nvidia-cuda-nvrtc-cu12`` (or ``cupy-cuda12x[ctk]``).  Skipped without CuPy; with
CuPy but no loadable NVRTC it fails, since the CUDA code would then go untested.
"""

from __future__ import annotations

import re

import pytest

from lsoftmax_core import _cupy_plan as plan

pytest.importorskip("cupy")

ARCHS = ["sm_70", "sm_75", "sm_80", "sm_90"]
DTYPE_NAMES = list(plan.FORMATS)
# What CuPy appends to a RawModule's options before NVRTC (cupy/cuda/compiler.py).
CUPY_ADDS = ("-ftz=true", "--device-as-default-execution-space")


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # ImportError or a missing libnvrtc
        pytest.fail(f"NVRTC is not loadable ({exc}); install nvidia-cuda-nvrtc-cu12 (or cupy-cuda12x[ctk])")
    return nvrtc


def _compile(dtype_name: str, target: str) -> tuple[str, dict[str, str], bytes]:
    nvrtc = _nvrtc()
    names = plan.name_expressions(dtype_name)
    prog = nvrtc.createProgram(plan.kernel_source(), "lsoftmax.cu", [], [])
    for n in names:
        nvrtc.addNameExpression(prog, n)
    opts = [*plan.NVRTC_OPTIONS, *CUPY_ADDS, f"-arch={target}"]
    if target.startswith("sm_"):
        opts += ["-Xptxas", "-v"]
    try:
        nvrtc.compileProgram(prog, opts)
    except nvrtc.NVRTCError:
        pytest.fail(f"NVRTC failed for {dtype_name} {target}:\n{nvrtc.getProgramLog(prog)}")
    lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
    binary = nvrtc.getCUBIN(prog) if target.startswith("sm_") else nvrtc.getPTX(prog)
    return nvrtc.getProgramLog(prog), lowered, binary


def test_source_is_package_data_with_the_header_inlined() -> None:
    src = plan.kernel_source()
    includes = [ln.strip() for ln in src.splitlines() if ln.strip().startswith("#include")]
    # Nothing for NVRTC to look up: <math.h> is only in the header's host (g++) branch.
    assert includes == ["#include <math.h>"]
    host_branch = src[
        src.index("#if defined(__CUDACC__) || defined(__CUDACC_RTC__)") : src.index("#define LSM_HD inline")
    ]
    assert "#include <math.h>" in host_branch.split("#else")[1]
    assert "psi_and_derivative" in src and "lsm_backward_classes" in src


def test_definitions_come_from_the_plan() -> None:
    """LSM_BLOCK and the op codes have one source, _cupy_plan: NVRTC gets them as options,
    and the source refuses to compile without them."""
    for name, value in plan.DEFINES.items():
        assert f"-D{name}={value}" in plan.NVRTC_OPTIONS
        assert f"#define {name}" not in plan.kernel_source()
    assert plan.DEFINES["LSM_BLOCK"] == plan.BLOCK
    assert (plan.DEFINES["LSM_OP_FORWARD"], plan.DEFINES["LSM_OP_BACKWARD"]) == (
        plan.OP_FORWARD,
        plan.OP_BACKWARD,
    )
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(plan.kernel_source(), "lsoftmax.cu", [], [])
    opts = [o for o in plan.NVRTC_OPTIONS if not o.startswith("-D")]
    with pytest.raises(nvrtc.NVRTCError):
        nvrtc.compileProgram(prog, [*opts, *CUPY_ADDS, "-arch=compute_90"])
    assert "_cupy_plan.DEFINES" in nvrtc.getProgramLog(prog)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_compiles_without_spills(dtype_name, arch) -> None:
    nvrtc = _nvrtc()
    if int(arch[3:]) not in nvrtc.getSupportedArchs():
        pytest.skip(f"NVRTC {'.'.join(map(str, nvrtc.getVersion()))} does not support {arch}")
    log, lowered, cubin = _compile(dtype_name, arch)
    assert len(cubin) > 0
    assert all(v for v in lowered.values()) and len(set(lowered.values())) == len(lowered)
    entries = re.findall(r"Compiling entry function '(\w+)' for '(\w+)'", log)
    assert sorted(e for e, _ in entries) == sorted(lowered.values())
    assert {a for _, a in entries} == {arch}
    props = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(props) == len(lowered)
    assert all(st == "0" and ld == "0" for _, st, ld in props), log
    # Warnings other than sm_70's deprecation notice (CUDA 12.9) would be news.
    warnings = [ln for ln in log.splitlines() if "warning" in ln and "deprecated" not in ln]
    assert not warnings, "\n".join(warnings)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_float32_float64_kernels_have_no_flush_to_zero_conversions(dtype_name) -> None:
    """CuPy forces -ftz=true, which makes float32<->float64 conversion instructions flush
    subnormals.  The float32/float64 kernels convert formats with integer code and do all
    arithmetic in float64 (never flushed), so their PTX holds no float-format cvt at all."""
    _, _, ptx = _compile(dtype_name, "compute_90")
    cvts = set(re.findall(r"\bcvt(?:\.\w+)+", ptx.decode()))
    float_cvts = {c for c in cvts if re.search(r"\.f(16|32|64)\b.*\.f(16|32|64)\b", c)}
    assert not float_cvts and not any(".ftz" in c for c in cvts), sorted(cvts)
