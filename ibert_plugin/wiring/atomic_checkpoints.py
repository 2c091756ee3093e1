"""Atomic checkpoint copies in fairseq-train (installed by :func:`ibert_plugin.wiring.register`).

fairseq 0.12 writes the first checkpoint of a save atomically (``torch_persistent_save``: ``<name>.tmp`` then
rename), but makes ``checkpoint_best.pt`` / ``checkpoint_last.pt`` (and the other names of the same save) with
``PathManager.copy``: a plain ``shutil.copyfile`` onto the final name, so a kill during the copy leaves a truncated
``checkpoint_last.pt`` that the next resume cannot load. :func:`install` gives ``fairseq.checkpoint_utils`` a
``PathManager`` whose ``copy`` of local files writes a temporary file in the destination folder and renames it over
the destination (``os.replace``, atomic on POSIX): at any instant every checkpoint name holds either the previous
complete file or the new complete one. Remote paths (iopath handlers) keep fairseq's behaviour.
"""
from __future__ import annotations

import os
import shutil

__all__ = ["install", "atomic_copy"]


def atomic_copy(src_path: str, dst_path: str) -> bool:
    """Copy ``src_path`` to ``dst_path`` through ``<dst>.tmp<pid>`` + ``os.replace`` (the temp file is removed when
    the copy fails)."""
    tmp = f"{dst_path}.tmp{os.getpid()}"
    try:
        shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def install() -> None:
    """Swap ``fairseq.checkpoint_utils.PathManager`` for a subclass whose local ``copy`` is :func:`atomic_copy`
    (idempotent; only the module that saves checkpoints sees it)."""
    from fairseq import checkpoint_utils

    base = checkpoint_utils.PathManager
    if getattr(base, "ibert_atomic_copy", False):
        return

    class AtomicCopyPathManager(base):
        ibert_atomic_copy = True

        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if base.path_requires_pathmanager(src_path) or base.path_requires_pathmanager(dst_path):
                return base.copy(src_path, dst_path, overwrite=overwrite)
            return atomic_copy(src_path, dst_path)

    checkpoint_utils.PathManager = AtomicCopyPathManager
