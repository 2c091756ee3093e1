"""``run.py``'s recipes: GLUE-style fine-tuning, I-BERT QAT and TernaryBERT stages as fairseq-train launches.

Three stages, all launched as ``fairseq-train --user-dir <abs path of ibert_plugin>`` sub-processes:

* **FP fine-tuning** (``--quant-mode none``): from a pretrained ``model.pt`` (``--restore-file``, default
  ``<model-dir>/roberta.{base,large}/model.pt``, ``<model-dir>/minilm/model.pt`` or ``data/minilm/model.pt``; the
  ``tiny`` arch trains from scratch when none is given). Warmup per the task table.
* **I-BERT QAT** (``--quant-mode symmetric``, the seed's default): needs ``--restore-file`` = the FP stage's
  ``checkpoint_best.pt``. The FP weights load into the quantized arch (the model initialises the missing
  quantization buffers), optimizer / LR scheduler / meters / dataloader are reset, warmup is 0. The learning rate
  defaults to the task table like the seed; the I-BERT README uses ``--lr 1e-6``.
* **TernaryBERT** (``--quant-mode ternarybert``): 2- or 8-bit weights, 8-bit activations, distillation from the
  ``--restore-file`` model (criterion ``ternary_distill``), student initialised from the same checkpoint.
  ``--integer-only`` runs the I-BERT integer dataflow with ternary weights (model ``--quant-mode symmetric
  --weight-bits 2``). Defaults: lr 2e-5, 3 epochs, batch 32 (16 for CoLA/BOOLQ), 10 % linear warmup then linear
  decay, Adam (0.9, 0.999), weight decay 0.01, clip-norm 1.0 (global, not TernaryBERT's per-tensor clip).
  ``--save-quantized-model`` runs ``python -m ibert_plugin.export --omit-lm-head`` on ``checkpoint_best.pt``
  afterwards (``<ckpt>/model_packed.pt``); unless ``--save-fp-model`` is also given, the float fairseq checkpoints
  are then deleted. Without ``--save-quantized-model`` the fairseq checkpoints are always kept.

Every stage loads its ``--restore-file`` (checked first to be a readable fairseq checkpoint) through fairseq's
``--finetune-from-model``, so relaunching the same command **resumes** from ``checkpoint_last.pt`` of the most recent
unfinished run of the same configuration (``--fresh`` starts a new run instead). Output layout::

    <output-dir>/<mode>/<TASK>-<size>/wd<wd>_ad<ad>_d<d>_lr<lr>/<MMDD-HHMMSS>.log    (tee of fairseq's output)
                                                              /<MMDD-HHMMSS>_ckpt/   (checkpoint_best.pt ...)
                                                              /<MMDD-HHMMSS>.json    (run record, resume key)

``mode`` is ``none``, ``symmetric`` or ``ternary_w<bits>_<method>`` (``ternary_int_...`` with ``--integer-only``).
Timestamps are GMT. Extra fairseq flags can follow ``--`` (e.g. ``-- --log-interval 10 --num-workers 0``); fairseq
keeps the last occurrence of a flag, so they override the generated ones.

Deviations from I-BERT's ``run.py`` (which validated within the epoch, typed ``--bs`` as float, ignored
``--max-epochs``, never set STS-B's regression flag and logged only accuracy): exact task-name validation, integer
``--bs``, ``--max-epochs`` honoured, STS-B trained as regression, per-task GLUE metrics for best-checkpoint selection
(CoLA ``mcc``, MRPC/QQP ``acc_and_f1``, STS-B ``pearson_and_spearman``, accuracy elsewhere), mid-epoch validation
counted in updates (fairseq semantics), ``--no-epoch-checkpoints`` (only best/last are kept), no separate
``--log-file`` (the driver tees the whole output, tracebacks included).

Modules: :mod:`.schedules` (TernaryBERT and optimizer settings; the task and architecture tables are
:mod:`ibert_plugin.catalog`), :mod:`.options` (flags and up-front checks), :mod:`.plan` (the commands),
:mod:`.execute` (running them), :mod:`.hydra_configs` (``configs/*.yaml`` from the table); :mod:`.squad` (the
SQuAD driver: ``run.py --task SQUAD1|SQUAD2`` hands it the whole command line; alias ``python -m
ibert_plugin.squad``); :mod:`.stages` (a stage runner over ``run.py``: schedules, progress, reuse of finished stages)
and :mod:`.scoring` (per-sentence test-split scores of a checkpoint, shipped sizes), which the demo and the
benchmarks share. Layer: imports ``catalog``, ``quant.config``, the fairseq-free ``wiring.checkpoint_file`` /
``wiring.lifetime`` and the SQuAD span primitives (:mod:`ibert_plugin.squad`); fairseq runs only in the launched
processes, except inside the functions that load a checkpoint to score it (:mod:`.scoring`, with the GLUE label
reader of ``assets``; :mod:`.squad`, with ``wiring`` and the SQuAD dictionary of ``tasks.squad``).
"""
from ..catalog import ARCHS
from ..catalog import GLUE_TASKS as TASKS
from .execute import RunResult, cli, main, parse_best
from .options import RunError
from .plan import fmt_num, user_dir

__all__ = ["main", "cli", "RunResult", "RunError", "parse_best", "fmt_num", "user_dir", "TASKS", "ARCHS"]
