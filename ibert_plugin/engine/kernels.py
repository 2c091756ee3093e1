"""Loader of the fused C++ integer kernels (``kernels.cpp``).

Built on first use with ``torch.utils.cpp_extension.load`` (``-O3 -march=native -fopenmp``) into
``<repo>/build/ibert_engine_kernels`` (or ``$IBERT_ENGINE_BUILD_DIR``); later imports reuse the cached build
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


def build_dir() -> Path:
    env = os.environ.get("IBERT_ENGINE_BUILD_DIR")
    if env:
        d = Path(env)
    elif os.access(_REPO, os.W_OK):
        d = _REPO / "build" / f"ibert_engine_kernels_{_cpu_tag()}"
    else:
        d = Path.home() / ".cache" / "ibert_plugin" / f"ibert_engine_kernels_{_cpu_tag()}"
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
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir()),
                verbose=verbose,
            )
    return _MOD
