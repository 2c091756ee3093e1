"""Whole-dev-set evaluation outside fairseq-train: a checkpoint, a packed file or the integer engine.

:func:`evaluate_file` tokenizes a SQuAD JSON file into windows, runs ``logits_fn`` on length-sorted batches,
post-processes (:mod:`.postprocess`) and scores with the official definitions (:mod:`.metrics`); it writes the
official predictions JSON (``{qid: text}``; v2.0 also ``null_odds.json``) and returns the scores.

Back-ends (each a function ``tokens int64 [B, T] -> (start [B, T], end [B, T])``):

* :func:`model_logits`: a fairseq ``ibert_roberta`` model (FP, TernaryBERT, I-BERT QAT) in eval mode, with its
  ``squad_span`` head, on the model's device;
* :func:`engine_logits`: the integer engine (:class:`ibert_plugin.engine.engine.IntegerEngine`) on a symmetric-mode
  model: ``IntegerEngine.encode`` returns the final integer hidden states ``q int64 [B, T, D]`` and their per-channel
  scale ``s float32 [D]``; the float span head runs on ``q * s`` (formed in float64, rounded to float32 once,
  exactly as the QAT model's real output), so its logits equal the QAT model's bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .data import read_squad
from .features import OffsetTokenizer, build_features, examples_gold
from .head import SPAN_HEAD, span_logits, span_logits_float
from .metrics import best_null_threshold, evaluate
from .postprocess import predict

LogitsFn = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def model_logits(model, padding_idx: int) -> LogitsFn:
    """Back-end of a fairseq model with a ``squad_span`` head."""
    if SPAN_HEAD not in model.classification_heads:
        raise ValueError(f"the model has no '{SPAN_HEAD}' head (train it with --task squad)")
    head = model.classification_heads[SPAN_HEAD]

    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(tokens):
        tokens = tokens.to(device)
        features, _ = model(tokens, features_only=True)
        start, end = span_logits(head, features, tokens.eq(padding_idx))
        return start.cpu(), end.cpu()

    return fn


def build_engine(model, threads: Optional[int] = None):
    """Integer engine of a symmetric-mode model in eval mode, with the span head's float weights as its head."""
    from ..engine.convert import compile_model
    from ..engine.engine import IntegerEngine

    return IntegerEngine(compile_model(model, head_name=SPAN_HEAD), threads=threads)


def engine_logits(engine, padding_idx: int) -> LogitsFn:
    """Back-end of the integer engine: integer encoder, float span head on ``q_out * s_out``."""
    if not engine.im.head:
        raise ValueError(f"the engine's model has no '{SPAN_HEAD}' head")

    def fn(tokens):
        q, s, _ = engine.encode(tokens)
        # q can exceed float32's 24-bit mantissa: form q * s in float64 and round once, as the QAT model does
        return span_logits_float(engine.im.head, (q.to(torch.float64) * s).to(torch.float32), tokens.eq(padding_idx))

    return fn


def evaluate_file(path, tokenizer: OffsetTokenizer, logits_fn: LogitsFn, version_2: bool = False,
                  max_seq_length: int = 384, doc_stride: int = 128, max_query_length: int = 64,
                  n_best_size: int = 20, max_answer_length: int = 30,
                  null_score_diff_threshold: Optional[float] = 0.0, batch_size: int = 32,
                  predictions_out=None) -> Dict[str, float]:
    """Official EM/F1 of ``logits_fn`` on every question of ``path`` (see the module docstring).

    Args:
        null_score_diff_threshold: v2.0: abstain when ``null - best_non_null`` exceeds it; ``None`` chooses the
            F1-best threshold on this file (:func:`.metrics.best_null_threshold`) and applies it.
        predictions_out: where to write the predictions JSON (v2.0: the null odds go next to it, ``predictions``
            replaced by ``null_odds`` in the name).

    Returns:
        The scores (``exact``, ``f1``, ``total``; v2.0 also ``HasAns_*`` / ``NoAns_*`` and
        ``null_score_diff_threshold``, the threshold applied).
    """
    examples = read_squad(path, version_2=version_2)
    feats = build_features(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    order = np.argsort([len(f.tokens) for f in feats], kind="stable")
    starts: list = [None] * len(feats)
    ends: list = [None] * len(feats)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        T = max(len(feats[i].tokens) for i in idx)
        tokens = torch.full((len(idx), T), tokenizer.pad, dtype=torch.long)
        for r, i in enumerate(idx):
            tokens[r, :len(feats[i].tokens)] = torch.from_numpy(feats[i].tokens)
        st, en = logits_fn(tokens)
        st, en = st.float().numpy(), en.float().numpy()
        for r, i in enumerate(idx):
            n = len(feats[i].tokens)
            starts[i], ends[i] = st[r, :n], en[r, :n]
    gold = examples_gold(examples)
    if version_2 and null_score_diff_threshold is None:
        texts, odds = predict(examples, feats, starts, ends, True, n_best_size, max_answer_length, float("inf"))
        null_score_diff_threshold = best_null_threshold(gold, texts, odds)[1]
        preds = {q: ("" if odds[q] > null_score_diff_threshold else t) for q, t in texts.items()}
    else:
        preds, odds = predict(examples, feats, starts, ends, version_2, n_best_size, max_answer_length,
                              0.0 if null_score_diff_threshold is None else null_score_diff_threshold)
    scores = evaluate(gold, preds, version_2)
    if version_2:
        scores["null_score_diff_threshold"] = float(null_score_diff_threshold)
    if predictions_out:
        out = Path(predictions_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(preds, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if version_2:
            # predictions.json -> null_odds.json, test_predictions.json -> test_null_odds.json
            name = (out.name.replace("predictions", "null_odds") if "predictions" in out.name
                    else f"{out.stem}_null_odds{out.suffix}")
            out.with_name(name).write_text(json.dumps(odds, indent=1) + "\n")
    return scores
