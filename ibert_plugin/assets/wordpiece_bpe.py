"""WordPiece "BPE" for fairseq, backed by the HuggingFace ``tokenizers`` library.

Registers ``--bpe hf_wordpiece`` so that BERT-family checkpoints imported with
:mod:`ibert_plugin.assets.hf_import` (e.g. MiniLM) can be fed text through fairseq's usual paths:
``RobertaHubInterface.encode`` and the GLUE preprocessing in :mod:`ibert_plugin.assets.glue`.

fairseq's built-in ``--bpe bert`` needs ``transformers``; this one only needs ``tokenizers`` (already a
project dependency) and reads the files the importer copies next to ``model.pt``.

``encode`` returns space-joined WordPiece tokens WITHOUT ``[CLS]``/``[SEP]``: fairseq adds ``<s>``/``</s>``
itself, and the importer maps ``[CLS]``/``[SEP]``/``[PAD]``/``[UNK]`` onto fairseq's ``<s>``/``</s>``/
``<pad>``/``<unk>``. An unknown word comes out as ``[UNK]``, which is not in ``dict.txt`` and therefore maps to
``<unk>`` in ``Dictionary.encode_line`` -- the same row as BERT's ``[UNK]``.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.data.encoders import register_bpe
from fairseq.dataclass import FairseqDataclass


@dataclass
class HFWordPieceConfig(FairseqDataclass):
    """Options of ``--bpe hf_wordpiece``.

    Field names are unique to this BPE so they never collide with ``--bpe bert``'s ``--bpe-vocab-file``.
    """

    wordpiece_vocab: Optional[str] = field(
        default=None,
        metadata={
            "help": "WordPiece vocabulary: a tokenizer.json, a vocab.txt, or a directory holding one of them "
            "(tokenizer.json preferred), e.g. the output dir of `python -m ibert_plugin.assets import-hf`"
        },
    )
    wordpiece_lowercase: str = field(
        default="auto",
        metadata={
            "help": "auto|true|false. auto: tokenizer.json keeps its own normalizer; for vocab.txt read "
            "do_lower_case from tokenizer_config.json next to it (default true, as for uncased BERT)"
        },
    )


def _resolve_vocab(path: str) -> str:
    """Return the tokenizer file to load for ``path`` (a file, or a directory holding one)."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.txt"):
            cand = os.path.join(path, name)
            if os.path.isfile(cand):
                return cand
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"WordPiece vocabulary not found: {path}")
    return path


def _lowercase_for(vocab_txt: str, setting: str) -> bool:
    """Decide lowercasing for a plain ``vocab.txt`` (no normalizer of its own)."""
    if setting.lower() in ("true", "1", "yes"):
        return True
    if setting.lower() in ("false", "0", "no"):
        return False
    cfg = os.path.join(os.path.dirname(vocab_txt), "tokenizer_config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            return bool(json.load(f).get("do_lower_case", True))
    return True  # uncased BERT/MiniLM is the common case


def load_wordpiece_tokenizer(path: str, lowercase: str = "auto"):
    """Build a ``tokenizers.Tokenizer`` for a WordPiece vocabulary.

    Args:
        path: ``tokenizer.json``, ``vocab.txt`` or a directory containing one of them.
        lowercase: ``"auto"``, ``"true"`` or ``"false"`` (see :class:`HFWordPieceConfig`).

    Returns:
        A ``tokenizers.Tokenizer`` whose post-processor is NOT applied by callers
        (they pass ``add_special_tokens=False``).
    """
    from tokenizers import Tokenizer, normalizers
    from tokenizers.implementations import BertWordPieceTokenizer

    path = _resolve_vocab(path)
    if path.endswith(".json"):
        tok = Tokenizer.from_file(path)
        # sentence-transformers tokenizer.json files carry truncation at 128 and fixed padding to 128: fairseq
        # does its own truncation (--max-positions / --truncate-sequence) and batching, so switch both off.
        tok.no_truncation()
        tok.no_padding()
        if lowercase.lower() in ("true", "false", "1", "0", "yes", "no"):
            # Explicit override: swap in a BERT normalizer with the requested casing.
            lc = lowercase.lower() in ("true", "1", "yes")
            tok.normalizer = normalizers.BertNormalizer(lowercase=lc, strip_accents=None if lc else False)
        return tok
    wp = BertWordPieceTokenizer(path, lowercase=_lowercase_for(path, lowercase))
    return wp._tokenizer  # the underlying Tokenizer; same API as the tokenizer.json branch


@register_bpe("hf_wordpiece", dataclass=HFWordPieceConfig)
class HFWordPieceBPE(object):
    """fairseq BPE object: text <-> space-joined WordPiece tokens."""

    def __init__(self, cfg):
        if not getattr(cfg, "wordpiece_vocab", None):
            raise ValueError("--bpe hf_wordpiece needs --wordpiece-vocab (tokenizer.json, vocab.txt or its dir)")
        from tokenizers import decoders

        self.tokenizer = load_wordpiece_tokenizer(cfg.wordpiece_vocab, getattr(cfg, "wordpiece_lowercase", "auto"))
        # The WordPiece decoder glues "##" continuations and undoes " ." style spacing like BERT's decode.
        self._decoder = decoders.WordPiece(prefix="##", cleanup=True)

    def encode(self, x: str) -> str:
        """Tokenize ``x``; no [CLS]/[SEP] (fairseq adds <s>/</s>)."""
        return " ".join(self.tokenizer.encode(x, add_special_tokens=False).tokens)

    def decode(self, x: str) -> str:
        """Inverse of :meth:`encode` up to normalisation (case, accents, whitespace)."""
        toks = [t for t in x.split(" ") if t]
        return self._decoder.decode(toks) if toks else ""

    def is_beginning_of_word(self, x: str) -> bool:
        """WordPiece marks continuations with ``##``; specials like ``<s>`` count as word starts."""
        return not x.startswith("##")
