"""Loaders of the engine's C++ extensions: the fused integer kernels (``kernels.cpp``) and the fbgemm GEMMs
(``fbgemm_gemm.cpp``).

Built on first use with ``torch.utils.cpp_extension.load`` (kernels: ``-O3 -march=native -fopenmp``; fbgemm GEMMs:
``-O2 -fopenmp``, fbgemm dispatches on the CPU itself) into
``<repo>/build/<name>_<cpu tag>`` in a source checkout, ``~/.cache/ibert_plugin/<name>_<cpu tag>`` for an installed
package (or ``$IBERT_ENGINE_BUILD_DIR/<name>``); later imports reuse the cached build
(ninja rebuilds only when the source or flags change). ``-march=native`` makes the build CPU-specific, so the build
directory name carries a hash of the CPU flags.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_LOCK = threading.Lock()
_MOD = None
_FBGEMM = None
_FBGEMM_ERR = None

_SRC = Path(__file__).with_name("kernels.cpp")
_REPO = Path(__file__).resolve().parents[2]


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return hashlib.sha1(line.encode()).hexdigest()[:8]
    except OSError:
        pass
    return "generic"


def build_dir(name: str = "ibert_engine_kernels") -> Path:
    env = os.environ.get("IBERT_ENGINE_BUILD_DIR")
    if env:
        d = Path(env) / name
    elif (_REPO / "setup.py").is_file() and os.access(_REPO, os.W_OK):  # a source checkout, not site-packages
        d = _REPO / "build" / f"{name}_{_cpu_tag()}"
    else:
        d = Path.home() / ".cache" / "ibert_plugin" / f"{name}_{_cpu_tag()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load(verbose: bool = False):
    """Return the compiled kernel module (compiling it on first use)."""
    global _MOD
    if _MOD is not None:
        return _MOD
    with _LOCK:
        if _MOD is None:
            import torch  # noqa: F401  (loads torch's libgomp first, so the extension shares its OpenMP pool)
            from torch.utils.cpp_extension import load as _load

            _MOD = _load(
                name="ibert_engine_kernels",
                sources=[str(_SRC)],
                extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir()),
                verbose=verbose,
            )
    return _MOD


def load_fbgemm(verbose: bool = False):
    """Return the fbgemm GEMM extension, or ``None`` when it cannot be built here (see :func:`fbgemm_error`).

    fbgemm's headers ship in torch's include folder and its symbols are exported by ``libtorch_cpu``; its C++ API is
    not a stable ABI, so the extension is tied to the installed torch (2.13.0) and the engine falls back to ORT
    when the build or the CPU check fails.
    """
    global _FBGEMM, _FBGEMM_ERR
    if _FBGEMM is not None or _FBGEMM_ERR is not None:
        return _FBGEMM
    with _LOCK:
        if _FBGEMM is None and _FBGEMM_ERR is None:
            try:
                import torch  # noqa: F401
                from torch.utils.cpp_extension import load as _load

                mod = _load(
                    name="ibert_engine_fbgemm",
                    sources=[str(_SRC.with_name("fbgemm_gemm.cpp"))],
                    extra_cflags=["-O2", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(build_dir("ibert_engine_fbgemm")),
                    verbose=verbose,
                )
                if not mod.cpu_supported():
                    raise RuntimeError("fbgemm does not support this CPU")
                _FBGEMM = mod
            except Exception as e:  # noqa: BLE001  (any build or load failure means: use the ORT routes)
                _FBGEMM_ERR = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return _FBGEMM


def fbgemm_error():
    """Why :func:`load_fbgemm` returned ``None`` (``None`` when it loaded or was not tried)."""
    return _FBGEMM_ERR
