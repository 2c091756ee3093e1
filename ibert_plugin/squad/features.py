"""Question/context features with character offsets and sliding windows (BERT ``run_squad`` windows).

Tokenization keeps every token's character span in the original string (HuggingFace ``tokenizers``): WordPiece for
the imported MiniLM (``tokenizer.json`` / ``vocab.txt`` with the importer's ``dict.txt``), GPT-2 byte-level BPE for
RoBERTa dictionaries (``encoder.json`` + ``vocab.bpe`` with fairseq's GPT-2 ``dict.txt``, whose symbols are the GPT-2
ids). Token ids are fairseq dictionary indices.

Layout of one feature (``max_seq_length`` tokens at most): WordPiece ``<s> q </s> c </s>`` (BERT's
``[CLS] q [SEP] c [SEP]``), GPT-2 ``<s> q </s> </s> c </s>`` (RoBERTa's pair layout). The question is cut to
``max_query_length`` tokens; the context is covered by windows of ``max_seq_length - len(q) - specials`` tokens that
start ``doc_stride`` tokens apart. A training answer that is not entirely inside a window, and every v2.0
unanswerable question, is labelled ``start = end = 0`` (the ``<s>`` position, BERT's null answer).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from .data import Example, SquadError


class OffsetTokenizer:
    """Text -> (fairseq dictionary indices int64 [n], character offsets int64 [n, 2]).

    Args:
        tokenizer_dir: a folder with ``tokenizer.json`` or ``vocab.txt`` (WordPiece) or ``encoder.json`` +
            ``vocab.bpe`` (GPT-2 BPE).
        dictionary: the fairseq ``Dictionary`` the model was trained with.
    """

    def __init__(self, tokenizer_dir, dictionary):
        d = Path(tokenizer_dir)
        if (d / "encoder.json").is_file() and (d / "vocab.bpe").is_file():
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers

            self.kind = "gpt2"
            bpe = models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe"))
            tok = Tokenizer(bpe)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            # fairseq's GPT-2 dictionary symbols are the GPT-2 ids written as decimal strings
            names = {i: str(i) for i in range(tok.get_vocab_size())}
        elif (d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file():
            from ..assets.wordpiece_bpe import load_wordpiece_tokenizer

            self.kind = "wordpiece"
            tok = load_wordpiece_tokenizer(str(d))
            names = {i: s for s, i in tok.get_vocab().items()}
        else:
            raise SquadError(f"{d}: no tokenizer (expected tokenizer.json / vocab.txt, or encoder.json + vocab.bpe)")
        self.tokenizer = tok
        size = max(names) + 1
        self.to_dict = np.full(size, dictionary.unk(), dtype=np.int64)
        for i, s in names.items():
            self.to_dict[i] = dictionary.index(s)
        self.bos, self.eos, self.pad = dictionary.bos(), dictionary.eos(), dictionary.pad()

    @property
    def separators(self) -> int:
        """Number of ``</s>`` between question and context (1 for BERT layouts, 2 for RoBERTa)."""
        return 2 if self.kind == "gpt2" else 1

    def encode_batch(self, texts: Sequence[str]) -> List[Tuple[np.ndarray, np.ndarray]]:
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for e in encs:
            ids = self.to_dict[np.asarray(e.ids, dtype=np.int64)] if e.ids else np.zeros(0, np.int64)
            offs = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            out.append((ids, offs))
        return out


@dataclass
class Feature:
    """One window.

    Attributes:
        example_index: index of its :class:`Example`.
        tokens: fairseq indices int64 [T] (``T <= max_seq_length``).
        ctx_start: position of the first context token in ``tokens``.
        offsets: character span in the context of each context token of the window, int64 [n, 2].
        max_context: bool [n], True where this window is the token's best window (most context on both sides).
        start, end: training labels (token positions in ``tokens``; 0 = null answer).
    """

    example_index: int
    tokens: np.ndarray
    ctx_start: int
    offsets: np.ndarray
    max_context: np.ndarray
    start: int
    end: int


def window_starts(n: int, max_ctx: int, doc_stride: int) -> List[int]:
    """Start positions of windows of ``max_ctx`` tokens over ``n`` context tokens, ``doc_stride`` apart."""
    starts = [0]
    while starts[-1] + max_ctx < n:
        starts.append(starts[-1] + min(max_ctx, doc_stride))
    return starts


def _max_context(starts: List[int], n: int, max_ctx: int) -> np.ndarray:
    """``best[w, p]``: window ``w`` is the one giving token ``p`` the most context (BERT ``_check_is_max_context``:
    score ``min(left, right) + 0.01 * window length``, first window wins ties)."""
    p = np.arange(n)[None, :]
    s = np.asarray(starts)[:, None]
    length = np.minimum(max_ctx, n - s)
    inside = (p >= s) & (p < s + length)
    score = np.where(inside, np.minimum(p - s, s + length - 1 - p) + 0.01 * length, -np.inf)
    best = np.argmax(score, axis=0)
    return np.arange(len(starts))[:, None] == best[None, :]


def build_features(examples: Sequence[Example], tok: OffsetTokenizer, max_seq_length: int = 384,
                   doc_stride: int = 128, max_query_length: int = 64, training: bool = False) -> List[Feature]:
    """Sliding-window features of ``examples`` (see the module docstring).

    Args:
        training: label each window with the first gold answer (eval features get labels too, for the loss).
    """
    if doc_stride < 1 or max_query_length < 1:
        raise SquadError("--doc_stride and --max_query_length must be >= 1")
    contexts, index = [], {}
    for ex in examples:
        if ex.context not in index:
            index[ex.context] = len(contexts)
            contexts.append(ex.context)
    ctx_enc = tok.encode_batch(contexts)
    q_enc = tok.encode_batch([ex.question.lstrip() for ex in examples])
    specials = 2 + tok.separators
    feats: List[Feature] = []
    for ei, ex in enumerate(examples):
        q_ids = q_enc[ei][0][:max_query_length]
        c_ids, c_off = ctx_enc[index[ex.context]]
        max_ctx = max_seq_length - len(q_ids) - specials
        if max_ctx < 1:
            raise SquadError(f"--max_seq_length {max_seq_length} leaves no room for context after a "
                             f"{len(q_ids)}-token question")
        n = len(c_ids)
        starts = window_starts(n, max_ctx, doc_stride)
        best = _max_context(starts, n, max_ctx)
        tok_s = tok_e = -1
        if ex.answers and not ex.is_impossible:
            a_s, a_e = ex.answers[0][1], ex.answers[0][2]
            overlap = np.nonzero((c_off[:, 1] > a_s) & (c_off[:, 0] < a_e))[0]
            if len(overlap):
                tok_s, tok_e = int(overlap[0]), int(overlap[-1])
        head = np.concatenate([[tok.bos], q_ids, [tok.eos] * tok.separators]).astype(np.int64)
        for w, s in enumerate(starts):
            e = min(s + max_ctx, n)
            ids = np.concatenate([head, c_ids[s:e], [tok.eos]]).astype(np.int64)
            start = end = 0
            if tok_s >= s and tok_e < e:
                start, end = tok_s - s + len(head), tok_e - s + len(head)
            feats.append(Feature(ei, ids, len(head), c_off[s:e], best[w, s:e], start, end))
    return feats


def feature_arrays(feats: Sequence[Feature]) -> Tuple[List[np.ndarray], np.ndarray]:
    """Token arrays and ``[N, 2]`` start/end labels of ``feats`` (the fairseq dataset's storage)."""
    return [f.tokens for f in feats], np.asarray([[f.start, f.end] for f in feats], dtype=np.int64).reshape(-1, 2)


def examples_gold(examples: Sequence[Example]) -> dict:
    """Question id -> gold answer texts, as the official scripts read them."""
    return {ex.qid: list(ex.answer_texts) for ex in examples}

