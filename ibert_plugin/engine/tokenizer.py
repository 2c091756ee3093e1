"""Raw text -> token ids for the integer engine, without fairseq, equal to fairseq's GLUE preprocessing.

fairseq's pipeline (``preprocess_GLUE_tasks.sh``, then the ``sentence_prediction`` task) is:

1. BPE: GPT-2 byte-level BPE of the stripped line, ids written as decimal strings (``multiprocessing_bpe_encoder``),
   or WordPiece pieces (``--bpe hf_wordpiece``, :mod:`ibert_plugin.assets.wordpiece_bpe`).
2. ``Dictionary.encode_line``: whitespace split, each symbol's dictionary index (``<unk>`` when absent), ``</s>``.
3. ``<s>`` (``--init-token``) before the first sentence, ``</s>`` (``--separator-token``) before the second.

Here step 1 runs in HF ``tokenizers`` from a tokenizer JSON stored in the model file: for GPT-2 it is built from
``encoder.json`` + ``vocab.bpe`` (byte-level pre-tokenizer with GPT-2's regex, the same merges; its ids equal
``fairseq.data.encoders.gpt2_bpe_utils`` on every RT-SENT sentence, ``tests/test_engine_model_file.py``), for
WordPiece it is the tokenizer the GLUE preprocessing itself loads. Steps 2 and 3 use the fairseq dictionary's symbol
list (``Dictionary.symbols``, including the ``<mask>`` the task appends).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import EngineError

#: BPE kinds the engine can tokenize raw text with.
BPE_KINDS = ("gpt2", "wordpiece")
_SPACE = re.compile(r"\s+")  # fairseq.tokenizer.SPACE_NORMALIZER


def gpt2_tokenizer_json(bpe_dir: Path) -> str:
    """HF ``tokenizers`` JSON of GPT-2's byte-level BPE from ``bpe_dir/encoder.json`` and ``bpe_dir/vocab.bpe``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    enc, merges = Path(bpe_dir) / "encoder.json", Path(bpe_dir) / "vocab.bpe"
    for p in (enc, merges):
        if not p.is_file():
            raise EngineError(f"{p}: not found (run: python -m ibert_plugin.assets build --only bpe)")
    tok = Tokenizer(models.BPE.from_file(str(enc), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


@dataclass
class TextEncoder:
    """Tokenizer + fairseq dictionary + the task's special tokens: sentences -> right-padded id batches.

    Args:
        bpe: ``"gpt2"`` or ``"wordpiece"``.
        tokenizer_json: HF ``tokenizers`` JSON (see :func:`gpt2_tokenizer_json`).
        symbols: the fairseq dictionary's ``symbols`` (index -> symbol).
        bos, pad, eos, unk: dictionary indices of ``<s>``, ``<pad>``, ``</s>``, ``<unk>``.
        init_token: index put before the first sentence (``--init-token``; None: nothing).
        separator_token: index put before every further sentence (``--separator-token``; None: nothing).
        max_positions: longest id row the model takes; longer rows keep their first ``max_positions - 1`` ids and
            ``</s>``.
        num_inputs: sentences per example (1, or 2 for pair tasks).
    """

    bpe: str
    tokenizer_json: str
    symbols: List[str]
    bos: int
    pad: int
    eos: int
    unk: int
    init_token: Optional[int]
    separator_token: Optional[int]
    max_positions: int
    num_inputs: int = 1
    _indices: Dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        from tokenizers import Tokenizer

        if self.bpe not in BPE_KINDS:
            raise EngineError(f"unknown BPE kind {self.bpe!r} (choose {', '.join(BPE_KINDS)})")
        try:
            self._tok = Tokenizer.from_str(self.tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise EngineError(f"invalid tokenizer JSON: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        # fairseq's Dictionary: a symbol added twice with #fairseq:overwrite maps to its last index.
        self._indices = {s: i for i, s in enumerate(self.symbols)}

    def bpe_line(self, texts: Sequence[str]) -> List[str]:
        """Step 1: one BPE-encoded line per text (GPT-2: decimal ids of the stripped text; WordPiece: pieces)."""
        if self.bpe == "gpt2":
            return [" ".join(map(str, e.ids)) for e in
                    self._tok.encode_batch([t.strip() for t in texts], add_special_tokens=False)]
        return [" ".join(e.tokens) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_line(self, line: str) -> List[int]:
        """Step 2: ``Dictionary.encode_line(line, add_if_not_exist=False)`` (ids + ``</s>``)."""
        get = self._indices.get
        return [get(w, self.unk) for w in _SPACE.sub(" ", line).strip().split()] + [self.eos]

    def encode(self, columns: Sequence[Sequence[str]]) -> Tuple[List[List[int]], int]:
        """Steps 1-3 for ``columns`` (one list of texts per input sentence). Returns (id rows, rows truncated)."""
        if len(columns) != self.num_inputs:
            raise EngineError(f"the model takes {self.num_inputs} sentence(s) per example, got {len(columns)}")
        lines = [[self.encode_line(x) for x in self.bpe_line(c)] for c in columns]
        rows, truncated = [], 0
        for r in range(len(lines[0])):
            ids = ([] if self.init_token is None else [self.init_token]) + lines[0][r]
            for c in lines[1:]:
                ids += ([] if self.separator_token is None else [self.separator_token]) + c[r]
            if len(ids) > self.max_positions:
                truncated += 1
                ids = ids[: self.max_positions - 1] + [self.eos]
            rows.append(ids)
        return rows, truncated

    def batches(self, rows: Sequence[Sequence[int]], batch_size: int):
        """Right-padded ``int64 [B, T]`` batches of ``batch_size`` rows (``fairseq.data.data_utils.collate_tokens``)."""
        import torch

        out = []
        for s in range(0, len(rows), batch_size):
            chunk = rows[s: s + batch_size]
            t = torch.full((len(chunk), max(len(r) for r in chunk)), self.pad, dtype=torch.int64)
            for i, r in enumerate(chunk):
                t[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
            out.append(t)
        return out
