#!/usr/bin/env python3
"""GLUE-style fine-tuning driver for the ``ibert_plugin`` fairseq plugin (I-BERT seed interface, fixed).

Stages (``--quant-mode``): ``none`` (FP fine-tuning from a pretrained ``model.pt``), ``symmetric`` (I-BERT
integer-only QAT from the FP ``checkpoint_best.pt``, the seed's default) and ``ternarybert`` (TernaryBERT
distillation, optionally ``--integer-only`` and ``--save-quantized-model``). Each launches ``fairseq-train
--user-dir <abs path of ibert_plugin>`` (``$IBERT_USER_DIR`` overrides it), tees its output to
``<output-dir>/<mode>/<TASK>-<size>/wd<wd>_ad<ad>_d<d>_lr<lr>/<MMDD-HHMMSS>.log`` and resumes an unfinished run of
the same command (``--fresh``: a new one). The recipes, the task table and the output layout are documented in
:mod:`ibert_plugin.recipes`; ``python run.py --help`` lists the flags.

Usage::

    python run.py --arch roberta_base --task MRPC --quant-mode none            # FP fine-tuning from models/roberta.base
    python run.py --arch roberta_base --task MRPC --restore-file <fp checkpoint_best.pt> --lr 1e-6   # I-BERT QAT
    python run.py --arch minilm --task SST-2 --quant-mode none --restore-file data/minilm/model.pt
    python run.py --arch roberta_base --task RTE --quant-mode ternarybert --restore-file <fp ckpt> \\
        --pred-distill --intermediate-distill --save-quantized-model
    python run.py ... --dry-run        # print the fairseq-train command and exit

In Python: ``run.main(argv) -> RunResult`` (raises ``RunError`` for usage errors); ``run.cli(argv) -> exit code``.
Bad input: one ``error:`` line on stderr, exit 2.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this checkout's ibert_plugin, also when run from elsewhere

from ibert_plugin.recipes import ARCHS, TASKS, RunError, RunResult, cli, main, parse_best  # noqa: E402
from ibert_plugin.recipes.plan import fmt_num, user_dir  # noqa: E402

USER_DIR = user_dir()

__all__ = ["main", "cli", "RunError", "RunResult", "TASKS", "ARCHS", "USER_DIR", "parse_best", "fmt_num"]

if __name__ == "__main__":
    sys.exit(cli())
