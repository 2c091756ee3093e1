"""``--task squad``: SQuAD v1.1 / v2.0 span extraction for the plugin's RoBERTa models.

Reads SQuAD JSON (``<data>/train.json``, ``<data>/dev.json``; :mod:`ibert_plugin.squad.data`), tokenizes with the
model's BPE keeping character offsets and builds sliding-window features (:mod:`ibert_plugin.squad.features`:
``--max-seq-length 384 --doc-stride 128 --max-query-length 64``). ``build_model`` registers the two-output span head
``classification_heads["squad_span"]`` (:mod:`ibert_plugin.squad.head`), so checkpoints save and reload it.

Validation scores the *whole* dev set with the official definitions: the criterion hands each dev batch's start/end
logits to :meth:`SquadTask.valid_step`, which keeps them per feature; the metrics ``exact`` and ``f1`` (v2.0: also
``HasAns_*`` / ``NoAns_*``) are fairseq derived meters computed from all kept logits when the validation stats are
read, so ``--best-checkpoint-metric f1 --maximize-best-checkpoint-metric`` selects on dev F1. The logits live in
this process: run validation in a single process (``--distributed-world-size 1``), as the recipe does.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from fairseq.data import Dictionary, FairseqDataset, data_utils
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task

from ..quant.config import ConfigError
from ..squad.data import read_squad
from ..squad.features import OffsetTokenizer, build_features, examples_gold, feature_arrays
from ..squad.head import ensure_span_head
from ..squad.metrics import evaluate
from ..squad.postprocess import predict

logger = logging.getLogger(__name__)

V1_KEYS = ("exact", "f1")
V2_KEYS = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1")


@dataclass
class SquadConfig(FairseqDataclass):
    data: str = field(default="", metadata={"help": "folder with the SQuAD JSON files (train.json, dev.json)"})
    tokenizer_dir: str = field(default="", metadata={
        "help": "BPE folder: tokenizer.json/vocab.txt (WordPiece, data/minilm) or encoder.json + vocab.bpe "
                "(GPT-2, data/gpt2_bpe); its dict.txt is the dictionary unless --dict-path is given"})
    dict_path: str = field(default="", metadata={"help": "fairseq dict.txt (default <tokenizer-dir>/dict.txt)"})
    train_file: str = field(default="train.json", metadata={"help": "training file inside --data (or a path)"})
    valid_file: str = field(default="dev.json", metadata={"help": "dev file inside --data (or a path)"})
    version_2_with_negative: bool = field(default=False, metadata={"help": "SQuAD v2.0: unanswerable questions"})
    max_seq_length: int = field(default=384, metadata={"help": "tokens per window, specials included"})
    doc_stride: int = field(default=128, metadata={"help": "tokens between the starts of consecutive windows"})
    max_query_length: int = field(default=64, metadata={"help": "question tokens kept"})
    n_best_size: int = field(default=20, metadata={"help": "start/end candidates per window"})
    max_answer_length: int = field(default=30, metadata={"help": "longest answer in tokens"})
    null_score_diff_threshold: float = field(default=0.0, metadata={
        "help": "v2.0: predict no answer when null score - best span score exceeds this"})


class SquadFeatureDataset(FairseqDataset):
    """Windows as fairseq samples: ``net_input.src_tokens`` ``[B, T]`` (right-padded), ``target`` ``[B, 2]``
    (start, end positions), ``id`` (feature index)."""

    def __init__(self, tokens, labels: np.ndarray, pad: int, shuffle: bool):
        self.tokens = [torch.from_numpy(t) for t in tokens]
        self.labels = torch.from_numpy(labels)
        self.sizes = np.asarray([len(t) for t in tokens], dtype=np.int64)
        self.pad = pad
        self.shuffle = shuffle

    def __getitem__(self, i):
        return {"id": i, "tokens": self.tokens[i], "target": self.labels[i]}

    def __len__(self):
        return len(self.tokens)

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def ordered_indices(self):
        # length-sorted batches (fairseq shuffles the batches themselves); random order within equal lengths
        order = np.random.permutation(len(self)) if self.shuffle else np.arange(len(self))
        return order[np.argsort(self.sizes[order], kind="mergesort")]

    def collater(self, samples):
        if not samples:
            return {}
        src = data_utils.collate_tokens([s["tokens"] for s in samples], self.pad, left_pad=False)
        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
            "nsentences": len(samples),
            "ntokens": int(sum(len(s["tokens"]) for s in samples)),
            "net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(s["tokens"]) for s in samples])},
            "target": torch.stack([s["target"] for s in samples]),
        }


def load_dictionary(cfg) -> Dictionary:
    """The model's dictionary (``dict.txt`` plus ``<mask>``, as fairseq's RoBERTa tasks build it)."""
    path = cfg.dict_path or os.path.join(cfg.tokenizer_dir, "dict.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dictionary not found: {path} (pass --tokenizer-dir or --dict-path)")
    d = Dictionary.load(path)
    d.add_symbol("<mask>")
    return d


@register_task("squad", dataclass=SquadConfig)
class SquadTask(FairseqTask):
    """SQuAD span extraction (see the module docstring)."""

    def __init__(self, cfg: SquadConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        self.tokenizer = OffsetTokenizer(cfg.tokenizer_dir, dictionary)
        self.eval_sets: Dict[str, Tuple[list, list]] = {}
        self._valid_logits: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self._scores: Optional[Dict[str, float]] = None

    @classmethod
    def setup_task(cls, cfg: SquadConfig, **kwargs):
        if not cfg.tokenizer_dir:
            raise ConfigError("--task squad needs --tokenizer-dir (data/minilm or data/gpt2_bpe)")
        return cls(cfg, load_dictionary(cfg))

    def _path(self, name: str) -> str:
        return name if os.path.isabs(name) or os.path.isfile(name) else os.path.join(self.cfg.data, name)

    def load_dataset(self, split, combine=False, **kwargs):
        cfg = self.cfg
        path = self._path(cfg.train_file if split == "train" else cfg.valid_file)
        examples = read_squad(path, version_2=cfg.version_2_with_negative)
        feats = build_features(examples, self.tokenizer, cfg.max_seq_length, cfg.doc_stride, cfg.max_query_length)
        tokens, labels = feature_arrays(feats)
        logger.info("squad %s: %d questions -> %d windows (%s)", split, len(examples), len(feats), path)
        self.datasets[split] = SquadFeatureDataset(tokens, labels, self.dictionary.pad(), shuffle=split == "train")
        self.eval_sets[split] = (examples, feats)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        ensure_span_head(model)
        return model

    def max_positions(self):
        return self.cfg.max_seq_length

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary

    # ----------------------------------------------------------------------------------------------- validation
    def begin_valid_epoch(self, epoch, model):
        self._valid_logits = {}
        self._scores = None

    def valid_step(self, sample, model, criterion):
        loss, sample_size, log = super().valid_step(sample, model, criterion)
        span = log.pop("_span", None)
        if span is not None:
            ids, start, end, lengths = span
            for b, fid in enumerate(ids.tolist()):
                n = int(lengths[b])
                self._valid_logits[fid] = (start[b, :n].numpy(), end[b, :n].numpy())
            self._scores = None
            log["squad_valid"] = 1
        return loss, sample_size, log

    def dev_scores(self, split: str = "valid") -> Dict[str, float]:
        """Official scores of the logits kept since the last :meth:`begin_valid_epoch` (features without logits
        count as unanswered)."""
        if self._scores is None:
            examples, feats = self.eval_sets[split]
            got = [self._valid_logits.get(i, (None, None)) for i in range(len(feats))]
            preds, _ = predict(examples, feats, [g[0] for g in got], [g[1] for g in got],
                               self.cfg.version_2_with_negative, self.cfg.n_best_size, self.cfg.max_answer_length,
                               self.cfg.null_score_diff_threshold)
            self._scores = evaluate(examples_gold(examples), preds, self.cfg.version_2_with_negative)
        return self._scores

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if any("squad_valid" in log for log in logging_outputs):
            keys = V2_KEYS if self.cfg.version_2_with_negative else V1_KEYS
            for key in keys:
                metrics.log_derived(key, lambda meters, k=key: round(self.dev_scores().get(k, 0.0), 2))
