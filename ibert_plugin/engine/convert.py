"""Conversion of a symmetric-mode (I-BERT) ``ibert_roberta`` model to the engine's :class:`IntModel`.

The converter computes nothing itself: every integer constant (int8 weights, int32 biases, dyadic ``(m, e)``,
LayerNorm ``b_int``, i-GELU constants, the i-exp table) and every derived scale comes from the model's own
``int_form()`` (``QuantTransformerEncoder.int_form`` and the modules' ``int_form``), i.e. from the functions the QAT
forward itself runs (``quant.primitives`` / ``quant.nonlinear``). This module only checks that the constants fit
the engine's kernels (clear :class:`EngineError` otherwise) and lays them out as int64 tensors.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from . import EngineError
from .engine import IntegerEngine
from .intmodel import Dyadic, IntLayer, IntLinear, IntLN, IntModel

f32, f64, i64 = torch.float32, torch.float64, torch.int64

# ------------------------------------------------------------------------------------------------------------------
# checks and layout of the modules' integer forms
# ------------------------------------------------------------------------------------------------------------------
def _dyadic(act, what: str, per_channel: Optional[int] = None, identity: bool = False) -> Dyadic:
    """The requantization ratio of a QAT activation quantizer's integer form (``act.m`` / ``act.e``, or the identity
    branch's ``act.m_id`` / ``act.e_id``): int64 ``[per_channel]`` tensors (a per-tensor ratio is broadcast), or
    Python ints when ``per_channel`` is None (the ratio must then be per tensor). Any shift is kept: the kernels cap
    where it cannot matter (kernels.cpp)."""
    m, e = (act.m_id, act.e_id) if identity else (act.m, act.e)
    m, e = m.reshape(-1).to(i64).contiguous(), e.reshape(-1).to(i64).contiguous()
    if per_channel is None:
        if m.numel() != 1 or e.numel() != 1:
            raise EngineError(f"{what}: expected a per-tensor requant ratio")
        return Dyadic(int(m[0]), int(e[0]))
    if m.numel() == 1 and per_channel != 1:
        m, e = m.expand(per_channel).contiguous(), e.expand(per_channel).contiguous()
    return Dyadic(m, e)


def _linear(form, what: str) -> IntLinear:
    if form.w_bits > 8:
        raise EngineError(f"{what}: weights must be at most 8-bit symmetric")
    return IntLinear(form.w_int, form.s_acc.to(f32), form.b_int.to(i64))


def _ln(form) -> IntLN:
    return IntLN(int(form.shift), form.b_int.to(i64).contiguous(), form.s_out.to(f32).contiguous())


def _layer(f: dict, heads: int, D: int, name: str) -> IntLayer:
    att = f["self_attn"]
    qkv_parts = [_linear(att[n], name + n) for n in ("q_proj", "k_proj", "v_proj")]
    qkv = IntLinear(torch.cat([p.weight for p in qkv_parts]), torch.cat([p.acc_scale for p in qkv_parts]),
                    torch.cat([p.bias for p in qkv_parts]))
    qkv_req = [_dyadic(att[n], name + n, per_channel=D) for n in ("q_act", "k_act", "v_act")]
    ra, fa, g = f["attn_residual_act"], f["ffn_residual_act"], f["gelu"]
    fc1 = _linear(f["fc1"], name + "fc1")
    return IntLayer(
        qkv=qkv, out_proj=_linear(att["out_proj"], name + "out_proj"), fc1=fc1, fc2=_linear(f["fc2"], name + "fc2"),
        heads=heads,
        input_requant=_dyadic(f["input_act"], name + "input_act", per_channel=D), input_scale=f["input_act"].s_out,
        qkv_requant=Dyadic(torch.cat([r.multiplier for r in qkv_req]), torch.cat([r.shift for r in qkv_req])),
        qkv_scales=tuple(att[n].s_out for n in ("q_act", "k_act", "v_act")),
        exp_table=att["softmax"].lut, score_scale=att["s_scores"],
        context_requant=_dyadic(att["attn_act"], name + "attn_act"), context_scale=att["attn_act"].s_out,
        attn_residual_requant=_dyadic(ra, name + "attn_residual_act", per_channel=D),
        attn_identity_requant=_dyadic(ra, name + "attn_residual_act", identity=True),
        attn_ln=_ln(f["self_attn_layer_norm"]),
        fc1_input_requant=_dyadic(f["fc1_act"], name + "fc1_act", per_channel=D), fc1_input_scale=f["fc1_act"].s_out,
        gelu_shift=g.shift.to(i64).contiguous(), gelu_b=g.b_int.to(i64).contiguous(),
        gelu_c=g.c_int.to(i64).contiguous(), gelu_one=g.one.to(i64).contiguous(),
        # exact saturating split in gelu_u8
        fc2_input_requant=_dyadic(f["fc2_act"], name + "fc2_act", per_channel=fc1.weight.shape[0]),
        fc2_input_scale=f["fc2_act"].s_out,
        ffn_residual_requant=_dyadic(fa, name + "ffn_residual_act", per_channel=D),
        ffn_identity_requant=_dyadic(fa, name + "ffn_residual_act", identity=True),
        ffn_ln=_ln(f["final_layer_norm"]))


def _cfg_of(model):
    enc = getattr(model, "encoder", None)
    cfg = getattr(enc, "qcfg", None)
    if cfg is None:
        raise EngineError("not an ibert_roberta model (no quantization config on model.encoder)")
    return cfg


def _check_cfg(cfg) -> None:
    if cfg.quant_mode != "symmetric":
        raise EngineError(f"the integer engine needs a symmetric-mode (I-BERT) model, got quant_mode "
                          f"{cfg.quant_mode!r}")
    if cfg.force_dequant not in (None, "none"):
        raise EngineError(f"force_dequant={cfg.force_dequant!r} keeps nonlinear ops in float: not an integer-only "
                          f"model")
    if cfg.act_bits != 8 or cfg.softmax_out_bits != 8:
        raise EngineError("the engine supports 8-bit activations and 8-bit softmax outputs")
    if cfg.bias_bits != 32 or cfg.embed_bits != 8:
        raise EngineError("the engine supports 32-bit biases and 8-bit embedding tables")


@torch.no_grad()
def head_from_model(model, head_name: str = "sentence_classification_head") -> Optional[Dict[str, torch.Tensor]]:
    """The float classification head (``dense``, ``out_proj`` weights and biases, float32) or None."""
    heads = getattr(model, "classification_heads", {})
    if head_name not in heads:
        return None
    h = heads[head_name]
    return {"dense.weight": h.dense.weight.detach().float(), "dense.bias": h.dense.bias.detach().float(),
            "out_proj.weight": h.out_proj.weight.detach().float(), "out_proj.bias": h.out_proj.bias.detach().float()}


@torch.no_grad()
def compile_model(model, head_name: str = "sentence_classification_head") -> IntModel:
    """:class:`IntModel` of an ``ibert_roberta`` model in symmetric mode, from its ``int_form()``."""
    cfg = _cfg_of(model)
    _check_cfg(cfg)
    se = model.encoder.sentence_encoder
    try:
        f = se.int_form()
    except ValueError as exc:  # uninitialised ranges and the like: the modules' own one-line reasons
        raise EngineError(str(exc)) from exc
    tok_w, s_tok = f["embed_tokens"]
    pos_w, s_pos = f["embed_positions"]
    ea = f["embed_act"]
    D = tok_w.shape[1]
    layers = [_layer(lf, lay.self_attn.num_heads, D, f"layers.{i}.") for i, (lf, lay) in
              enumerate(zip(f["layers"], se.layers))]
    wb = int(cfg.weight_bits)
    return IntModel(token_table=tok_w, position_table=pos_w, padding_idx=int(se.padding_idx),
                    token_requant=_dyadic(ea, "embed_act"), position_requant=_dyadic(ea, "embed_act", identity=True),
                    emb_ln=_ln(f["layernorm_embedding"]), layers=layers,
                    act_bits=int(cfg.act_bits), residual_bits=int(cfg.residual_bits),
                    embed_act_bits=int(cfg.embed_act_bits), head=head_from_model(model, head_name), weight_bits=wb,
                    ternary=wb == 2, info={"s_tok": s_tok, "s_pos": s_pos, "s_emb": ea.s_out,
                                           "nonlinear_constants": cfg.nonlinear_constants})


def from_model(model, threads: Optional[int] = None, route: str = "auto"):
    """In-memory ``ibert_roberta`` model (symmetric mode) -> :class:`engine.IntegerEngine`."""
    if model.training:
        raise EngineError("convert the model in eval mode (model.eval())")
    return IntegerEngine(compile_model(model), threads=threads, route=route)


def load_qat_checkpoint(path: str, dict_size: Optional[int] = None):
    """(model in eval mode, cfg) of a fairseq ``ibert_roberta`` checkpoint, with clear errors."""
    if not os.path.isfile(path):
        raise EngineError(f"checkpoint not found: {path}")
    from ibert_plugin.wiring.checkpoint import load_checkpoint_model  # the fairseq side, imported on demand

    try:
        model, cfg = load_checkpoint_model(path)
    except EngineError:
        raise
    except Exception as exc:  # corrupt file, wrong architecture ...
        raise EngineError(f"cannot load checkpoint {path}: {exc}") from exc
    _cfg_of(model)
    V = model.encoder.sentence_encoder.embed_tokens.weight.shape[0]
    if dict_size is not None and dict_size != V:
        raise EngineError(f"dictionary size mismatch: data dictionary has {dict_size} entries, the checkpoint's "
                          f"embedding table {V}")
    return model, cfg


def from_checkpoint(path: str, threads: Optional[int] = None, route: str = "auto", dict_size: Optional[int] = None):
    model, cfg = load_qat_checkpoint(path, dict_size)
    return from_model(model, threads=threads, route=route), model, cfg
