"""I-BERT / TernaryBERT quantization plugin for fairseq (``--user-dir ibert_plugin``).

Importing the package registers the quantized RoBERTa architectures, the distillation criterion and the
WordPiece BPE with fairseq, and allows fairseq checkpoints (which pickle ``argparse.Namespace``) to load under
torch's ``weights_only=True`` default without switching that safety off globally.
"""
import argparse

import torch

torch.serialization.add_safe_globals([argparse.Namespace])

from . import models  # noqa: E402,F401  (registration side effects)
from . import criterions  # noqa: E402,F401
from .assets import wordpiece_bpe  # noqa: E402,F401
