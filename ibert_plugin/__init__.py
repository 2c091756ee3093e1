"""I-BERT / TernaryBERT quantization plugin for fairseq (``--user-dir ibert_plugin``).

Importing the package never imports fairseq: ``ibert_plugin.quant`` (numerics) and ``ibert_plugin.engine``
(integer runtime) work without it. The fairseq registrations (quantized RoBERTa architectures, the
``ternary_distill`` criterion, the WordPiece BPE, the checkpoint allow-list; :func:`ibert_plugin.wiring.register`)
happen as soon as fairseq is in the process:

* now, when fairseq is already imported: ``fairseq-train --user-dir ibert_plugin`` imports fairseq before the plugin;
* otherwise right after fairseq's own import finishes (an import hook, :class:`_Finder`), because fairseq's
  ``import_user_module`` skips a plugin that is already in ``sys.modules``: ``import ibert_plugin.quant`` followed by
  an in-process ``fairseq_cli.train.main`` still sees every registration. When fairseq is first imported by a plugin
  module (``import ibert_plugin.criterions``), the registration runs once that outermost plugin import is done.
"""
from __future__ import annotations

import importlib.abc
import sys

__all__ = ["__version__", "register"]

#: The package version (``pyproject.toml`` reads it from here; changes by version: ``CHANGELOG.md``).
__version__ = "0.2.0"


def register() -> None:
    """Register the plugin with fairseq now (imports fairseq; idempotent)."""
    from .wiring import register as _register

    _register()


class _Loader(importlib.abc.Loader):
    """Wraps the real loader of ``fairseq`` or of a plugin submodule to run :func:`register` at the right moment.

    Registering imports plugin modules, so it must not run while a plugin module is half-imported (its names would
    be missing to the modules registration imports): when fairseq finishes loading inside a plugin import, the
    registration waits until the outermost plugin import has finished.
    """

    def __init__(self, inner: importlib.abc.Loader, is_fairseq: bool):
        self._inner = inner
        self._is_fairseq = is_fairseq

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        global _depth, _pending
        if self._is_fairseq:
            self._inner.exec_module(module)
            if _depth:
                _pending = True
            else:
                register()
            return
        _depth += 1
        try:
            self._inner.exec_module(module)
        finally:
            _depth -= 1
        if _pending and not _depth:
            _pending = False
            register()

    def __getattr__(self, name):  # get_code, get_source, resource readers ... of the wrapped loader
        if name == "_inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``fairseq`` (until it is loaded) and ``ibert_plugin.*`` through the other finders, wrapping the loader."""

    def find_spec(self, name, path=None, target=None):
        is_fairseq = name == "fairseq"
        if not (is_fairseq or name.startswith(__name__ + ".")):
            return None
        for finder in sys.meta_path:  # the finders that would have run without this one, in their order
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, is_fairseq)
                return spec
        return None


_depth = 0  # plugin modules being imported right now (nested)
_pending = False  # fairseq finished loading inside a plugin import: register once that import is done

if sys.modules.get("fairseq") is not None:
    register()
if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
