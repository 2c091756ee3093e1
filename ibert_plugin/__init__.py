"""I-BERT / TernaryBERT quantization plugin for fairseq (``--user-dir ibert_plugin``).

Importing the package registers the quantized RoBERTa architectures, the distillation criterion and the
WordPiece BPE with fairseq, and allows fairseq checkpoints (which pickle ``argparse.Namespace`` and numpy metric scalars) to load under
torch's ``weights_only=True`` default without switching that safety off globally.
"""
import argparse

import numpy as np
import torch

# fairseq pickles its args as argparse.Namespace, and best-checkpoint metrics such as mcc or acc_and_f1 as numpy
# scalars; allow exactly those types instead of turning weights_only off.
torch.serialization.add_safe_globals(
    [argparse.Namespace, np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]
)

from . import models  # noqa: E402,F401  (registration side effects)
from . import criterions  # noqa: E402,F401
from .assets import wordpiece_bpe  # noqa: E402,F401
