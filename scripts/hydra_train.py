#!/usr/bin/env python3
"""``fairseq-hydra-train`` with the ibert_plugin registered first.

fairseq's hydra entry point runs ``add_defaults`` before it imports ``common.user_dir``, so plugin criteria and models
would be invisible to the config merge; this wrapper imports the plugin, then calls
``fairseq_cli.hydra_train.cli_main()``. It also defaults ``--config-dir`` to ``<repo>/configs`` and sets
``common.user_dir`` to the plugin's absolute path (``$IBERT_USER_DIR`` overrides it) unless given.

    python scripts/hydra_train.py --config-name rte task.data=data/glue-bin/RTE-bin \\
        checkpoint.finetune_from_model=models/roberta.base/model.pt
    # I-BERT QAT from the FP stage:
    python scripts/hydra_train.py --config-name rte task.data=data/glue-bin/RTE-bin model.quant_mode=symmetric \\
        lr_scheduler.warmup_updates=0 'optimization.lr=[1e-6]' checkpoint.finetune_from_model=<fp checkpoint_best.pt>
"""
import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    user_dir = Path(os.environ.get("IBERT_USER_DIR") or REPO / "ibert_plugin").resolve()
    sys.path.insert(0, str(user_dir.parent))
    importlib.import_module(user_dir.name)  # registers models / criteria before hydra merges the config

    argv = sys.argv[1:]
    if not any(a == "--config-dir" or a.startswith("--config-dir=") or a == "-cd" for a in argv):
        argv = ["--config-dir", str(REPO / "configs")] + argv
    if not any(a.lstrip("+").startswith("common.user_dir=") for a in argv):
        argv.append(f"common.user_dir={user_dir}")
    sys.argv = [sys.argv[0]] + argv

    from fairseq_cli.hydra_train import cli_main

    cli_main()


if __name__ == "__main__":
    main()
