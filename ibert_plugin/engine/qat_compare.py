"""Bit-exactness of the engine against the QAT model it was converted from (tests and benchmarks).

The QAT model's eval-mode integers are read with forward hooks on its own modules (the ``(q, S)`` carriers' ``q``)
and compared with ``IntegerEngine.encode(collect=True)`` by ``torch.equal``. Only the model's module names are used
(fairseq RoBERTa's, see docs/integer_spec.md "Encoder wiring"); nothing here imports fairseq.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

#: Module names inside a layer whose integer outputs the engine reports with ``collect=True``.
HOOKED = ("input_act", "q_act", "k_act", "v_act", "attn_act", "softmax", "attn_residual_act", "self_attn_layer_norm",
          "fc1_act", "gelu", "fc2_act", "ffn_residual_act", "final_layer_norm")
HEAD = "sentence_classification_head"


def qat_outputs(model, tokens: torch.Tensor, head: str = HEAD) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """The QAT model's hooked integer outputs and its logits on ``tokens`` [B, T].

    Returns ``({name: float64 tensor}, logits)``: names ``embed_act``, ``layernorm_embedding`` and
    ``layers.{i}.<HOOKED>`` (``self_attn.`` inside attention) in the order the forward produced them; layer
    outputs transposed from the QAT layout T x B x C to B x T x C (softmax stays B x H x T x T). ``head=None``:
    features only, logits ``None``.
    """
    outs, hooks = {}, []
    for name, mod in model.encoder.sentence_encoder.named_modules():
        if name in ("embed_act", "layernorm_embedding") or (name.startswith("layers.")
                                                            and name.split(".")[-1] in HOOKED):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: outs.__setitem__(n, o[0].detach())))
    try:
        with torch.no_grad():
            if head is None:
                model(tokens, features_only=True)
                logits = None
            else:
                logits, _ = model(tokens, features_only=True, classification_head_name=head)
    finally:
        for h in hooks:
            h.remove()
    for k, v in outs.items():
        v = v.double()
        if k.startswith("layers.") and not k.endswith("softmax"):
            v = v.transpose(0, 1)
        outs[k] = v
    return outs, logits


def differing(ref: Dict[str, torch.Tensor], other: Dict[str, torch.Tensor], tokens: torch.Tensor,
              padding_idx: int) -> Dict[str, int]:
    """``{name: number of differing integers}`` between two sets of hooked outputs (``torch.equal`` per name, after
    zeroing the rows of padding tokens on both sides); a name missing from ``other`` counts all of its integers.

    Padding rows are zeroed because the QAT ``layernorm_embedding`` hook sees them before they are zeroed and the
    engine after; they never reach a real token. In the softmax output the padding *keys* are compared unmasked
    (both sides must give them probability 0).
    """
    keep = tokens.ne(padding_idx)
    bad = {}
    for k, v in ref.items():
        if k not in other:
            bad[k] = v.numel()
            continue
        a = other[k].double().cpu()
        v = v.double().cpu().reshape(a.shape)
        row = keep[:, None, :, None] if k.endswith("softmax") else keep[:, :, None]  # query rows
        a, v = a * row, v * row
        if not torch.equal(a, v):
            bad[k] = int((a != v).sum())
    return bad


def compare(eng, model, tokens: torch.Tensor, head: str = HEAD):
    """Every hooked QAT integer output against the engine's integers on ``tokens``, with ``torch.equal``
    (padding rows as :func:`differing` says).

    Returns ``(QAT outputs as from qat_outputs, {name: number of differing integers}, QAT logits)``.
    """
    outs, logits = qat_outputs(model, tokens, head)
    _, _, acts = eng.encode(tokens, collect=True)
    return outs, differing(outs, acts, tokens, model.encoder.sentence_encoder.padding_idx), logits


def compare_devices(model, other, tokens: torch.Tensor, head: str = HEAD):
    """The same checkpoint's QAT model on two devices (``model`` and ``other``, both in eval mode, e.g. CPU and
    CUDA): every hooked integer output compared with ``torch.equal``, and the logits.

    ``tokens`` may live anywhere; each model gets a copy on its own device. Returns
    ``({name: number of differing integers}, number of outputs compared, logits of model, logits of other)``, the
    logits on the CPU (``None`` when ``head`` is ``None``).
    """
    def run(m):
        dev = next(m.parameters()).device
        outs, logits = qat_outputs(m, tokens.to(dev), head)
        return outs, None if logits is None else logits.float().cpu()

    outs_a, logits_a = run(model)
    outs_b, logits_b = run(other)
    bad = differing(outs_a, outs_b, tokens.cpu(), model.encoder.sentence_encoder.padding_idx)
    return bad, len(outs_a), logits_a, logits_b
