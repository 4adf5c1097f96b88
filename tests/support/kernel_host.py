"""Host builds of the CUDA code for the CPU tests (no GPU, no CUDA toolkit: only g++).

* ``build_math``: tests/support/host_shim.cpp over kernels/lsoftmax_math.cuh (the scalar maths).
* ``build_emulator``: kernels/lsoftmax.cu itself, every instantiation the backend names,
  run by the fiber emulator in tests/support/cuda_emulator.hpp.
* ``EmuBackend``: forward/backward as lsoftmax_core/_cupy_backend.py runs them, and the fused
  cross-entropy as lsoftmax_core/_cupy_loss.py runs it (its ops under the one loss engine): same
  validation, and the same launch plan and argument binding (``_cupy_plan.bind_forward`` /
  ``bind_backward``, executed by ``Call.run``), with NumPy arrays and GEMMs in place of
  CuPy and cuBLAS and the emulator in place of the GPU.

Both libraries are compiled with -ffp-contract=off, matching NVRTC's --fmad=false, and
with the plan's definitions (``_cupy_plan.DEFINES``: block size, op codes) like NVRTC.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from lsoftmax_core import LossOptions
from lsoftmax_core import _cupy_plan as plan
from lsoftmax_core._cupy_loss import engine_over
from lsoftmax_core._loss_engine import LossEngine
from lsoftmax_core.checks import check_arrays

from support.reference import backward as ref_backward
from support.reference import forward as ref_forward
from support.tolerances import TOLERANCES, assert_close, check_forward, grad_scales

SUPPORT = Path(__file__).resolve().parent
KERNELS = SUPPORT.parents[1] / "kernels"
CXXFLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", f"-I{KERNELS}", f"-I{SUPPORT}"]
# g++ marks inline variables and the statics of templates and inline functions (the
# emulator's registry and thread indices, the kernels' __shared__ arrays) STB_GNU_UNIQUE,
# which the dynamic loader merges across libraries even when loaded RTLD_LOCAL: a second
# emulator in the process (built with other definitions) would run the first one's kernels.
GXX_ONLY_FLAGS = ["-fno-gnu-unique"]

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


def _build(out: Path, sources: list[Path], defines: dict[str, int] | None = None) -> ctypes.CDLL:
    """g++ with CXXFLAGS and ``defines`` (default: the plan's, as NVRTC gets them)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    flags = [f"-D{k}={v}" for k, v in (plan.DEFINES if defines is None else defines).items()]
    if "clang" not in Path(cxx).name:
        flags += GXX_ONLY_FLAGS
    cmd = [cxx, *CXXFLAGS, *flags, "-o", str(out), *map(str, sources)]
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

    def __init__(self, lib: ctypes.CDLL, block: int = plan.BLOCK) -> None:
        self.lib = lib
        self.block = block  # threads per block of every launch: the LSM_BLOCK it was built with
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

    def launch(self, name: str, grid: tuple[int, int], args: tuple[Any, ...], order: int = 0) -> None:
        """Launch kernel ``name`` with ``self.block`` threads per block, like
        ``RawModule.get_function(name)(grid, (plan.BLOCK,), args)``."""
        packed = [self._pack(v) for v in args]
        sizes = [ctypes.sizeof(p) for p in packed]
        if self.sizes.get(name) != sizes:
            raise TypeError(f"{name}: kernel parameter sizes {self.sizes.get(name)}, passed {sizes}")
        argv = (ctypes.c_void_p * len(packed))(
            *[ctypes.cast(ctypes.byref(p), ctypes.c_void_p) for p in packed]
        )
        err = ctypes.create_string_buffer(512)
        rc = self.lib.emu_launch(
            name.encode(), grid[0], grid[1], self.block, argv, len(packed), order, err, 512
        )
        if rc != 0:
            raise RuntimeError(f"emulated launch of {name} failed: {err.value.decode()}")


def emulator_source(tmp: Path) -> Path:
    """The translation unit of the emulator: lsoftmax.cu and a registry of every kernel
    instantiation the plan names."""
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
    return src


def build_emulator(tmp: Path, defines: dict[str, int] | None = None) -> Emulator:
    """The emulator built with the plan's DEFINES, or (tests of the definitions) others."""
    lib = _build(tmp / "libemu.so", [emulator_source(tmp)], defines)
    return Emulator(lib, (plan.DEFINES if defines is None else defines)["LSM_BLOCK"])


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


# |w_y| = 1.8e308 overflows float64 although every entry is finite (and |x| = 1e-10 in the
# other orientation); the target logit |x||w_y|psi (about 6.9e297) does not.  Or |w_y| is
# finite but its square is not.  Scaling x by
# s and w by 1/s (s a power of two) leaves every logit unchanged and scales grad_x by 1/s and
# grad_w by s, exactly: the reference runs on the scaled problem, where no norm overflows.
EXTREME_NORMS: dict[str, tuple[np.ndarray, np.ndarray, float]] = {
    "huge_w": (np.array([[1e-10, 0.0]]), np.array([[1.5e308, 1e308]]), 2.0**520),
    "huge_x": (np.array([[1.5e308, 1e308]]), np.array([[1e-10, 0.0]]), 2.0**-520),
    # Orthogonal rows with |w_y| = 2^1021: with |G| = 4, G*|w_y| = 2^1023 is finite but
    # G*2^ew (ew = 1022, the row's scale exponent) is not.
    "huge_w_orthogonal": (np.array([[0.0, 2.0**-20, 0.0]]), np.array([[2.0**1021, 0.0, 0.0]]), 2.0**520),
    "huge_x_orthogonal": (np.array([[2.0**1021, 0.0, 0.0]]), np.array([[0.0, 2.0**-20, 0.0]]), 2.0**-520),
}


def mixed_scale_class() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(x, w, label, s): class 0 holds a row of norm beyond the float64 range, rows 2^-525
    times smaller and a zero row, class 1 rows of ordinary relative scale; every logit and
    the scaled problem (x*s, w/s) are finite."""
    x = np.array(
        [[1.5e308, 1e308], [1e150, -2e150], [0.0, 0.0], [3e149, 1e149], [-2e150, 5e149], [1e150, 1e150]]
    )
    w = np.array([[1e-10, 0.0], [-1e-10, 3e-10]])
    return x, w, np.array([0, 0, 0, 0, 1, 1]), 2.0**-520


def check_extreme_norms(
    out: Any,
    grads: Any,
    g: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    label: np.ndarray,
    s: float,
    *,
    margin: int,
    beta: float,
) -> None:
    """out/grads of the extreme-norm problem (x, w) against the reference on (x*s, w/s);
    an exact value beyond the float64 range must be inf of its sign, everything else finite
    and within the float64 tolerances."""
    xs, ws = x * s, w / s
    with np.errstate(over="ignore"):
        assert np.isinf(np.sum(w * w) + np.sum(x * x))  # the problem's norms do overflow
    assert np.isfinite(np.sum(xs * xs) + np.sum(ws * ws))  # the scaled problem's do not
    check_forward(out, xs, ws, label, margin=margin, beta=beta, dtype="float64")
    want = ref_backward(g, xs, ws, label, margin=margin, beta=beta)
    scales = grad_scales(g, xs, ws, margin)
    for name, got, ref, back, scale in zip(("grad_x", "grad_w"), grads, want, (1 / s, s), scales):
        got = np.asarray(got.get() if hasattr(got, "get") else got)  # cupy
        with np.errstate(over="ignore"):
            exact = ref / back  # inf where the exact gradient overflows
        fin = np.isfinite(exact)
        np.testing.assert_array_equal(got[~fin], exact[~fin])
        scale = np.broadcast_to(scale, got.shape)
        assert_close(got[fin] * back, ref[fin], scale[fin], TOLERANCES["float64"].grad, name)


def gemm(a: np.ndarray, b: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """cuBLAS stand-in: float64 products rounded once to the dtype (fp32 accumulation or better)."""
    return np.ascontiguousarray((a.astype(np.float64) @ b.astype(np.float64)).astype(dtype))


class EmuBackend:
    """forward/backward as _cupy_backend runs them, on the emulator (the small-problem path
    where ``_cupy_plan.small`` says so, as there).  Keeps its workspace
    and error record across calls like the backend's per-device and per-stream state; a
    new workspace starts as garbage (not zeros), like CuPy's ``empty``."""

    def __init__(self, emu: Emulator, order: int = 0) -> None:
        self.emu = emu
        self.order = order
        # The record the kernels write (pinned, mapped host memory on the GPU).
        self.err_rec = np.zeros(plan.RECORD_WORDS, dtype=np.int64)
        self.bufs = plan.DeviceBuffers.create(np, self.err_rec.ctypes.data)
        self.err_key: np.ndarray = self.bufs.err_key
        self.coef = np.zeros(0, dtype=np.float64)
        self.classes = np.zeros(0, dtype=np.uint32)
        self.serial = 0
        self.launched: list[str] = []  # kernel names, in launch order

    def _launch(self, name: str, grid: tuple[int, int], args: tuple[Any, ...]) -> None:
        self.launched.append(name)
        self.emu.launch(name, grid, args, self.order)

    @staticmethod
    def _zero(buf: np.ndarray, count: int) -> None:
        buf[:count] = 0

    def _workspace(self, ncoef: int, nclasses: int) -> tuple[np.ndarray, np.ndarray]:
        if self.coef.size < ncoef:
            self.coef = np.full(ncoef, np.nan)  # never read before written
        if self.classes.size < nclasses:
            self.classes = np.full(nclasses, 0xDEADBEEF, dtype=np.uint32)  # cleared by a Zero step
        return self.coef, self.classes

    def _next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def forward(
        self, x: np.ndarray, w: np.ndarray, label: np.ndarray, *, margin: Any, beta: Any
    ) -> np.ndarray:
        p = check_arrays(x, w, label, margin, beta, dtypes=DTYPES)
        x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)
        if plan.small(p):  # every entry written by the kernel: start from NaN, not zeros
            logits = np.full((p.n, p.c), np.nan, dtype=p.dtype)
            call = plan.bind_small_forward(
                p, np, self.bufs, x=x, w=w, label=label, logits=logits, serial=self._next_serial()
            )
            call.run(self._launch, self._zero)
            return logits
        logits = gemm(x, w.T, p.dtype)
        call = plan.bind_forward(
            p, np, self.bufs, x=x, w=w, label=label, logits=logits, serial=self._next_serial()
        )
        call.run(self._launch, self._zero)
        return logits

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
        g, x, w = (np.ascontiguousarray(a) for a in (grad_logits, x, w))
        if plan.small(p):
            grad_x, grad_w = (np.full(shape, np.nan, dtype=p.dtype) for shape in ((p.n, p.d), (p.c, p.d)))
            call = plan.bind_small_backward(
                p, np, self.bufs, grad_logits=g, x=x, w=w, label=label, grad_x=grad_x, grad_w=grad_w,
                serial=self._next_serial(),
            )  # fmt: skip
            call.run(self._launch, self._zero)
            return grad_x, grad_w
        grad_x, grad_w = gemm(g, w, p.dtype), gemm(g.T, x, p.dtype)
        call = plan.bind_backward(
            p, np, self.bufs, grad_logits=g, x=x, w=w, label=label, grad_x=grad_x, grad_w=grad_w,
            serial=self._next_serial(), workspace=self._workspace,
        )  # fmt: skip
        call.run(self._launch, self._zero)
        return grad_x, grad_w

    # ------------------------------------------------------------ the fused cross-entropy

    @staticmethod
    def _gemm_into(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
        out[...] = a.astype(np.float64) @ b.astype(np.float64)  # rounded once to out's dtype
        return out

    def _run(self, call: plan.Call) -> None:
        call.run(self._launch, self._zero)

    def loss_engine(self) -> LossEngine:
        """_cupy_loss's ops under the loss engine, with NumPy, the cuBLAS stand-in and the
        emulated kernels."""
        return engine_over(np, self._gemm_into, self._run, self.bufs, self._next_serial, self._workspace, DTYPES)

    def _loss(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The engine's ``method`` with the public functions' keywords (options as LossOptions)."""
        names = LossOptions.__dataclass_fields__
        opts = LossOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        return getattr(self.loss_engine(), method)(*args, opts, **kwargs)

    def cross_entropy(self, x: np.ndarray, w: np.ndarray, label: np.ndarray, **kwargs: Any) -> Any:
        return self._loss("cross_entropy", x, w, label, **kwargs)

    def cross_entropy_backward(
        self, grad_loss: Any, x: np.ndarray, w: np.ndarray, label: np.ndarray, **kwargs: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._loss("cross_entropy_backward", grad_loss, x, w, label, **kwargs)  # type: ignore[no-any-return]

    def cross_entropy_with_grad(
        self, x: np.ndarray, w: np.ndarray, label: np.ndarray, **kwargs: Any
    ) -> tuple[Any, np.ndarray, np.ndarray]:
        return self._loss("cross_entropy_with_grad", x, w, label, **kwargs)  # type: ignore[no-any-return]

    def cross_entropy_shard_stats(self, x: np.ndarray, w: np.ndarray, label: np.ndarray, **kwargs: Any) -> Any:
        return self._loss("cross_entropy_shard_stats", x, w, label, **kwargs)
