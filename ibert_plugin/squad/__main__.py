"""``python -m ibert_plugin.squad``: the SQuAD recipe (:mod:`ibert_plugin.squad.recipe`)."""
import sys

from .recipe import run_squad

sys.exit(run_squad(sys.argv[1:]))
