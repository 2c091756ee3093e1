"""``python -m ibert_plugin.squad``: an alias of the SQuAD driver, ``python run.py --task SQUAD1|SQUAD2 ...``
(:func:`ibert_plugin.recipes.squad.run_squad`; same flags, same stages and output folders)."""
import sys

from ..recipes.squad import run_squad

sys.exit(run_squad(sys.argv[1:]))
