"""Build location and loader of the plugin's C++ extensions (``torch.utils.cpp_extension.load``, built on first
use, cached). The lowest layer: no fairseq, no other plugin module.

Builds go to ``<repo>/build/<name>_<cpu tag>`` in a writable source checkout, ``~/.cache/ibert_plugin/<name>_<cpu
tag>`` for an installed package, or ``$IBERT_ENGINE_BUILD_DIR/<name>``; ninja rebuilds only when the source or flags
change. ``-march=native`` makes a build CPU-specific, so the directory name carries a hash of the CPU flags.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

_REPO = Path(__file__).resolve().parents[1]


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return hashlib.sha1(line.encode()).hexdigest()[:8]
    except OSError:
        pass
    return "generic"


def build_dir(name: str) -> Path:
    """The (created) build directory of extension ``name``."""
    env = os.environ.get("IBERT_ENGINE_BUILD_DIR")
    if env:
        d = Path(env) / name
    elif (_REPO / "setup.py").is_file() and os.access(_REPO, os.W_OK):  # a source checkout, not site-packages
        d = _REPO / "build" / f"{name}_{_cpu_tag()}"
    else:
        d = Path.home() / ".cache" / "ibert_plugin" / f"{name}_{_cpu_tag()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load(name: str, source: Path, cflags: Sequence[str], ldflags: Sequence[str] = ("-fopenmp",),
         verbose: bool = False):
    """Compile (first time) and import the extension ``name`` from ``source``."""
    import torch  # noqa: F401  (loads torch's libgomp first, so the extension shares its OpenMP pool)
    from torch.utils.cpp_extension import load as _load

    return _load(name=name, sources=[str(source)], extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                 build_directory=str(build_dir(name)), verbose=verbose)


def failure(e: BaseException) -> str:
    """One line saying why an extension did not build or load: the exception type and the last line of its text
    (a compiler's log ends with the error that stopped it)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"
