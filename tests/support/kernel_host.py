"""Host builds of the CUDA code for the CPU tests (no GPU, no CUDA toolkit: only g++).

* ``build_math``: tests/support/host_shim.cpp over kernels/lsoftmax_math.cuh (the scalar maths).
* ``build_emulator``: kernels/lsoftmax.cu itself, every instantiation the backend names,
  run by the fiber emulator in tests/support/cuda_emulator.hpp.
* ``EmuBackend``: forward/backward exactly as lsoftmax_core/_cupy_backend.py runs them
  (same validation, same launch plan from lsoftmax_core/_cupy_plan.py, same buffers and
  argument packing), with NumPy GEMMs in place of cuBLAS and the emulator in place of the GPU.

Both libraries are compiled with -ffp-contract=off, matching NVRTC's --fmad=false.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from lsoftmax_core import _cupy_plan as plan
from lsoftmax_core.checks import check_arrays

from support.reference import backward as ref_backward
from support.reference import forward as ref_forward

SUPPORT = Path(__file__).resolve().parent
KERNELS = SUPPORT.parents[1] / "kernels"
CXXFLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", f"-I{KERNELS}", f"-I{SUPPORT}"]

try:
    import ml_dtypes

    BFLOAT16: np.dtype[Any] | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - jax depends on ml_dtypes
    BFLOAT16 = None
    ml_dtypes = None

DTYPES = tuple(
    d for d in (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BFLOAT16) if d is not None
)


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _build(out: Path, sources: list[Path]) -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    cmd = [cxx, *CXXFLAGS, "-o", str(out), *map(str, sources)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return ctypes.CDLL(str(out))


def build_math(tmp: Path) -> ctypes.CDLL:
    lib = _build(tmp / "libhostmath.so", [SUPPORT / "host_shim.cpp"])
    u64p, f64p, f32p = (np.ctypeslib.ndpointer(t, flags="C") for t in (np.uint64, np.float64, np.float32))
    i, ll, d = ctypes.c_int, ctypes.c_longlong, ctypes.c_double
    lib.lsm_convert.argtypes = [i, i, i, i, u64p, u64p, ll]
    lib.lsm_psi_f64.argtypes = [f64p, ll, i, f64p, f64p, f64p]
    lib.lsm_psi_f32.argtypes = [f32p, ll, i, f64p, f32p, f32p]
    lib.lsm_scale_exponent_f64.argtypes = [d]
    lib.lsm_scale_exponent_f32.argtypes = [ctypes.c_float]
    lib.lsm_sample_f64.argtypes = [d, d, d, i, i, i, f64p, d, d, f64p]
    return lib


class Emulator:
    """The kernels of lsoftmax.cu, launched by name like CuPy's RawModule functions."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.emu_kernel_name.restype = ctypes.c_char_p
        lib.emu_launch.argtypes = [
            ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
        ]  # fmt: skip
        lib.emu_barrier_count.restype = ctypes.c_longlong
        self.sizes: dict[str, list[int]] = {}
        for k in range(lib.emu_kernel_count()):
            buf = (ctypes.c_int * 64)()
            nargs = lib.emu_kernel_arg_sizes(k, buf, 64)
            self.sizes[lib.emu_kernel_name(k).decode()] = list(buf[:nargs])

    @staticmethod
    def _pack(value: Any) -> ctypes._SimpleCData:
        # Like CuPy: an array travels as its data pointer, a NumPy scalar as its own bytes.
        if isinstance(value, np.ndarray):
            if not value.flags.c_contiguous:
                raise ValueError("kernels take C-contiguous arrays only")
            return ctypes.c_uint64(value.ctypes.data)
        if isinstance(value, np.generic) and value.dtype.itemsize == 8:
            if value.dtype.kind == "f":
                return ctypes.c_double(float(value))
            if value.dtype.kind == "i":
                return ctypes.c_int64(int(value))
            if value.dtype.kind == "u":
                return ctypes.c_uint64(int(value))
        raise TypeError(f"cannot pass {value!r} ({type(value).__name__}) to a kernel")

    def launch(self, launch: plan.Launch, bufs: dict[str, Any], order: int = 0) -> None:
        values = [bufs[a] if isinstance(a, str) else a for a in launch.args]
        packed = [self._pack(v) for v in values]
        sizes = [ctypes.sizeof(p) for p in packed]
        if self.sizes.get(launch.name) != sizes:
            raise TypeError(
                f"{launch.name}: kernel parameter sizes {self.sizes.get(launch.name)}, passed {sizes}"
            )
        argv = (ctypes.c_void_p * len(packed))(
            *[ctypes.cast(ctypes.byref(p), ctypes.c_void_p) for p in packed]
        )
        err = ctypes.create_string_buffer(512)
        rc = self.lib.emu_launch(
            launch.name.encode(),
            launch.grid[0],
            launch.grid[1],
            plan.BLOCK,
            argv,
            len(packed),
            order,
            err,
            512,
        )
        if rc != 0:
            raise RuntimeError(f"emulated launch of {launch.name} failed: {err.value.decode()}")


def build_emulator(tmp: Path) -> Emulator:
    lines = [
        '#include "cuda_emulator.hpp"',
        '#include "lsoftmax.cu"',
        "std::vector<emu::Entry> emu::build_registry() {",
        "  return {",
    ]
    lines += [f'    emu::make_entry("{n}", &{n}),' for n in plan.name_expressions()]
    lines += ["  };", "}"]
    src = tmp / "emulated_kernels.cpp"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Emulator(_build(tmp / "libemu.so", [src]))


