"""SQuAD v1.1 / v2.0 span extraction for the plugin.

Layers (lowest first; the first five need no fairseq):

* :mod:`.data`        -- SQuAD JSON reading and validation (:class:`SquadError` for bad input).
* :mod:`.features`    -- tokenization with character offsets (WordPiece / GPT-2 BPE), sliding windows.
* :mod:`.metrics`     -- the official v1.1 / v2.0 EM and F1.
* :mod:`.postprocess` -- n-best spans, the v2.0 null score, predictions.
* :mod:`.head`        -- the ``squad_span`` head applied per token (model and integer-engine forms).
* :mod:`.evaluate`    -- whole-dev-set scoring of a checkpoint, a packed file or the integer engine.

Only these primitives live here. The fairseq task is :mod:`ibert_plugin.tasks.squad`, the criteria
:mod:`ibert_plugin.criterions.squad_span`; the driver that runs every stage from one command line (``python run.py
--task SQUAD1|SQUAD2``, alias ``python -m ibert_plugin.squad``) is :mod:`ibert_plugin.recipes.squad`.
"""
