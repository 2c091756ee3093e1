"""The memory allocator of the training processes the recipes launch (``fairseq-train`` children).

PyTorch takes CPU tensors from the C library's ``malloc``. glibc serves large blocks (above its mmap threshold: 128 KiB
at first, at most 32 MiB) with a fresh ``mmap`` and unmaps them on ``free``, so every activation-sized temporary of
a training step is page-faulted in again, step after step: on 2 cores a third of a MiniLM step at SQuAD's 16 x 256
windows went to this. jemalloc told never to give freed pages back (``MALLOC_CONF=dirty_decay_ms:-1,
muzzy_decay_ms:-1``, as the PyTorch CPU performance guides recommend) reuses them instead. Only the allocator changes:
the losses, gradients and checkpoints are the same bits (checked on FP, I-BERT and TernaryBERT steps), and the
process keeps its peak memory until it exits.

``IBERT_CPU_ALLOCATOR`` chooses: ``auto`` (default: jemalloc when the dynamic loader knows ``libjemalloc``, e.g.
Debian's ``libjemalloc2``; the system's otherwise), ``jemalloc`` (required: an error when it is missing) or
``system`` (never preload). A ``LD_PRELOAD`` that already names jemalloc, and a ``MALLOC_CONF`` the user set, are
kept as they are.
"""
from __future__ import annotations

import ctypes.util
import os
from typing import Callable, Dict, Mapping, Optional

from ..quant.config import ConfigError

ENV_VAR = "IBERT_CPU_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "system")
#: jemalloc keeps freed pages for reuse instead of returning them to the kernel.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def find_jemalloc() -> Optional[str]:
    """The shared library name the dynamic loader resolves (``libjemalloc.so.2``), or None."""
    return ctypes.util.find_library("jemalloc")


def allocator_env(environ: Optional[Mapping[str, str]] = None,
                  find: Callable[[], Optional[str]] = find_jemalloc) -> Dict[str, str]:
    """Variables to add to a training child's environment (empty: the system allocator).

    Args:
        environ: the parent environment (default ``os.environ``): ``IBERT_CPU_ALLOCATOR``, ``LD_PRELOAD``,
            ``MALLOC_CONF``.
        find: locates jemalloc (tests pass their own).

    Raises:
        ConfigError: ``IBERT_CPU_ALLOCATOR`` is not one of :data:`CHOICES`, or is ``jemalloc`` and the library is
            missing.
    """
    environ = os.environ if environ is None else environ
    mode = environ.get(ENV_VAR, "auto") or "auto"
    if mode not in CHOICES:
        raise ConfigError(f"{ENV_VAR}={mode!r}: choose one of {', '.join(CHOICES)}")
    preload = environ.get("LD_PRELOAD", "")
    if mode == "system" or "jemalloc" in preload:
        return {}
    lib = find()
    if lib is None:
        if mode == "jemalloc":
            raise ConfigError(f"{ENV_VAR}=jemalloc but the dynamic loader finds no libjemalloc "
                              "(Debian/Ubuntu: apt-get install libjemalloc2)")
        return {}
    return {"LD_PRELOAD": ":".join(p for p in (lib, preload) if p),
            "MALLOC_CONF": environ.get("MALLOC_CONF") or JEMALLOC_CONF}


def describe(env: Mapping[str, str]) -> str:
    """One line for a run log: which allocator :func:`allocator_env`'s result selects."""
    if "LD_PRELOAD" not in env:
        return "system malloc"
    return f"jemalloc (LD_PRELOAD={env['LD_PRELOAD']} MALLOC_CONF={env['MALLOC_CONF']})"
