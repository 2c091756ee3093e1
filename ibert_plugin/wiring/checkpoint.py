"""Plugin models from fairseq checkpoints and packed files (the fairseq side of :mod:`ibert_plugin.quant.packing`).

Importing this module imports fairseq and registers the plugin (:func:`ibert_plugin.wiring.register`).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List, Tuple

from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY
from torch import nn

from ..quant.packing import freeze_weight_quantizers, plain_cfg, unpack
from . import register
from .checkpoint_file import check_fairseq_checkpoint, read_checkpoint

__all__ = ["build_model_for_state", "load_checkpoint_model", "load_packed_model"]

logger = logging.getLogger(__name__)

register()


class _StubTask:
    """What ``RobertaModel.build_model`` needs from a task: a dictionary of the right size and max_positions."""

    def __init__(self, vocab_size: int, max_positions: int = 512):
        d = Dictionary()
        i = 0
        while len(d) < vocab_size:
            d.add_symbol(f"<packed_{i}>")
            i += 1
        self.source_dictionary = d
        self.target_dictionary = d
        self._max_positions = max_positions

    def max_positions(self):
        return self._max_positions


def _model_args(model_cfg: Any) -> argparse.Namespace:
    d = plain_cfg(model_cfg)
    if not isinstance(d, dict) or not d:
        raise ValueError("checkpoint has no model configuration")
    return argparse.Namespace(**d)


def build_model_for_state(model_cfg: Any, state_shapes: Dict[str, List[int]]) -> nn.Module:
    """Build the fairseq model described by ``model_cfg`` (classification heads taken from the state's keys).

    Args:
        model_cfg: the checkpoint's ``cfg["model"]`` (Namespace / DictConfig / dict) with ``arch`` or ``_name``.
        state_shapes: ``{name: shape}`` of the state dict to be loaded.
    """
    args = _model_args(model_cfg)
    arch = getattr(args, "arch", None) or getattr(args, "_name", None)
    if arch not in ARCH_MODEL_REGISTRY:
        raise ValueError(f"unknown architecture {arch!r} in the checkpoint configuration")
    vocab = int(state_shapes["encoder.sentence_encoder.embed_tokens.weight"][0])
    max_pos = int(getattr(args, "max_positions", 512) or 512)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, _StubTask(vocab, max_pos))
    heads = {}
    for k, shape in state_shapes.items():
        if k.startswith("classification_heads.") and k.endswith(".out_proj.weight"):
            name = k[len("classification_heads."):-len(".out_proj.weight")]
            heads[name] = (int(shape[0]), int(state_shapes[f"classification_heads.{name}.dense.weight"][0]))
    for name, (num_classes, inner_dim) in heads.items():
        model.register_classification_head(name, num_classes=num_classes, inner_dim=inner_dim)
    return model


def load_packed_model(packed: Any) -> nn.Module:
    """Rebuild the frozen fake-quant model from a packed dict or file path (eval mode)."""
    if isinstance(packed, (str, bytes)) or hasattr(packed, "__fspath__"):
        packed = read_checkpoint(str(packed))
    sd = unpack(packed)
    shapes = {k: list(v.shape) for k, v in sd.items()}
    model = build_model_for_state(packed["cfg"].get("model"), shapes)
    freeze_weight_quantizers(model, packed["quantized"])
    omitted = packed.get("omitted") or []
    if omitted:
        fresh = model.state_dict()
        for name in omitted:
            sd[name] = fresh[name]
        logger.warning("packed model omits %d tensors (%s...): re-initialised, do not use them", len(omitted),
                       omitted[0])
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_checkpoint_model(path: str) -> Tuple[nn.Module, Any]:
    """Load a fairseq checkpoint produced by ``fairseq-train --user-dir ibert_plugin`` (no data dir needed).

    Returns:
        ``(model in eval mode, cfg)``.

    Raises:
        ibert_plugin.wiring.checkpoint_file.CheckpointError: missing, unreadable or non-fairseq file.
    """
    from fairseq import checkpoint_utils

    check_fairseq_checkpoint(path)
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    cfg = state.get("cfg")
    model_cfg = cfg["model"] if cfg is not None else state.get("args")
    if model_cfg is None:
        raise ValueError(f"{path}: no model configuration in the checkpoint")
    sd = state["model"]
    model = build_model_for_state(model_cfg, {k: list(v.shape) for k, v in sd.items()})
    model.load_state_dict(sd, strict=True, model_cfg=model_cfg if cfg is not None else None)
    return model.eval(), cfg if cfg is not None else {"model": model_cfg}
