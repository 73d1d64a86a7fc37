"""A C kernel for the matvec of few rows on CPU over q8_0 / q4_0 / mxfp4 blocks or float32 weights (cpu_matvec.c),
built on first use, and the torch op `torch.ops.moekit.qmatvec` that calls it (so it runs inside a
compiled graph as one opaque call). Its callers: `QuantizedWeight.linear` / `.gathered_matvec`
(quantize/modules.py) and `moe.weights.gathered_matvec` for float32 experts. `torch.ops.moekit.f32matvec_cat`
multiplies one x by several float32 weights in one call (`moe.weights.project_all`: attention's q, k and v
in the engine's decode step), each output as `qmatvec` computes it.

Why: the matvec torch.compile generates from `Format.fused_matvec` decodes every code again for every
row of x and spends ~15 vector instructions per 32 q4_0 weights; the C kernel decodes a block once for
up to 8 rows that share a weight (a 16-entry permute for 4-bit codes), groups expert pairs by expert,
and keeps x in float32 (benchmarks/results/llama_cpp_decode_cpu.md). llama.cpp goes
further and quantizes x to int8; moekit does not, so the kernel equals x @ dequantize(W)ᵀ up to the
(fixed, per-row) order of the additions. A row of x that is all zeros reads no weight and gets zeros (the
engine's decode step zeroes the rows that only pad its bucket).

Build: the C sources with the system C compiler (`$CC`, else cc / gcc), -O3 -march=native -fopenmp, linked
by the C++ compiler (`$CXX`, else c++ / g++: the one torch.compile needs on CPU) together with cpu_ops.cpp,
which registers the ops' CPU kernels with torch's dispatcher in C++ (a call costs a third of one into the
Python kernels below, ctypes over the same C functions: they stay the fallback, registered under
CompositeExplicitAutograd, which a CPU kernel overrides). Where the C++ part cannot be built (no C++
compiler, no torch headers), the C sources alone are built and the Python kernels run. The library lands in
$MOEKIT_CACHE (default ~/.cache/moekit)/kernels, keyed by the sources, the compiler, torch's version and
the CPU's flags, so machines that share a home directory never load each other's build. It binds to the
OpenMP runtime torch already loaded (one thread pool). Where building fails (no compiler, not Linux/x86)
or MOEKIT_CPU_KERNEL=0, `available()` is False and callers keep the torch path. The AVX-512 path and the
portable C path of the same file are both checked against `Format.dequantize` in tests/test_cpu_matvec.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

# what the kernel reads (value: its `fmt` code); f32: float32 weights
METHODS = {"q8_0": 0, "q4_0": 1, "f32": 2, "mxfp4": 3}
BLOCK_BYTES = {"q8_0": 32, "q4_0": 16, "f32": 128, "mxfp4": 16}  # bytes of a block of 32 weights
# what the kernel reads per block: float32 scales (the mirrors of q8_0/q4_0's fp16 ones), mxfp4's own E8M0 bytes
SCALE_DTYPES = {"q8_0": torch.float32, "q4_0": torch.float32, "mxfp4": torch.uint8}
SCALE_NAMES = {torch.float32: "float32", torch.uint8: "uint8 E8M0"}
# 8-bit activations (QuantizedWeight's activations="q8_0"; moekit/quantize/activations.py): the weight
# repacked into panels of PANEL output rows (`x8_pack`), PANEL_BYTES per block of a panel
PANEL, PANEL_BYTES = 16, {"q8_0": 512, "q4_0": 256}
MAX_ROWS_SHARED = 8  # rows of x decoded together against one weight (MAX_TILE in the C source)
# the library's C sources: the matvec (this module) and the paged decode attention (attention/paged_cpu.py),
# and the C++ file that registers them as torch ops
SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_matvec.c", "cpu_attention.c"))
OPS_SOURCE = Path(__file__).with_name("cpu_ops.cpp")

_state = {"lib": None, "tried": False, "error": None, "ops": False, "ops_error": None}
_ready = False  # the kernel is loaded: a plain bool, read (as a constant) by code torch.compile traces


def _cpu_flags() -> str:
    """The CPU's feature flags (part of the build's cache key); the processor name where /proc is absent."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line for line in lines if line.startswith("flags")), platform.processor())


