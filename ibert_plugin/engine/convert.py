"""Conversion of a symmetric-mode (I-BERT) ``ibert_roberta`` model to integer constants for the engine.

Two stages:

1. ``QState`` / ``LayerState``: the float-level content of a QAT model in eval mode: integer weights with their
   per-channel scales (from the model's own weight quantizers), float biases, frozen activation ranges, LayerNorm
   affine parameters and shifts. :func:`qstate_from_model` reads it from an ``ibert_roberta`` model (or a stand-alone
   stack with the spec's module names).
2. :func:`compile_qstate`: every integer constant of the spec (dyadic ``(m, e)``, int32 biases, LayerNorm ``b_int``,
   i-GELU constants, the i-exp LUT), computed with the QAT code's primitives when ``ibert_plugin.quant`` provides them
   (identical constants) and with ``engine.reference`` otherwise.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import EngineError
from . import reference as R

f32, f64, i64 = torch.float32, torch.float64, torch.int64


# ------------------------------------------------------------------------------------------------------------------
# primitives: the QAT code's own, when importable
# ------------------------------------------------------------------------------------------------------------------
def _primitives():
    try:
        from ibert_plugin.quant import primitives as P  # type: ignore

        return P
    except Exception:  # not written yet / import error: spec reference
        return None


def symmetric_scale(x_min, x_max, bits):
    P = _primitives()
    if P is not None and hasattr(P, "symmetric_scale"):
        return P.symmetric_scale(x_min, x_max, bits).to(f32)
    return R.symmetric_scale(x_min, x_max, bits)


def dyadic(ratio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    P = _primitives()
    if P is not None and hasattr(P, "dyadic"):
        m, e = P.dyadic(ratio.to(f64))
    else:
        m, e = R.dyadic(ratio)
    return m.to(f64), e.to(f64)


def requant_consts(s_in: torch.Tensor, s_out: torch.Tensor, max_e: int = 62) -> Tuple[torch.Tensor, torch.Tensor]:
    """(m, e) as int64 for requantizing scale ``s_in`` (per tensor or per channel) to ``s_out``."""
    m, e = dyadic(s_in.to(f64) / s_out.to(f64))
    if int(e.min()) < 1:
        raise EngineError(f"requant ratio too large (e = {int(e.min())} < 1)")
    if int(e.max()) > max_e:
        raise EngineError(f"requant ratio too small (e = {int(e.max())} > {max_e})")
    return m.to(i64), e.to(i64)


# ------------------------------------------------------------------------------------------------------------------
# float-level state
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Linear:
    w_int: torch.Tensor  # [N, K] integer-valued (int64)
    s_w: torch.Tensor  # [N] float32
    bias: torch.Tensor  # [N] float32


@dataclass
class LNState:
    gamma: torch.Tensor
    beta: torch.Tensor
    shift: int


Range = Tuple[torch.Tensor, torch.Tensor]  # (x_min, x_max) float32 (1,)


@dataclass
class LayerState:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    fc1: Linear
    fc2: Linear
    ranges: Dict[str, Range]  # input_act, q_act, k_act, v_act, attn_act, attn_residual_act, fc1_act, fc2_act, ffn_residual_act
    attn_ln: LNState
    ffn_ln: LNState
    heads: int


@dataclass
class QState:
    tok_w: torch.Tensor  # float [V, D]
    pos_w: torch.Tensor  # float [P, D]
    padding_idx: int
    embed_range: Range
    emb_ln: LNState
    layers: List[LayerState]
    act_bits: int = 8
    residual_bits: int = 22
    embed_act_bits: int = 16
    head: Optional[Dict[str, torch.Tensor]] = None  # dense.weight/bias, out_proj.weight/bias (float)
    weight_bits: int = 8
    ternary: bool = False
    # integer embedding tables from the QAT model's own quantizer (else quantized here from tok_w / pos_w)
    tok_int: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    pos_int: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


# ------------------------------------------------------------------------------------------------------------------
# integer constants
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class IntLinear:
    w_int: torch.Tensor  # int8 [N, K]
    s_acc: torch.Tensor  # float32 [N]
    b_int: torch.Tensor  # int64 [N]


@dataclass
class IntLN:
    shift: int
    b_int: torch.Tensor  # int64 [C]
    s_out: torch.Tensor  # float32 [C]


@dataclass
class IntLayer:
    qkv: IntLinear
    o: IntLinear
    fc1: IntLinear
    fc2: IntLinear
    heads: int
    in_m: torch.Tensor  # input_act requant from the previous LN (per channel)
    in_e: torch.Tensor
    s_x: torch.Tensor  # input_act scale (1,)
    qkv_m: torch.Tensor
    qkv_e: torch.Tensor
    s_qkv: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    lut: torch.Tensor  # int32 i-exp table
    s_scores: torch.Tensor
    ctx_m: int
    ctx_e: int
    s_ctx: torch.Tensor
    ar_m: torch.Tensor  # attn_residual_act: out_proj accumulator -> 22 bit (per channel)
    ar_e: torch.Tensor
    ar_id_m: int  # identity (input_act output) -> 22 bit
    ar_id_e: int
    attn_ln: IntLN
    h_m: torch.Tensor  # fc1_act from attn LN (per channel)
    h_e: torch.Tensor
    s_h: torch.Tensor
    gelu_b: torch.Tensor
    gelu_c: torch.Tensor
    gelu_one: torch.Tensor
    g_m: torch.Tensor  # fc2_act from the GELU scale (per channel)
    g_e: torch.Tensor
    s_g: torch.Tensor
    fr_m: torch.Tensor  # ffn_residual_act: fc2 accumulator -> 22 bit
    fr_e: torch.Tensor
    fr_id_m: int
    fr_id_e: int
    ffn_ln: IntLN


@dataclass
class IntModel:
    tok_w: torch.Tensor  # int8 [V, D]
    pos_w: torch.Tensor  # int8 [P, D]
    padding_idx: int
    emb_tok_m: int
    emb_tok_e: int
    emb_pos_m: int
    emb_pos_e: int
    emb_ln: IntLN
    layers: List[IntLayer]
    act_bits: int
    residual_bits: int
    embed_act_bits: int
    head: Optional[Dict[str, torch.Tensor]]
    weight_bits: int
    ternary: bool
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def s_out(self) -> torch.Tensor:
        return self.layers[-1].ffn_ln.s_out if self.layers else self.emb_ln.s_out


def _quantize_embedding(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    s = (w.detach().abs().max().clamp(min=1e-8) / R.n_bits(8)).to(f32).reshape(1)
    q = torch.clamp(torch.round(w.detach().to(f32) / s), -R.n_bits(8), R.n_bits(8))
    return q.to(torch.int8), s


def _int_linear(lin: Linear, s_x: torch.Tensor) -> IntLinear:
    s_acc = (lin.s_w.to(f32) * s_x.to(f32).reshape(1)).reshape(-1)
    n32 = R.n_bits(32)
    b_int = torch.clamp(torch.round(lin.bias.to(f64) / s_acc.to(f64)), -n32, n32)
    w = lin.w_int.to(i64)
    if int(w.abs().max()) > 127:
        raise EngineError("weights must be at most 8-bit symmetric")
    return IntLinear(w.to(torch.int8), s_acc, b_int.to(i64))


def _int_ln(ln: LNState, C: int) -> IntLN:
    """b_int and S_out from the QAT function itself: on a zero row, ``y = 0`` and ``q_out = b_int``."""
    from ibert_plugin.quant import nonlinear as NL

    with torch.no_grad():
        q0, s_out = NL.int_layernorm(torch.zeros(1, C), torch.ones(1), ln.gamma.detach().float(),
                                     ln.beta.detach().float(), torch.tensor([float(ln.shift)]))
    return IntLN(int(ln.shift), q0.reshape(C).to(i64), s_out.to(f32).reshape(C))


def _act_scale(rng: Range, bits: int) -> torch.Tensor:
    x_min, x_max = rng
    if float(x_min.abs().max()) == 0.0 and float(x_max.abs().max()) == 0.0:
        raise EngineError("uninitialised activation range (x_min = x_max = 0): the model was never calibrated/trained")
    return symmetric_scale(x_min.to(f32), x_max.to(f32), bits).reshape(1)


def compile_qstate(st: QState) -> IntModel:
    """All integer constants of the spec from a float-level state."""
    a8, r22, e16 = st.act_bits, st.residual_bits, st.embed_act_bits
    tok_w, s_tok = st.tok_int if st.tok_int is not None else _quantize_embedding(st.tok_w)
    pos_w, s_pos = st.pos_int if st.pos_int is not None else _quantize_embedding(st.pos_w)
    D = tok_w.shape[1]
    s_emb = _act_scale(st.embed_range, e16)
    tm, te = requant_consts(s_tok, s_emb)
    pm, pe = requant_consts(s_pos, s_emb)
    emb_ln = _int_ln(st.emb_ln, D)
    prev_s = emb_ln.s_out
    layers = []
    for L in st.layers:
        rg = L.ranges
        s_x = _act_scale(rg["input_act"], a8)
        in_m, in_e = requant_consts(prev_s, s_x)
        qkv_parts, s_qkv, mm, ee = [], [], [], []
        for name, lin in (("q_act", L.q), ("k_act", L.k), ("v_act", L.v)):
            il = _int_linear(lin, s_x)
            s_a = _act_scale(rg[name], a8)
            m, e = requant_consts(il.s_acc, s_a)
            qkv_parts.append(il)
            s_qkv.append(s_a)
            mm.append(m)
            ee.append(e)
        qkv = IntLinear(torch.cat([p.w_int for p in qkv_parts]), torch.cat([p.s_acc for p in qkv_parts]),
                        torch.cat([p.b_int for p in qkv_parts]))
        dh = D // L.heads
        s_scores = (s_qkv[0] * s_qkv[1] * (dh ** -0.5)).to(f32)
        lut = _exp_lut(float(s_scores))
        s_ctx_in = (s_qkv[2] / 255.0).to(f32)
        s_ctx = _act_scale(rg["attn_act"], a8)
        cm, ce = requant_consts(s_ctx_in, s_ctx)
        o = _int_linear(L.o, s_ctx)
        s_ar = _act_scale(rg["attn_residual_act"], r22)
        ar_m, ar_e = requant_consts(o.s_acc, s_ar)
        ar_id_m, ar_id_e = requant_consts(s_x, s_ar)
        attn_ln = _int_ln(L.attn_ln, D)
        s_h = _act_scale(rg["fc1_act"], a8)
        h_m, h_e = requant_consts(attn_ln.s_out, s_h)
        fc1 = _int_linear(L.fc1, s_h)
        gb, gc, gone, s_gelu = _gelu_consts(fc1.s_acc)
        s_g = _act_scale(rg["fc2_act"], a8)
        g_m, g_e = requant_consts(s_gelu, s_g, max_e=10 ** 6)
        fc2 = _int_linear(L.fc2, s_g)
        s_fr = _act_scale(rg["ffn_residual_act"], r22)
        fr_m, fr_e = requant_consts(fc2.s_acc, s_fr)
        fr_id_m, fr_id_e = requant_consts(s_h, s_fr)
        ffn_ln = _int_ln(L.ffn_ln, D)
        layers.append(IntLayer(
            qkv=qkv, o=o, fc1=fc1, fc2=fc2, heads=L.heads, in_m=in_m.expand(D).contiguous(),
            in_e=in_e.expand(D).contiguous(), s_x=s_x, qkv_m=torch.cat(mm), qkv_e=torch.cat(ee), s_qkv=tuple(s_qkv),
            lut=lut, s_scores=s_scores, ctx_m=int(cm), ctx_e=int(ce), s_ctx=s_ctx, ar_m=ar_m, ar_e=ar_e,
            ar_id_m=int(ar_id_m), ar_id_e=int(ar_id_e), attn_ln=attn_ln, h_m=h_m, h_e=h_e, s_h=s_h,
            gelu_b=gb, gelu_c=gc, gelu_one=gone, g_m=g_m, g_e=g_e, s_g=s_g, fr_m=fr_m, fr_e=fr_e,
            fr_id_m=int(fr_id_m), fr_id_e=int(fr_id_e), ffn_ln=ffn_ln))
        prev_s = ffn_ln.s_out
    return IntModel(tok_w=tok_w, pos_w=pos_w, padding_idx=st.padding_idx, emb_tok_m=int(tm), emb_tok_e=int(te),
                    emb_pos_m=int(pm), emb_pos_e=int(pe), emb_ln=emb_ln, layers=layers, act_bits=a8,
                    residual_bits=r22, embed_act_bits=e16, head=st.head, weight_bits=st.weight_bits,
                    ternary=st.ternary, info={"s_tok": s_tok, "s_pos": s_pos, "s_emb": s_emb})


def _gelu_consts(s_acc: torch.Tensor):
    b_int, c_int, one, s_out = R.gelu_consts(s_acc.to(f32))
    return b_int.to(i64), c_int.to(i64), one.to(i64), s_out


def _exp_lut(S: float) -> torch.Tensor:
    x0 = R.softmax_consts(S)[0]
    if 30 * abs(x0) + 1 > (1 << 25):
        raise EngineError(f"softmax scale {S:g} too small for the i-exp table")
    lut = R.exp_lut(S)
    nz = torch.nonzero(lut).flatten()
    last = int(nz[-1]) if nz.numel() else 0
    # entries past the last non-zero one are all 0: keep one 0 at the end (indices are clamped to the last entry)
    return lut[: last + 2].clone()


# ------------------------------------------------------------------------------------------------------------------
# from an ibert_roberta model / checkpoint
# ------------------------------------------------------------------------------------------------------------------
def _cfg_of(model):
    enc = getattr(model, "encoder", None)
    cfg = getattr(enc, "qcfg", None)
    if cfg is None:
        raise EngineError("not an ibert_roberta model (no quantization config on model.encoder)")
    return cfg


@torch.no_grad()
def _linear_state(mod) -> Linear:
    from ibert_plugin.quant.primitives import SCALE_EPS, qmax

    w_int, s_w = mod.weight_quantizer(mod.weight)
    w_bits = int(getattr(mod.weight_quantizer, "bits", mod.cfg.weight_bits))
    s_w = s_w.detach().float().reshape(-1).clamp(min=SCALE_EPS / qmax(w_bits))
    if s_w.numel() == 1:
        s_w = s_w.expand(w_int.shape[0]).contiguous()
    bias = mod.bias.detach().float() if mod.bias is not None else torch.zeros(w_int.shape[0])
    return Linear(w_int.detach().round().to(i64), s_w, bias)


def _range(act) -> Range:
    return (act.x_min.detach().float().reshape(1), act.x_max.detach().float().reshape(1))


def _ln_state(ln) -> LNState:
    shift = float(ln.shift.reshape(-1)[0]) if hasattr(ln, "shift") else 0.0
    return LNState(ln.weight.detach().float(), ln.bias.detach().float(), int(shift))


@torch.no_grad()
def qstate_from_model(model, head_name: str = "sentence_classification_head") -> QState:
    """Float-level state of an ``ibert_roberta`` model in symmetric mode (eval)."""
    from ibert_plugin.quant.modules import QuantEmbedding

    cfg = _cfg_of(model)
    if cfg.quant_mode != "symmetric":
        raise EngineError(f"the integer engine needs a symmetric-mode (I-BERT) model, got quant_mode "
                          f"{cfg.quant_mode!r}")
    fd = getattr(cfg, "force_dequant", "none")
    if fd not in (None, "none"):
        raise EngineError(f"force_dequant={fd!r} keeps nonlinear ops in float: not an integer-only model")
    if getattr(cfg, "act_bits", 8) != 8 or getattr(cfg, "softmax_out_bits", 8) != 8:
        raise EngineError("the engine supports 8-bit activations and 8-bit softmax outputs")
    if getattr(cfg, "bias_bits", 32) != 32 or getattr(cfg, "embed_bits", 8) != 8:
        raise EngineError("the engine supports 32-bit biases and 8-bit embedding tables")
    if getattr(cfg, "residual_bits", 22) > 24 or getattr(cfg, "embed_act_bits", 16) > 24:
        raise EngineError("residual / embedding-sum bit-widths above 24 are not supported")
    se = model.encoder.sentence_encoder
    V = se.embed_tokens.weight.shape[0]
    tok_rows, s_tok = se.embed_tokens(torch.arange(V))
    P = se.embed_positions.weight.shape[0]
    pos_rows, s_pos = QuantEmbedding.forward(se.embed_positions, torch.arange(P))
    layers = []
    for lay in se.layers:
        sa = lay.self_attn
        ranges = {n: _range(getattr(lay, n)) for n in ("input_act", "attn_residual_act", "fc1_act", "fc2_act",
                                                       "ffn_residual_act")}
        ranges.update({n: _range(getattr(sa, n)) for n in ("q_act", "k_act", "v_act", "attn_act")})
        layers.append(LayerState(q=_linear_state(sa.q_proj), k=_linear_state(sa.k_proj), v=_linear_state(sa.v_proj),
                                 o=_linear_state(sa.out_proj), fc1=_linear_state(lay.fc1), fc2=_linear_state(lay.fc2),
                                 ranges=ranges, attn_ln=_ln_state(lay.self_attn_layer_norm),
                                 ffn_ln=_ln_state(lay.final_layer_norm), heads=sa.num_heads))
    head = None
    heads = getattr(model, "classification_heads", {})
    if head_name in heads:
        h = heads[head_name]
        dense_w = h.dense.weight.detach().float()
        head = {"dense.weight": dense_w, "dense.bias": h.dense.bias.detach().float(),
                "out_proj.weight": h.out_proj.weight.detach().float(),
                "out_proj.bias": h.out_proj.bias.detach().float()}
    wb = int(getattr(cfg, "weight_bits", 8))
    return QState(tok_w=se.embed_tokens.weight.detach(), pos_w=se.embed_positions.weight.detach(),
                  padding_idx=int(se.padding_idx), embed_range=_range(se.embed_act),
                  emb_ln=_ln_state(se.layernorm_embedding), layers=layers,
                  act_bits=int(cfg.act_bits), residual_bits=int(cfg.residual_bits),
                  embed_act_bits=int(cfg.embed_act_bits), head=head, weight_bits=wb, ternary=wb == 2,
                  tok_int=(tok_rows.round().to(torch.int8), s_tok.float().reshape(1)),
                  pos_int=(pos_rows.round().to(torch.int8), s_pos.float().reshape(1)))


def from_model(model, threads: Optional[int] = None, route: str = "auto"):
    """In-memory ``ibert_roberta`` model (symmetric mode) -> :class:`engine.IntegerEngine`."""
    from .engine import IntegerEngine

    if model.training:
        raise EngineError("convert the model in eval mode (model.eval())")
    return IntegerEngine(compile_qstate(qstate_from_model(model)), threads=threads, route=route)


def load_qat_checkpoint(path: str, dict_size: Optional[int] = None):
    """(model in eval mode, cfg) of a fairseq ``ibert_roberta`` checkpoint, with clear errors."""
    if not os.path.isfile(path):
        raise EngineError(f"checkpoint not found: {path}")
    from ibert_plugin.quant.packing import load_checkpoint_model

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
