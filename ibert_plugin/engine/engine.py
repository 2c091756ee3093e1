"""The integer inference engine: token ids -> integer encoder output (-> float classification head).

Per layer (batch B, sequence T, M = B*T rows, u8 buffers hold s8 + 128):

    x_u8 --QKV GEMM--> acc --requant_qkv--> q [B,H,T,d], k^T [B,H,d,T], v [B,H,T,d]
    q.k^T (ORT u8u8) --softmax_u8 (LUT)--> p --p.v (ORT u8u8)--> ctx --requant_ctx--> c_u8
    c_u8 --out GEMM--> acc --resid_ln (+x residual, 22 bit, i-LN, fc1_act)--> h_u8
    h_u8 --FC1 GEMM--> acc --gelu_u8 (i-GELU, fc2_act)--> g_u8 --FC2 GEMM--> acc
         --resid_ln (+h residual, 22 bit, i-LN, next layer's input_act)--> x_u8 (or the int64 output)
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

from . import EngineError, gemm, kernels, selftest
from .convert import IntModel
from ..quant.primitives import dequantize

I64 = torch.int64


def make_positions(tokens: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """fairseq learned positions: padding_idx + 1 + index for real tokens, padding_idx for pads."""
    mask = tokens.ne(padding_idx).to(I64)
    return torch.cumsum(mask, dim=1) * mask + padding_idx


class _Layer:
    """One layer's GEMMs and its biases with the GEMM route's zero-point correction folded in (int64 [N])."""

    def __init__(self, L, allowed: tuple, threads: int):
        self.L = L
        self.routes = {}
        self.bias = {}
        for k in ("qkv", "o", "fc1", "fc2"):
            lin = getattr(L, k)
            g = gemm.make_linear(lin.w_int, gemm.route_for(lin.w_int, allowed=allowed), threads)
            setattr(self, k, g)
            self.routes[k] = g.route
            self.bias[k] = (lin.b_int.to(I64) + g.zp_correction).contiguous()


class IntegerEngine:
    """Runs an :class:`IntModel` on integers.

    Args:
        im: compiled integer model (:func:`convert.compile_model`).
        threads: torch/OpenMP threads (fbgemm GEMMs and the fused kernels) and ORT intra-op threads of the ORT
            linear routes; the attention GEMMs always run on one ORT thread.
        route: ``"auto"`` (the fastest exact route per weight among those that passed the self-test: fbgemm16 for
            ternary, fbgemm for 7-bit, u8u8 for full 8-bit), ``"ort"`` (ONNX Runtime only: u8s8 / u8u8), or
            ``"u8u8"`` (the exact 16-bit route for every weight).
    """

    ROUTE_CHOICES = ("auto", "ort", "u8u8")

    def __init__(self, im: IntModel, threads: Optional[int] = None, route: str = "auto"):
        if route not in self.ROUTE_CHOICES:
            raise EngineError(f"unknown route {route!r} (choose {', '.join(self.ROUTE_CHOICES)})")
        self.im = im
        self.threads = int(threads or gemm.default_threads())
        torch.set_num_threads(self.threads)
        self.K = kernels.load()
        self.selftest = selftest.run(threads=self.threads)
        if not self.selftest.exact_ok:
            raise EngineError("integer GEMM self-test failed on this CPU: " + self.selftest.summary())
        allowed = self.selftest.fast_routes if route == "auto" else (
            ("u8s8",) if route == "ort" and self.selftest.ok.get("u8s8") else ())
        self.layers = [_Layer(L, allowed, self.threads) for L in im.layers]
        # The attention GEMMs are small (0.2 GMAC per layer at batch 8): on one ORT thread they run ~35 % faster than on
        # ORT's own 2-thread pool, whose workers compete with torch's OpenMP workers (measured on the 2-core host).
        self.qk = gemm.BatchedGemm(128, 1)
        self.pv = gemm.BatchedGemm(0, 1)
        gemm.malloc_trim()
        self.D = im.tok_w.shape[1]
        self._bufs: Dict[tuple, Dict[str, torch.Tensor]] = {}
        self.timings: Dict[str, float] = {}
        self.profile = False

    # ------------------------------------------------------------------------------------------------------------
    @property
    def routes(self) -> List[Dict[str, str]]:
        return [lay.routes for lay in self.layers]

    def weight_bytes(self, include_head: bool = True) -> int:
        """Resident weight bytes of the engine: GEMM weights (fbgemm's packed panels, or 1 byte per weight on the
        ORT routes, which also keep a repacked copy not counted here), int8 embeddings, integer biases / per-channel
        constants, i-exp LUTs and the float head."""
        def nb(t):
            return t.numel() * t.element_size()

        im = self.im
        n = nb(im.tok_w) + nb(im.pos_w) + nb(im.emb_ln.b_int)
        for lay in self.layers:
            L = lay.L
            for k in ("qkv", "o", "fc1", "fc2"):
                n += getattr(lay, k).weight_bytes + nb(lay.bias[k])
            n += nb(L.lut) + sum(nb(t) for t in (L.in_m, L.in_e, L.qkv_m, L.qkv_e, L.ar_m, L.ar_e, L.h_m, L.h_e,
                                                 L.gelu_k, L.gelu_b, L.gelu_c, L.gelu_one, L.g_m, L.g_e, L.fr_m,
                                                 L.fr_e,
                                                 L.attn_ln.b_int, L.ffn_ln.b_int))
        if im.head and include_head:
            n += sum(nb(t) for t in im.head.values())
        return n

    def _buf(self, B: int, T: int) -> Dict[str, torch.Tensor]:
        key = (B, T)
        b = self._bufs.get(key)
        if b is None:
            D = self.D
            H = self.im.layers[0].heads if self.im.layers else 1
            dh = D // H
            F = self.im.layers[0].fc1.w_int.shape[0] if self.im.layers else D
            M = B * T
            u8, i32 = torch.uint8, torch.int32
            b = dict(
                x=torch.empty(M, D, dtype=u8), h=torch.empty(M, D, dtype=u8), c=torch.empty(M, D, dtype=u8),
                g=torch.empty(M, F, dtype=u8), acc_qkv=torch.empty(M, 3 * D, dtype=i32),
                acc_d=torch.empty(M, D, dtype=i32), acc_f=torch.empty(M, F, dtype=i32),
                q=torch.empty(B, H, T, dh, dtype=u8), kT=torch.empty(B, H, dh, T, dtype=u8),
                v=torch.empty(B, H, T, dh, dtype=u8), scores=torch.empty(B, H, T, T, dtype=i32),
                p=torch.empty(B, H, T, T, dtype=u8), ctx=torch.empty(B, H, T, dh, dtype=i32),
                out_q=torch.empty(M, D, dtype=I64),
            )
            if len(self._bufs) > 8:
                self._bufs.clear()
            self._bufs[key] = b
        return b

    def _t(self, name, t0):
        if self.profile:
            t1 = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + (t1 - t0)
            return t1
        return t0

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, tokens: torch.Tensor, collect: bool = False):
        """Integer encoder. Returns ``(q_out int64 [B, T, D], s_out float32 [D], acts)`` where ``acts`` (only with
        ``collect``) maps ``"layers.{i}.{module}"`` / ``"embed_act"`` / ``"layernorm_embedding"`` to the integer
        outputs of the QAT modules of the same names (int64, QAT layout B x T x ... / B x H x T x T)."""
        if tokens.dim() != 2:
            raise EngineError("tokens must be [batch, time]")
        tokens = tokens.to(I64).contiguous()
        V = self.im.tok_w.shape[0]
        if int(tokens.max()) >= V or int(tokens.min()) < 0:
            raise EngineError(f"token id out of range for a dictionary of {V} entries")
        B, T = tokens.shape
        if T + self.im.padding_idx + 1 > self.im.pos_w.shape[0]:
            raise EngineError(f"sequence length {T} exceeds the model's {self.im.pos_w.shape[0] - self.im.padding_idx - 1} positions")
        K, im, D = self.K, self.im, self.D
        buf = self._buf(B, T)
        M = B * T
        acts: Dict[str, torch.Tensor] = {}
        pad = tokens.eq(im.padding_idx)
        pad_u8 = pad.to(torch.uint8).contiguous()
        positions = make_positions(tokens, im.padding_idx)
        e = torch.empty(0, dtype=I64)
        eu = torch.empty(0, dtype=torch.uint8)
        x, h, c, g = buf["x"], buf["h"], buf["c"], buf["g"]
        t0 = time.perf_counter()
        if im.layers:
            L0 = im.layers[0]
            nm, ne, xo = L0.in_m, L0.in_e, x
        else:
            nm, ne, xo = e, e, eu
        last_q = buf["out_q"] if not im.layers else e
        q16 = torch.empty(M, D, dtype=I64) if collect else e
        qln = torch.empty(M, D, dtype=I64) if collect else last_q
        K.embed_ln(tokens.reshape(-1), positions.reshape(-1), pad_u8.reshape(-1), im.tok_w, im.pos_w, im.emb_tok_m,
                   im.emb_tok_e, im.emb_pos_m, im.emb_pos_e, 2 ** (im.embed_act_bits - 1) - 1, im.emb_ln.shift,
                   im.emb_ln.b_int, nm, ne, 2 ** (im.act_bits - 1) - 1, xo, qln, q16)
        if collect:
            acts["embed_act"] = q16.view(B, T, D).clone()
            acts["layernorm_embedding"] = qln.view(B, T, D).clone()
            if not im.layers:
                buf["out_q"].copy_(qln)
        t0 = self._t("embed", t0)
        qmax8 = 2 ** (im.act_bits - 1) - 1
        qmax22 = 2 ** (im.residual_bits - 1) - 1
        nL = len(self.layers)
        for i, lay in enumerate(self.layers):
            L = lay.L
            H = L.heads
            pre = f"layers.{i}."
            if collect:
                acts[pre + "input_act"] = x.view(B, T, D).to(I64) - 128
            lay.qkv(x, buf["acc_qkv"])
            t0 = self._t("gemm_qkv", t0)
            K.requant_qkv(buf["acc_qkv"], lay.bias["qkv"], L.qkv_m, L.qkv_e, qmax8, B, T, H, buf["q"], buf["kT"], buf["v"])
            t0 = self._t("requant", t0)
            self.qk(buf["q"], buf["kT"], buf["scores"])
            t0 = self._t("attn_bmm", t0)
            K.softmax_u8(buf["scores"], pad_u8, L.lut, buf["p"])
            t0 = self._t("softmax", t0)
            self.pv(buf["p"], buf["v"], buf["ctx"])
            t0 = self._t("attn_bmm", t0)
            K.requant_ctx(buf["ctx"], L.ctx_m, L.ctx_e, qmax8, c)
            t0 = self._t("requant", t0)
            if collect:
                acts[pre + "self_attn.q_act"] = buf["q"].permute(0, 2, 1, 3).reshape(B, T, D).to(I64) - 128
                acts[pre + "self_attn.k_act"] = buf["kT"].permute(0, 3, 1, 2).reshape(B, T, D).to(I64) - 128
                acts[pre + "self_attn.v_act"] = buf["v"].permute(0, 2, 1, 3).reshape(B, T, D).to(I64) - 128
                acts[pre + "self_attn.softmax"] = buf["p"].to(I64)
                acts[pre + "self_attn.attn_act"] = c.view(B, T, D).to(I64) - 128
            lay.o(c, buf["acc_d"])
            t0 = self._t("gemm_out", t0)
            q22 = torch.empty(M, D, dtype=I64) if collect else e
            qa = torch.empty(M, D, dtype=I64) if collect else e
            K.resid_ln(buf["acc_d"], lay.bias["o"], L.ar_m, L.ar_e, x, L.ar_id_m, L.ar_id_e, qmax22, L.attn_ln.shift,
                       L.attn_ln.b_int, L.h_m, L.h_e, qmax8, h, qa, q22)
            t0 = self._t("resid_ln", t0)
            if collect:
                acts[pre + "attn_residual_act"] = q22.view(B, T, D)
                acts[pre + "self_attn_layer_norm"] = qa.view(B, T, D)
                acts[pre + "fc1_act"] = h.view(B, T, D).to(I64) - 128
            lay.fc1(h, buf["acc_f"])
            t0 = self._t("gemm_fc1", t0)
            F = L.fc1.w_int.shape[0]
            gq = torch.empty(M, F, dtype=I64) if collect else e
            K.gelu_u8(buf["acc_f"], lay.bias["fc1"], L.gelu_k, L.gelu_b, L.gelu_c, L.gelu_one, L.g_m, L.g_e, qmax8,
                      g, gq)
            t0 = self._t("gelu", t0)
            if collect:
                acts[pre + "gelu"] = gq.view(B, T, F)
                acts[pre + "fc2_act"] = g.view(B, T, F).to(I64) - 128
            lay.fc2(g, buf["acc_d"])
            t0 = self._t("gemm_fc2", t0)
            last = i == nL - 1
            if last:
                nm, ne, xo, oq = e, e, eu, buf["out_q"]
            else:
                Ln = self.layers[i + 1].L
                nm, ne, xo, oq = Ln.in_m, Ln.in_e, x, (torch.empty(M, D, dtype=I64) if collect else e)
            q22 = torch.empty(M, D, dtype=I64) if collect else e
            # the next layer's input overwrites x only after this kernel has read it? no: the residual is h, x is free
            K.resid_ln(buf["acc_d"], lay.bias["fc2"], L.fr_m, L.fr_e, h, L.fr_id_m, L.fr_id_e, qmax22, L.ffn_ln.shift,
                       L.ffn_ln.b_int, nm, ne, qmax8, xo, oq, q22)
            t0 = self._t("resid_ln", t0)
            if collect:
                acts[pre + "ffn_residual_act"] = q22.view(B, T, D)
                acts[pre + "final_layer_norm"] = oq.view(B, T, D).clone()
        out = buf["out_q"].view(B, T, D)
        return out.clone() if collect else out, im.s_out, acts

    @torch.no_grad()
    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Real encoder output ``float(q * S)`` (float64 product, one rounding), as the QAT model hands its head."""
        q, s, _ = self.encode(tokens)
        return dequantize(q.to(torch.float64), s)

    @torch.no_grad()
    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the float classification head on the integer encoder output (CLS token)."""
        if not self.im.head:
            raise EngineError("the model has no classification head")
        q, s, _ = self.encode(tokens)
        x = dequantize(q[:, 0, :].to(torch.float64), s)
        hd = self.im.head
        x = torch.tanh(torch.nn.functional.linear(x, hd["dense.weight"], hd["dense.bias"]))
        return torch.nn.functional.linear(x, hd["out_proj.weight"], hd["out_proj.bias"])
