"""Integer-only inference engine for ``ibert_roberta`` models in symmetric (I-BERT) mode.

GEMMs run on int8/ternary weights with int32 accumulators (ONNX Runtime ``MatMulInteger``, ``gemm.py``), the
nonlinearities in fused C++ integer kernels (``kernels.cpp``); every integer equals the QAT model's eval-mode integer
(``docs/integer_spec.md``). Entry points: :func:`convert.from_model` / :func:`convert.from_checkpoint` ->
:class:`engine.IntegerEngine`; command line ``python -m ibert_plugin.engine eval ...``.
"""


class EngineError(ValueError):
    """Bad input for the integer engine (unquantized checkpoint, mismatched dictionary, missing file ...)."""
