"""The task table and the architecture table: the one definition of every task and ``--arch`` the plugin knows.

Every user imports them from here: ``run.py``'s recipes (:mod:`ibert_plugin.recipes`), the SQuAD recipe
(:mod:`ibert_plugin.recipes.squad`), the GLUE preprocessing (:mod:`ibert_plugin.assets.glue`), the engine CLI (through
``assets.glue``), the hydra configs and the benchmarks. Standard library only, so that any layer may import it
(``tests/test_layering.py``: this module imports nothing of the plugin).

**Tasks** (:data:`TASKS`, one :class:`TaskSpec` each, in ``run.py``'s order): the GLUE-format sentence(-pair)
tasks (fairseq task ``sentence_prediction``) carry their TSV layout, their FP fine-tuning recipe and their metric;
the span-extraction tasks SQUAD1 / SQUAD2 (fairseq task ``squad``, recipe :mod:`ibert_plugin.recipes.squad`) carry
the v2.0 flag, their report files and their metric.

* TSV layout: 1-based input / label columns and field counts exactly as fairseq's
  ``examples/roberta/preprocess_GLUE_tasks.sh`` cuts them, the allowed labels (``None``: regression), and the dev /
  test split files (MNLI: matched and mismatched).
* FP recipe: the fairseq RoBERTa ``README.glue.md`` numbers, which I-BERT's ``run.py`` copies unchanged: learning
  rate, batch size in sentences, total and warmup updates of the polynomial schedule, epochs, and the mid-epoch
  validation interval in training sentences (``validate_interval_updates = sentences // bs``). Added tasks:

  * RT-SENT (Rotten Tomatoes, 8,568 train sentences): single-sentence like SST-2, 10 epochs at batch 32 = 10 x 268
    = 2680 updates, 6 % warmup (160), lr 1e-5 as SST-2.
  * BOOLQ (9,427 question/passage pairs): RTE's lr/batch, 10 epochs at batch 16 = 10 x 590 = 5900 updates,
    6 % warmup (354), passages truncated to 512 positions, max-tokens raised to 16 x 512 so long passages keep the
    batch size.

  TernaryBERT stages use the recipes' TernaryBERT schedule (:data:`ibert_plugin.recipes.schedules.TERNARY`) with the
  per-task batch of ``quant_task_glue.py`` (:attr:`TaskSpec.ternary_bs`).
* SQuAD: the report files of a task folder (``python -m ibert_plugin.assets build --only squad``), each scored once
  with a stage's selected checkpoint: name -> (file by default, file with ``--full``). SQUAD1 reports on the whole
  official v1.1 dev set with ``--full`` and on its fixed >= 2,500-question subset (whole articles) otherwise.

**Architectures** (:data:`ARCHS`, one :class:`ArchSpec` per ``--arch``): the fairseq architecture, the size tag of
``run.py``'s output paths, the default tokenizer folder and the default pretrained checkpoints.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

__all__ = ["TaskSpec", "TASKS", "GLUE_TASKS", "SQUAD_TASKS", "ArchSpec", "ARCHS"]

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: its data layout, its FP fine-tuning recipe and its best-checkpoint metric.

    The layout and recipe fields are those of a GLUE-format task (``fairseq_task="sentence_prediction"``); a SQuAD
    task (``fairseq_task="squad"``) leaves them at their defaults and sets the SQuAD fields instead.
    """

    name: str
    fairseq_task: str = "sentence_prediction"
    metric: str = "accuracy"  # best-checkpoint metric (every metric here is higher-is-better)
    metric_flags: Tuple[str, ...] = ()  # the criterion flags that make fairseq report ``metric``
    # ---- GLUE TSV layout (1-based columns, as in fairseq's preprocess_GLUE_tasks.sh)
    inputs: Tuple[int, ...] = ()          # train/dev input columns
    test_inputs: Tuple[int, ...] = ()     # test input columns
    label: Optional[int] = None           # train label column
    nfields: int = 0                      # train field count
    test_nfields: int = 0                 # test field count
    labels: Optional[frozenset] = None    # allowed labels (None: regression)
    dev_label: Optional[int] = None       # dev label column when it differs (MNLI)
    dev_nfields: Optional[int] = None
    header: bool = True                   # train/dev have a header row (CoLA: no)
    drop_bad_rows: bool = False           # QQP: drop rows whose field count is wrong (fairseq: awk NF==6)
    dev_splits: Tuple[str, ...] = ("dev",)
    test_splits: Tuple[str, ...] = ("test",)
    # ---- FP fine-tuning recipe (the I-BERT QAT stage keeps it with 0 warmup)
    lr: float = 0.0
    bs: int = 0
    total_updates: int = 0
    warmup: int = 0
    max_epoch: int = 0
    valid_interval_sentences: Optional[int] = None  # mid-epoch validation every N training sentences
    valid_subset: str = "valid"
    max_positions: int = 512
    max_tokens: int = 4400
    truncate: bool = False  # --truncate-sequence (long passages)
    ternary_bs: int = 32  # TernaryBERT per-task batch size (quant_task_glue.py default_params)
    # ---- SQuAD
    version_2_with_negative: bool = False
    #: report name -> (file of the task folder by default, file with ``--full``)
    report_files: Mapping[str, Tuple[str, str]] = dataclasses.field(default_factory=dict)

    @property
    def squad(self) -> bool:
        """A span-extraction task (:mod:`ibert_plugin.recipes.squad`)."""
        return self.fairseq_task == "squad"

    @property
    def regression(self) -> bool:
        """A GLUE task with a real-valued target (no label set: STS-B)."""
        return not self.squad and self.labels is None

    @property
    def num_classes(self) -> int:
        """Outputs of the classification head: 1 for regression, else the size of the label set."""
        return 1 if self.regression else len(self.labels or ())

    def validate_interval_updates(self, bs: int) -> Optional[int]:
        """Mid-epoch validation interval in updates for batch ``bs`` (``None``: once per epoch)."""
        return max(1, self.valid_interval_sentences // bs) if self.valid_interval_sentences else None


_BIN = frozenset({"0", "1"})
_NLI2 = frozenset({"entailment", "not_entailment"})
_ACC_F1 = dict(metric="acc_and_f1", metric_flags=("--report-acc-and-f1",))
_SQUAD = dict(fairseq_task="squad", metric="f1")

TASKS: Dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("RTE", inputs=(2, 3), test_inputs=(2, 3), label=4, nfields=4, test_nfields=3, labels=_NLI2,
             lr=2e-5, bs=16, total_updates=2036, warmup=122, max_epoch=12),
    TaskSpec("SST-2", inputs=(1,), test_inputs=(2,), label=2, nfields=2, test_nfields=2, labels=_BIN,
             lr=1e-5, bs=32, total_updates=20935, warmup=1256, max_epoch=12),
    TaskSpec("MNLI", inputs=(9, 10), test_inputs=(9, 10), label=12, nfields=12, test_nfields=10,
             labels=frozenset({"entailment", "neutral", "contradiction"}), dev_label=16, dev_nfields=16,
             dev_splits=("dev_matched", "dev_mismatched"), test_splits=("test_matched", "test_mismatched"),
             lr=1e-5, bs=32, total_updates=123873, warmup=7432, max_epoch=6, valid_interval_sentences=100000,
             valid_subset="valid,valid1"),
    TaskSpec("QNLI", inputs=(2, 3), test_inputs=(2, 3), label=4, nfields=4, test_nfields=3, labels=_NLI2,
             lr=1e-5, bs=32, total_updates=33112, warmup=1986, max_epoch=12, valid_interval_sentences=55000),
    TaskSpec("CoLA", metric="mcc", metric_flags=("--report-mcc",),
             inputs=(4,), test_inputs=(2,), label=2, nfields=4, test_nfields=2, labels=_BIN, header=False,
             lr=1e-5, bs=16, total_updates=5336, warmup=320, max_epoch=12, ternary_bs=16),
    TaskSpec("QQP", **_ACC_F1, inputs=(4, 5), test_inputs=(2, 3), label=6, nfields=6, test_nfields=3, labels=_BIN,
             drop_bad_rows=True, lr=1e-5, bs=32, total_updates=113272, warmup=28318, max_epoch=6,
             valid_interval_sentences=950000),
    TaskSpec("MRPC", **_ACC_F1, inputs=(4, 5), test_inputs=(4, 5), label=1, nfields=5, test_nfields=5, labels=_BIN,
             lr=1e-5, bs=16, total_updates=2296, warmup=137, max_epoch=12),
    TaskSpec("STS-B", metric="pearson_and_spearman", metric_flags=("--report-pearson-and-spearman",),
             inputs=(8, 9), test_inputs=(8, 9), label=10, nfields=10, test_nfields=9, labels=None,
             lr=2e-5, bs=16, total_updates=3598, warmup=214, max_epoch=12),
    # Offline tasks built by `python -m ibert_plugin.assets build` (ibert_plugin/assets/datasets.py).
    TaskSpec("RT-SENT", inputs=(1,), test_inputs=(2,), label=2, nfields=2, test_nfields=2, labels=_BIN,
             lr=1e-5, bs=32, total_updates=2680, warmup=160, max_epoch=10),
    TaskSpec("BOOLQ", inputs=(2, 3), test_inputs=(2, 3), label=4, nfields=4, test_nfields=3,
             labels=frozenset({"True", "False"}), lr=2e-5, bs=16, total_updates=5900, warmup=354, max_epoch=10,
             max_tokens=8192, truncate=True, ternary_bs=16),
    # Span extraction (`run.py --task SQUAD1|SQUAD2` hands the whole command line to the SQuAD recipe).
    TaskSpec("SQUAD1", **_SQUAD, report_files={"test": ("test_subset.json", "test.json")}),
    TaskSpec("SQUAD2", **_SQUAD, version_2_with_negative=True,
             report_files={"test": ("test.json", "test.json"),
                           "test_disfluent": ("test_disfluent.json", "test_disfluent.json")}),
)}
#: The GLUE-format tasks (``run.py``'s own recipes, ``assets.glue``) and the span-extraction ones: views of TASKS.
GLUE_TASKS: Dict[str, TaskSpec] = {n: t for n, t in TASKS.items() if not t.squad}
SQUAD_TASKS: Dict[str, TaskSpec] = {n: t for n, t in TASKS.items() if t.squad}


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """One ``--arch``: a registered fairseq architecture and where its tokenizer and pretrained weights live.

    Paths starting with ``@`` are relative to the repository; the others to ``--model-dir``.
    """

    fairseq_arch: str
    size: str  # tag in run.py's output paths (``<TASK>-<size>``)
    tokenizer_dir: str  # default BPE folder with dict.txt (SQuAD recipe)
    pretrained: Tuple[str, ...] = ()  # default checkpoints, first found wins (none: trained from scratch)

    def tokenizer_path(self) -> Path:
        """The default tokenizer folder (``@`` resolved against the repository)."""
        return _resolve(self.tokenizer_dir, Path("."))

    def pretrained_paths(self, model_dir: Path) -> List[Path]:
        """The default pretrained checkpoints, in the order they are tried."""
        return [_resolve(p, Path(model_dir)) for p in self.pretrained]


def _resolve(spec: str, base: Path) -> Path:
    return REPO / spec[1:] if spec.startswith("@") else base / spec


ARCHS: Dict[str, ArchSpec] = {
    "roberta_base": ArchSpec("ibert_roberta_base", "base", "@data/gpt2_bpe", ("roberta.base/model.pt",)),
    "roberta_large": ArchSpec("ibert_roberta_large", "large", "@data/gpt2_bpe", ("roberta.large/model.pt",)),
    "minilm": ArchSpec("ibert_roberta_minilm", "minilm", "@data/minilm", ("@data/minilm/model.pt", "minilm/model.pt")),
    "tiny": ArchSpec("ibert_roberta_tiny", "tiny", "@data/minilm"),
}
