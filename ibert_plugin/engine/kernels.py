"""Loaders of the engine's C++ extensions: the fused integer kernels (``kernels.cpp``) and the fbgemm GEMMs
(``fbgemm_gemm.cpp``).

Built on first use by :func:`ibert_plugin._cext.load` (kernels: ``-O3 -march=native -fopenmp``; fbgemm GEMMs:
``-O2 -fopenmp``, fbgemm dispatches on the CPU itself; build directory and caching: :mod:`ibert_plugin._cext`).
"""
from __future__ import annotations

import threading
from pathlib import Path

from .. import _cext

_LOCK = threading.Lock()
_MOD = None
_FBGEMM = None
_FBGEMM_ERR = None

_SRC = Path(__file__).with_name("kernels.cpp")


def load(verbose: bool = False):
    """Return the compiled kernel module (compiling it on first use)."""
    global _MOD
    if _MOD is not None:
        return _MOD
    with _LOCK:
        if _MOD is None:
            _MOD = _cext.load("ibert_engine_kernels", _SRC, ["-O3", "-march=native", "-mprefer-vector-width=512",
                                                             "-fopenmp", "-ffp-contract=off"], verbose=verbose)
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
                mod = _cext.load("ibert_engine_fbgemm", _SRC.with_name("fbgemm_gemm.cpp"), ["-O2", "-fopenmp"],
                                 verbose=verbose)
                if not mod.cpu_supported():
                    raise RuntimeError("fbgemm does not support this CPU")
                _FBGEMM = mod
            except Exception as e:  # noqa: BLE001  (any build or load failure means: use the ORT routes)
                _FBGEMM_ERR = _cext.failure(e)
    return _FBGEMM


def fbgemm_error():
    """Why :func:`load_fbgemm` returned ``None`` (``None`` when it loaded or was not tried)."""
    return _FBGEMM_ERR