def _compiler(cxx: bool = False) -> Optional[str]:
    names = (os.environ.get("CXX"), "c++", "g++", "clang++") if cxx else (os.environ.get("CC"), "cc", "gcc", "clang")
    for name in names:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _ops_flags() -> list:
    """How cpu_ops.cpp compiles and links against the running torch (its headers, ABI and libraries)."""
    from torch.utils.cpp_extension import include_paths

    torch_lib = str(Path(torch.__file__).parent / "lib")
    return ["-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-I{path}" for path in include_paths()), str(OPS_SOURCE),
            f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]


def build(extra_flags=(), cache_dir: Optional[Path] = None, ops: bool = False) -> Path:
    """Compile the C sources (ops=True: with cpu_ops.cpp, registering the torch ops when loaded) into one shared
    library (or return the cached one); raises RuntimeError on failure."""
    cc, cxx = _compiler(), _compiler(cxx=True) if ops else None
    if cc is None or (ops and cxx is None):
        raise RuntimeError(f"no {'C' if cc is None else 'C++'} compiler found (set {'CC' if cc is None else 'CXX'})")
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", *extra_flags]
    tail = _ops_flags() if ops else []
    versions = [subprocess.run([c, "--version"], capture_output=True, text=True).stdout for c in (cc, cxx) if c]
    texts = [source.read_text() for source in (*SOURCES, *([OPS_SOURCE] if ops else []))]
    key = hashlib.sha256("\n".join([*texts, cc, str(cxx), *versions, " ".join(flags + tail), torch.__version__,
                                     _cpu_flags()]).encode())
    root = cache_dir or Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit")) / "kernels"
    target = root / f"{'ops' if ops else 'qmatvec'}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        out = Path(tmp) / target.name
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in SOURCES]
        steps = [[cc, *flags, "-c", str(source), "-o", obj] for source, obj in zip(SOURCES, objects)]
        steps.append([cxx or cc, *flags, "-shared", *objects, *tail, "-o", str(out)])  # (the C++ file, linked)
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "error" in line] or [done.stderr.strip()]
                raise RuntimeError(f"{Path(step[0]).name} failed: {errors[0][:300]}")
        os.replace(out, target)  # atomic: concurrent builders each publish a complete file
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.moekit_qmatvec
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr]
    fn.restype = ctypes.c_int
    lib.moekit_f32matvec_cat.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr]
    lib.moekit_f32matvec_cat.restype = ctypes.c_int
    lib.moekit_x8_matvec.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr]
    lib.moekit_x8_matvec.restype = ctypes.c_int
    lib.moekit_x8_pack.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, ptr, ptr]
    lib.moekit_x8_pack.restype = None
    lib.moekit_paged_decode_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64,
                                                  ctypes.c_float, ptr]
    lib.moekit_paged_decode_attention.restype = ctypes.c_int
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, built on first call; None where it cannot be built (see `error()`)."""
    if not _state["tried"]:
        _state["tried"] = True
        if os.environ.get("MOEKIT_CPU_KERNEL", "1") == "0":
            _state["error"] = "disabled by MOEKIT_CPU_KERNEL=0"
        elif platform.system() != "Linux":
            _state["error"] = f"built on Linux only (this is {platform.system()})"
        else:
            try:
                try:  # with the ops' C++ kernels (loading registers them), else the C sources alone
                    _state["lib"], _state["ops"] = load(build(ops=True)), True
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _state["lib"], _state["ops_error"] = load(build()), str(exc)
                global _ready
                _ready = True
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["error"] = str(exc)
                warnings.warn(f"moekit: the quantized CPU kernel is unavailable ({exc}); using the torch path")
    return _state["lib"]


def available_now() -> bool:
    """Whether the library is loaded, without building it (compiled code may call this; `prepare` builds)."""
    return _ready


def error() -> Optional[str]:
    return _state["error"]


def ops_in_cpp() -> bool:
    """Whether the ops' CPU kernels are cpu_ops.cpp's (else the Python ones below, over ctypes)."""
    library()
    return _state["ops"]


def ops_error() -> Optional[str]:
    """Why cpu_ops.cpp was not built (the Python kernels run), or None."""
    library()
    return _state["ops_error"]


def available() -> bool:
    return library() is not None


def call(lib: ctypes.CDLL, method: str, x_RK: torch.Tensor, qweight: torch.Tensor, scale: Optional[torch.Tensor],
         index_R: Optional[torch.Tensor]) -> torch.Tensor:
    """y (R, N): the C kernel on contiguous CPU tensors (x float32 (R, K); qweight (E, N, bytes) or (N, bytes),
    or for f32 the float32 weight (E, N, K) / (N, K) with K a multiple of 32 and scale None; scale
    (..., N, B) of `SCALE_DTYPES[method]`; index_R int64 (R,) into E, or None: every row against the one weight)."""
    R, K = x_RK.shape
    N, B = qweight.shape[-2], K // 32
    E = qweight.shape[0] if qweight.dim() == 3 else 1
    # the C code trusts its sizes: a mismatch would read out of bounds, so it is refused here
    if x_RK.dtype != torch.float32 or K % 32 or qweight.shape[-1] * qweight.element_size() != B * BLOCK_BYTES[method]:
        raise ValueError(f"qmatvec({method}): x {tuple(x_RK.shape)} {x_RK.dtype} does not fit weight "
                         f"{tuple(qweight.shape)} {qweight.dtype} (float32 x, K a multiple of 32)")
    scale_type = SCALE_DTYPES.get(method)
    if scale_type is not None and (scale is None or scale.dtype != scale_type
                                   or tuple(scale.shape[-2:]) != (N, B)):
        raise ValueError(f"qmatvec({method}): needs {SCALE_NAMES[scale_type]} scales (..., {N}, {B})")
    if (index_R is None) != (qweight.dim() == 2) or (index_R is not None and index_R.shape != (R,)):
        raise ValueError(f"qmatvec({method}): an index (R,) goes with a stack of weights (E, N, ...), none with one")
    x_RK, qweight = x_RK.contiguous(), qweight.contiguous()
    scale = qweight if scale is None else scale.contiguous()  # (f32: unread)
    y_RN = torch.empty(R, N, dtype=torch.float32)
    index_R = None if index_R is None else index_R.to(torch.int64).contiguous()
    status = lib.moekit_qmatvec(METHODS[method], x_RK.data_ptr(), R, qweight.data_ptr(), scale.data_ptr(), E, N,
                                B, None if index_R is None else index_R.data_ptr(), y_RN.data_ptr())
    check(status, f"qmatvec({method})", E)
    return y_RN


def call_cat(lib: ctypes.CDLL, x_RK: torch.Tensor, weights) -> torch.Tensor:
    """y (R (N_0 + ... + N_{W-1}),): the products of x (R, K) float32 (K a multiple of 32) with each float32
    weight (N_i, K), flattened one after another (row-major each), in one C call (per weight the bits of
    `call`)."""
    R, K = x_RK.shape
    fits = x_RK.dtype == torch.float32 and K % 32 == 0 and len(weights) > 0
    if not fits or any(w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] != K for w in weights):
        raise ValueError(f"f32matvec_cat: x {tuple(x_RK.shape)} {x_RK.dtype} does not fit weights "
                         f"{[tuple(w.shape) for w in weights]} (float32, K a multiple of 32)")
    x_RK, weights = x_RK.contiguous(), [w.contiguous() for w in weights]
    W, N = len(weights), [w.shape[0] for w in weights]
    y_RN = torch.empty(R * sum(N), dtype=torch.float32)
    status = lib.moekit_f32matvec_cat(x_RK.data_ptr(), R, (ctypes.c_void_p * W)(*[w.data_ptr() for w in weights]),
                                      (ctypes.c_int64 * W)(*N), W, K, y_RN.data_ptr())
    check(status, "f32matvec_cat", 1)
    return y_RN


def check(status: int, what: str, E: int) -> None:
    """The C entry points' status: 0 fine, -1 out of memory, -2 an index outside the stack (checked in C,
    before any read: no tensor op per call)."""
    if status == -2:
        raise IndexError(f"{what}: an expert index is outside [0, {E})")
    if status != 0:
        raise MemoryError(f"{what}: out of memory")


def x8_pack(lib: ctypes.CDLL, method: str, qweight: torch.Tensor, scale_f32: torch.Tensor):
    """(panels uint8 (..., G, B, PANEL_BYTES), pscale float32 (..., G, B, PANEL)) of a q8_0/q4_0 weight
    (qweight (..., N, bytes), scale_f32 (..., N, B)): the layout of cpu_matvec.c's 8-bit-activation kernel."""
    lead, (N, B) = qweight.shape[:-2], scale_f32.shape[-2:]
    G = -(-N // PANEL)
    panels = torch.zeros(*lead, G, B, PANEL_BYTES[method], dtype=torch.uint8)
    pscale = torch.empty(*lead, G, B, PANEL, dtype=torch.float32)
    qweight, scale_f32 = qweight.contiguous(), scale_f32.contiguous()
    lib.moekit_x8_pack(METHODS[method], qweight.data_ptr(), scale_f32.data_ptr(), lead.numel(), N, B,
                       panels.data_ptr(), pscale.data_ptr())
    return panels, pscale


def x8_call(lib: ctypes.CDLL, method: str, x_RK: torch.Tensor, panels: torch.Tensor, pscale: torch.Tensor, N: int,
            index_R: Optional[torch.Tensor]) -> torch.Tensor:
    """y (R, N): x (R, K) float32 with 8-bit activations against the panels of `x8_pack` (one weight, or
    weight index_R[r] of a stack)."""
    R, K = x_RK.shape
    B, G = K // 32, -(-N // PANEL)
    E = panels.shape[:-3].numel()
    if (method not in PANEL_BYTES or x_RK.dtype != torch.float32 or K % 32
            or tuple(panels.shape[-3:]) != (G, B, PANEL_BYTES[method]) or tuple(pscale.shape[-3:]) != (G, B, PANEL)
            or pscale.shape[:-3] != panels.shape[:-3]):
        raise ValueError(f"x8matvec({method}): x {tuple(x_RK.shape)} {x_RK.dtype} does not fit panels "
                         f"{tuple(panels.shape)} for N={N} (float32 x, K a multiple of 32)")
    if (index_R is None) != (panels.dim() == 3) or (index_R is not None and index_R.shape != (R,)):
        raise ValueError(f"x8matvec({method}): an index (R,) goes with a stack of weights, none with one")
    x_RK = x_RK.contiguous()
    y_RN = torch.empty(R, N, dtype=torch.float32)
    index_R = None if index_R is None else index_R.to(torch.int64).contiguous()
    status = lib.moekit_x8_matvec(METHODS[method], x_RK.data_ptr(), R, panels.data_ptr(), pscale.data_ptr(), E, N, B,
                                  None if index_R is None else index_R.data_ptr(), y_RN.data_ptr())
    check(status, f"x8matvec({method})", E)
    return y_RN


_lib = torch.library.Library("moekit", "DEF")
_lib.define("qmatvec(str method, Tensor x, Tensor qweight, Tensor? scale, Tensor? index) -> Tensor")


def _qmatvec_cpu(method, x, qweight, scale, index):
    return call(library(), method, x, qweight, scale, index)


def _qmatvec_meta(method, x, qweight, scale, index):
    return x.new_empty(x.shape[0], qweight.shape[-2])


_lib.impl("qmatvec", _qmatvec_cpu, "CompositeExplicitAutograd")  # cpu_ops.cpp's CPU kernel overrides it
_lib.impl("qmatvec", _qmatvec_meta, "Meta")
_lib.define("f32matvec_cat(Tensor x, Tensor[] weights) -> Tensor")


def _f32matvec_cat_cpu(x, weights):
    return call_cat(library(), x, weights)


def _f32matvec_cat_meta(x, weights):
    return x.new_empty(x.shape[0] * sum(w.shape[0] for w in weights))


_lib.impl("f32matvec_cat", _f32matvec_cat_cpu, "CompositeExplicitAutograd")
_lib.impl("f32matvec_cat", _f32matvec_cat_meta, "Meta")
_lib.define("x8matvec(str method, Tensor x, Tensor panels, Tensor pscale, int N, Tensor? index) -> Tensor")


def _x8matvec_cpu(method, x, panels, pscale, N, index):
    return x8_call(library(), method, x, panels, pscale, N, index)


def _x8matvec_meta(method, x, panels, pscale, N, index):
    return x.new_empty(x.shape[0], N)


_lib.impl("x8matvec", _x8matvec_cpu, "CompositeExplicitAutograd")
_lib.impl("x8matvec", _x8matvec_meta, "Meta")
# the paged attention's op (its kernels: attention/paged_cpu.py, cpu_ops.cpp), defined here with the others
_lib.define("paged_decode_attention(Tensor q, Tensor pool_k, Tensor pool_v, Tensor table, Tensor valid, "
            "Tensor? sinks, float scale) -> Tensor")


def prepare(method: str, device: torch.device) -> None:
    """Build and load the kernel now if a `method` weight on `device` could use it (outside any compiled
    region: QuantizedWeight calls it when it is made or moved, runtime.compile_fn before compiling)."""
    if method in METHODS and torch.device(device).type == "cpu":
        library()


def usable(method: str, x: torch.Tensor) -> bool:
    """Whether `qmatvec` takes this call: a q8_0/q4_0/mxfp4 weight (or f32 with x's last dim a multiple of 32),
    float32 x on the CPU, the kernel loaded (by `prepare`; never built here, so compiled code can call this)."""
    return (_ready and method in METHODS and x.device.type == "cpu" and x.dtype == torch.float32
            and not x.requires_grad and (method != "f32" or x.shape[-1] % 32 == 0))


def x8matvec(method: str, x_RK: torch.Tensor, panels: torch.Tensor, pscale: torch.Tensor, N: int,
             index_R: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y (R, N) with 8-bit activations (see cpu_matvec.c) over the panels of `x8_pack`; check `usable` first."""
    return torch.ops.moekit.x8matvec(method, x_RK, panels, pscale, N, index_R)


def f32matvec_cat(x_RK: torch.Tensor, weights) -> list:
    """[x @ w.T for w in weights] (R, N_i) from one call (contiguous views of its one output), each as
    `qmatvec("f32", ...)` computes it; check `usable("f32", x)` first."""
    R, sizes = x_RK.shape[0], [w.shape[0] for w in weights]
    flat = torch.ops.moekit.f32matvec_cat(x_RK, weights)
    return [y.view(R, N) for y, N in zip(flat.split([R * N for N in sizes]), sizes)]


def qmatvec(method: str, x_RK: torch.Tensor, qweight: torch.Tensor, scale: Optional[torch.Tensor],
            index_R: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y (R, N) = each row of x against its weight (see cpu_matvec.c); check `usable` first."""
    return torch.ops.moekit.qmatvec(method, x_RK, qweight, scale, index_R)
