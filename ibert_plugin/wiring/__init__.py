"""Fairseq wiring: the one room that talks to fairseq (registration, checkpoint loading, fairseq model building).

Layering (README "Layout"): ``quant/`` (numerics) and ``engine/`` (integer runtime) never import this package or
fairseq; ``models/``, ``criterions/`` and this package import ``quant/`` and fairseq; ``recipes/`` (the ``run.py``
driver) imports only the fairseq-free :mod:`.checkpoint_file` and :mod:`.lifetime`.

* :func:`register` makes the plugin visible to fairseq: it imports the modules whose import registers the
  ``ibert_roberta`` architectures, the ``ternary_distill`` criterion and the ``hf_wordpiece`` BPE, and allow-lists
  the few non-tensor types fairseq checkpoints pickle (:func:`.checkpoint_file.allow_fairseq_pickles`); in a fairseq
  command-line process it also prints an uncaught :class:`~ibert_plugin.quant.config.ConfigError` (a bad plugin
  flag, found when fairseq builds the model, criterion or task) as one ``error:`` line (:func:`cli_error_hook`);
  and it makes fairseq's copies to ``checkpoint_best.pt`` / ``checkpoint_last.pt`` atomic
  (:mod:`.atomic_checkpoints`), and, in a training child of ``run.py``, ties the process's life to its parent's
  (:func:`.lifetime.die_with_parent_from_env`).
  The package
  ``ibert_plugin/__init__.py`` calls it as soon as fairseq is imported (``fairseq-train --user-dir ibert_plugin``
  imports fairseq first), never before: importing ``ibert_plugin.quant`` alone stays fairseq-free.
* :mod:`.checkpoint` builds plugin models from fairseq checkpoints and packed files (imports fairseq).
* :mod:`.checkpoint_file` opens and validates checkpoint files with torch only.
* :mod:`.lifetime` (standard library only): training children that die with their launcher, run-folder locks.

This module itself imports nothing heavy at import time.
"""
from __future__ import annotations

import importlib
import os
import sys

__all__ = ["register", "cli_error_hook", "REGISTERING_MODULES"]

#: Modules whose import registers something with fairseq (models, criteria, BPE). New fairseq tasks or models of
#: the plugin add their module here.
REGISTERING_MODULES = (
    "ibert_plugin.models.ibert_roberta",
    "ibert_plugin.criterions.distill",
    "ibert_plugin.assets.wordpiece_bpe",
    "ibert_plugin.tasks",  # --task squad, --criterion squad_span / squad_span_distill
)


def register() -> None:
    """Register the plugin's architectures, criterion and BPE with fairseq (idempotent; imports fairseq).

    Only imports modules (no attribute access), so it is safe to run while one of them is itself being imported.
    """
    from . import atomic_checkpoints
    from .checkpoint_file import allow_fairseq_pickles
    from .lifetime import die_with_parent_from_env

    allow_fairseq_pickles()
    atomic_checkpoints.install()
    die_with_parent_from_env()
    if _fairseq_cli_process() and not getattr(sys.excepthook, "ibert_cli_errors", False):
        sys.excepthook = cli_error_hook(sys.excepthook)
    for name in REGISTERING_MODULES:
        importlib.import_module(name)


def _fairseq_cli_process() -> bool:
    """True in ``fairseq-train`` / ``fairseq-validate`` ... and ``python -m fairseq_cli.<tool>``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (getattr(spec, "name", "") or "").startswith("fairseq_cli.") or \
        os.path.basename(sys.argv[0] if sys.argv else "").startswith("fairseq-")


def cli_error_hook(previous):
    """A ``sys.excepthook`` that prints an uncaught ``ConfigError`` as ``error: <message>`` (exit status 1, no
    traceback: the message names the flag) and hands every other exception to ``previous``."""
    from ..quant.config import ConfigError

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, ConfigError):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            previous(exc_type, exc, tb)

    hook.ibert_cli_errors = True
    return hook