def nasty_rows(dtype: Any, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with cos exactly 1, -1, 0 and cos(j*pi/m), zero rows, and huge/tiny norms."""
    # big^2 * (2m - 1) must stay finite: |psi| <= 2m - 1 = 127 at m = 64.
    big, tiny = {
        "float64": (2.0**500, 2.0**-500),
        "float32": (2.0**60, 2.0**-60),
        "float16": (2.0**4, 2.0**-4),
        "bfloat16": (2.0**60, 2.0**-60),
    }[np.dtype(dtype).name]
    angles = [0.0, np.pi, np.pi / 2] + [j * np.pi / m for j in range(1, m)]
    w = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [big, 0.0, 0.0], [tiny, 0.0, 0.0]])
    xs, labs = [], []
    for a in angles:
        for scale in (1.0, big, tiny):
            for cls in (0, 2, 3):
                xs.append([scale * np.cos(a), scale * np.sin(a), 0.0])
                labs.append(cls)
    xs += [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]
    labs += [0, 1, 1]
    return np.array(xs).astype(dtype), w.astype(dtype), np.array(labs)


def representable(dtype: Any, x: Any, w: Any, label: Any, g: Any, m: int, beta: float) -> bool:
    """Whether the exact results fit the dtype (float16 overflows at 65504: a problem whose
    exact logits or gradients do not fit has no correct float16 answer)."""
    is_bf16 = BFLOAT16 is not None and dtype == BFLOAT16  # np.dtype(...) == None is True for float64
    bound = float((ml_dtypes.finfo if is_bf16 else np.finfo)(dtype).max) / 4
    results = (
        ref_forward(x, w, label, margin=m, beta=beta),
        *ref_backward(g, x, w, label, margin=m, beta=beta),
    )
    return all(float(np.max(np.abs(r), initial=0.0)) < bound for r in results)


def gemm(a: np.ndarray, b: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """cuBLAS stand-in: float64 products rounded once to the dtype (fp32 accumulation or better)."""
    return np.ascontiguousarray((a.astype(np.float64) @ b.astype(np.float64)).astype(dtype))


class EmuBackend:
    """forward/backward as _cupy_backend runs them, on the emulator.  Keeps its workspace
    and error record across calls like the backend's per-stream state; a new workspace
    starts as garbage (not zeros), like CuPy's ``empty``."""

    def __init__(self, emu: Emulator, order: int = 0) -> None:
        self.emu = emu
        self.order = order
        self.table = plan.threshold_table()
        self.err_key = np.full(1, np.iinfo(np.uint64).max, dtype=np.uint64)
        self.err_rec = np.zeros(4, dtype=np.int64)
        self.coef = np.zeros(0, dtype=np.float64)
        self.classes = np.zeros(0, dtype=np.uint32)
        self.serial = 0

    def run(self, steps: tuple[plan.Step, ...], bufs: dict[str, Any]) -> None:
        for step in steps:
            if isinstance(step, plan.Zero):
                bufs[step.name][: step.count] = 0
            else:
                self.emu.launch(step, bufs, self.order)

    def _common(self, label: np.ndarray, beta: float) -> dict[str, Any]:
        self.serial += 1
        return {
            "label": np.ascontiguousarray(label, dtype=plan.kernel_label_dtype(label.dtype)),
            "thresholds": self.table,
            "err_key": self.err_key,
            "err_rec": np.uint64(self.err_rec.ctypes.data),
            "beta": np.float64(beta),
            "serial": np.int64(self.serial),
        }

    def forward(
        self, x: np.ndarray, w: np.ndarray, label: np.ndarray, *, margin: Any, beta: Any
    ) -> np.ndarray:
        p = check_arrays(x, w, label, margin, beta, dtypes=DTYPES)
        bufs = self._common(label, p.beta)
        bufs.update(x=np.ascontiguousarray(x), w=np.ascontiguousarray(w), logits=gemm(x, w.T, p.dtype))
        self.run(plan.forward_launches(p, bufs["label"].dtype), bufs)
        return bufs["logits"]  # type: ignore[no-any-return]

    def backward(
        self,
        grad_logits: np.ndarray,
        x: np.ndarray,
        w: np.ndarray,
        label: np.ndarray,
        *,
        margin: Any,
        beta: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        p = check_arrays(x, w, label, margin, beta, dtypes=DTYPES, grad_logits=grad_logits)
        bufs = self._common(label, p.beta)
        ncoef, nclasses = plan.workspace_sizes(p)
        if self.coef.size < ncoef:
            self.coef = np.full(ncoef, np.nan)  # never read before written
        if self.classes.size < nclasses:
            self.classes = np.full(nclasses, 0xDEADBEEF, dtype=np.uint32)  # cleared by a Zero step
        bufs.update(
            grad_logits=np.ascontiguousarray(grad_logits),
            x=np.ascontiguousarray(x),
            w=np.ascontiguousarray(w),
            grad_x=gemm(grad_logits, w, p.dtype),
            grad_w=gemm(grad_logits.T, x, p.dtype),
            coef=self.coef,
            classes=self.classes,
        )
        self.run(plan.backward_launches(p, bufs["label"].dtype), bufs)
        return bufs["grad_x"], bufs["grad_w"]
