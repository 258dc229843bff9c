"""Standard normal z on CPU from a counter-based generator: Philox4x32-10, then Box–Muller (`philox.c`).

Entry e of stream `key` is a function of (key, e) alone, so any range of it can be drawn on its own, in any
order, on any thread: no generator state, no reseeding per chunk. On CPU this is 3× faster than torch's
Mersenne Twister (`normal_`), which was most of a ZO step's cost beyond its two forwards. The Philox words
are the same on every machine; the floats come from the vector log and cos of the machine's libm, so they are
bit-identical on one machine and should agree across CPUs to within a few ulps.

The kernel is compiled on first use with the system C compiler ($CC, else cc) into $DPFT_CACHE_DIR (default
~/.cache/dpft), one file per (source, CPU, compiler, flags), and loaded with ctypes (calls release the GIL, so
threads draw chunks in parallel). Without a compiler, a kernel built there before for this source and CPU is
used; without either, a CPU run falls back to torch's generator (`dpft.train`, recorded in results.json).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("philox.c")
# tried in order; the first that builds is used. -ffast-math only compiles (linking it would set
# flush-to-zero for the whole process); -fopenmp-simd lets the loop call libm's vector functions.
FLAG_SETS = (
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp-simd"],
    ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"],
    ["-O3", "-ffast-math", "-fopenmp-simd"],
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


class KernelUnavailable(RuntimeError):
    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message  # why it could not be built, without the advice


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "\n".join(sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    """$DPFT_CACHE_DIR, else $XDG_CACHE_HOME/dpft (~/.cache/dpft), else a folder of the temporary directory
    where the home is not writable."""
    if os.environ.get("DPFT_CACHE_DIR"):
        chosen = [Path(os.environ["DPFT_CACHE_DIR"])]
    else:
        chosen = [Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpft",
                  Path(tempfile.gettempdir()) / f"dpft-{os.getuid() if hasattr(os, 'getuid') else 'user'}"]
    for folder in chosen:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            pass
    raise KernelUnavailable(f"no writable folder for the compiled kernel among {[str(f) for f in chosen]}")


def _build() -> ctypes.CDLL:
    """The kernel for this source and CPU: compiled into the cache, or, without a compiler, one compiled there
    before (a node whose compiler is gone, or a cache copied beside the code)."""
    source = SOURCE.read_bytes()
    cache = _cache_dir()
    stem = "philox-" + hashlib.sha256(b"\0".join([source, platform.machine().encode(),
                                                   _cpu_signature().encode()])).hexdigest()[:16]
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        built = sorted(cache.glob(f"{stem}-*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
        if built:
            return _load(built[0])
        raise KernelUnavailable(f"no C compiler: {compiler!r} is not on PATH, and no kernel built for this CPU "
                                f"in {cache}")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    errors = []
    for flags in FLAG_SETS:
        digest = hashlib.sha256(b"\0".join([version.encode(), " ".join(flags).encode()])).hexdigest()[:8]
        target = cache / f"{stem}-{digest}.so"
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                obj, lib = Path(tmp) / "philox.o", Path(tmp) / "philox.so"
                compiled = subprocess.run([compiler, *flags, "-fPIC", "-c", str(SOURCE), "-o", str(obj)],
                                          capture_output=True, text=True)
                if compiled.returncode == 0:
                    compiled = subprocess.run([compiler, "-shared", str(obj), "-o", str(lib), "-lm"],
                                              capture_output=True, text=True)
                if compiled.returncode != 0:
                    errors.append(f"{' '.join(flags)}: {compiled.stderr.strip()[-300:]}")
                    continue
                os.replace(lib, target)  # atomic: concurrent runs of a sweep may build at once
        return _load(target)
    raise KernelUnavailable("compiling philox.c failed:\n" + "\n".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.dpft_normal.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64,
                                    ctypes.c_float, ctypes.c_int]
    library.dpft_normal.restype = None
    library.dpft_philox4x32_10.argtypes = [ctypes.POINTER(ctypes.c_uint32)] * 3
    library.dpft_philox4x32_10.restype = None
    return library


def kernel() -> ctypes.CDLL:
    """The compiled kernel, built on first use; a clear error where it cannot be built."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except (KernelUnavailable, OSError) as err:
                _error = str(err)
        if _lib is None:
            raise KernelUnavailable(
                f"dpft's Philox z kernel could not be built ({_error}). Install a C compiler (gcc or clang; $CC "
                f"names another) or set method.z_generator=torch (torch's own generator: slower on CPU, and its z "
                f"differ from Philox's, so runs are comparable only with the same setting)", reason=_error)
        return _lib


def available() -> bool:
    try:
        kernel()
        return True
    except KernelUnavailable:
        return False


def _check(out: torch.Tensor) -> None:
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"the Philox kernel writes contiguous float32 CPU tensors, got {out.dtype} on "
                         f"{out.device} (contiguous: {out.is_contiguous()})")


def normal_(out: torch.Tensor, key: int, offset: int = 0) -> torch.Tensor:
    """Fill `out` with entries [offset, offset + out.numel()) of stream `key` (a 64-bit integer)."""
    _check(out)
    kernel().dpft_normal(out.data_ptr(), out.numel(), key, offset, 0.0, 0)
    return out


def add_normal_(out: torch.Tensor, key: int, offset: int, alpha: float) -> torch.Tensor:
    """out += alpha · z[offset : offset + out.numel()] in one pass, z never stored."""
    _check(out)
    kernel().dpft_normal(out.data_ptr(), out.numel(), key, offset, alpha, 1)
    return out


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """One block of the bare generator (for known-answer tests against the published vectors)."""
    words = (ctypes.c_uint32 * 4)(*counter), (ctypes.c_uint32 * 2)(*key), (ctypes.c_uint32 * 4)()
    kernel().dpft_philox4x32_10(*words)
    return tuple(words[2])
