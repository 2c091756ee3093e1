"""QAT overhead: training-step time of a symmetric (I-BERT integer) encoder vs the same encoder in float.

fairseq's model is wired elsewhere; this benchmark builds a stand-alone post-LN encoder layer stack from the
``ibert_plugin.quant`` modules with the dataflow of ``docs/integer_spec.md`` ("Encoder wiring"), in
``quant_mode="none"`` (plain float, numerically ``nn.Linear``/``nn.LayerNorm``/``F.gelu``/``F.softmax``) and in
``quant_mode="symmetric"``, and times full training steps (forward, backward, Adam) interleaved in one process.

Prints a table, then ONE JSON object as the last line: ``ratio`` is the median over interleaved pairs of the
symmetric / float ratio of per-step process CPU time (single-threaded, so CPU time is the step's cost and does not
count time the process waits for a core on a shared machine); ``ratio_wall`` is the same with wall-clock time.
The order of the two modes alternates each pair.
Usage: ``OMP_NUM_THREADS=1 python benchmarks/qat_overhead.py [--layers 2 --batch 8 --seq 128 --steps 5]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ibert_plugin.quant import (  # noqa: E402
    IntGELU,
    IntLayerNorm,
    IntSoftmax,
    QuantAct,
    QuantConfig,
    QuantLinear,
)
from ibert_plugin.quant.primitives import dequantize, exact_int_matmul  # noqa: E402


def _matmul(a, sa, b_t, sb, a_bits, b_bits) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``a @ b_t^T``: exact integer GEMM with scale ``sa*sb`` for carriers, plain matmul for real tensors."""
    if sa is None or sb is None:
        return torch.matmul(dequantize(a, sa), dequantize(b_t, sb).transpose(-1, -2)), None
    return exact_int_matmul(a, b_t, a_bits, b_bits), sa * sb


class EncoderLayer(nn.Module):
    """Post-LN transformer encoder layer (RoBERTa), integer dataflow of the spec in symmetric mode.

    Input/output ``(x, scale)`` of shape ``(B, T, C)``; ``mask`` ``(B, T)`` True on padding.
    """

    def __init__(self, cfg: QuantConfig, dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.cfg, self.heads, self.head_dim, self.dropout = cfg, heads, dim // heads, dropout
        self.scaling = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (QuantLinear(dim, dim, cfg=cfg) for _ in range(4))
        self.fc1, self.fc2 = QuantLinear(dim, ffn, cfg=cfg), QuantLinear(ffn, dim, cfg=cfg)
        self.self_attn_layer_norm, self.final_layer_norm = IntLayerNorm(dim, cfg=cfg), IntLayerNorm(dim, cfg=cfg)
        self.softmax, self.gelu = IntSoftmax(cfg), IntGELU(cfg)
        a, r = cfg.act_bits, cfg.residual_bits
        self.input_act, self.q_act, self.k_act, self.v_act, self.attn_act = (QuantAct(a, cfg) for _ in range(5))
        self.fc1_act, self.fc2_act = QuantAct(a, cfg), QuantAct(a, cfg)
        self.attn_residual_act, self.ffn_residual_act = QuantAct(r, cfg), QuantAct(r, cfg)

    def _heads(self, x):
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

    def _drop(self, x):
        return nn.functional.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def forward(self, x, scale, mask=None):
        b, t, c = x.shape
        a = self.cfg.act_bits
        x, scale = self.input_act(x, scale)
        res, res_s = x, scale
        q, sq = self.q_act(*self.q_proj(x, scale))
        k, sk = self.k_act(*self.k_proj(x, scale))
        v, sv = self.v_act(*self.v_proj(x, scale))
        scores, ss = _matmul(self._heads(q), sq, self._heads(k), sk, a, a)
        if ss is None:
            scores = scores * self.scaling
        else:
            ss = ss * self.scaling
        p, sp = self.softmax(scores, ss, mask)
        p = self._drop(p)
        vt = self._heads(v).transpose(-1, -2)
        ctx, sc = _matmul(p, sp, vt, sv, self.cfg.softmax_out_bits + 1, a)
        ctx = ctx.transpose(1, 2).reshape(b, t, c)
        x, scale = self.out_proj(*self.attn_act(ctx, sc))
        x, scale = self.attn_residual_act(self._drop(x), scale, identity=res, identity_scale=res_s)
        x, scale = self.self_attn_layer_norm(x, scale)
        x, scale = self.fc1_act(x, scale)
        res, res_s = x, scale
        x, scale = self.gelu(*self.fc1(x, scale))
        x, scale = self.fc2(*self.fc2_act(x, scale))
        x, scale = self.ffn_residual_act(self._drop(x), scale, identity=res, identity_scale=res_s)
        return self.final_layer_norm(x, scale)


class EncoderStack(nn.Module):
    """``layers`` encoder layers on a real input, real output ``q * S`` (the float head's input)."""

    def __init__(self, cfg: QuantConfig, layers: int, dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, dim, heads, ffn, dropout) for _ in range(layers))

    def forward(self, x, mask=None):
        scale = None
        for layer in self.layers:
            x, scale = layer(x, scale, mask)
        return dequantize(x, scale)


def _train_step(model, opt, x, mask, target) -> Tuple[float, float]:
    """One training step; returns (wall seconds, process CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    out = model(x, mask)
    loss = (out * target).mean()
    loss.backward()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode (after 1 warm-up step each)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one symmetric step")
    args = ap.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    models, opts = {}, {}
    for mode in ("none", "symmetric"):
        cfg = QuantConfig(quant_mode=mode)
        models[mode] = EncoderStack(cfg, args.layers, args.dim, args.heads, args.ffn, args.dropout).train()
    models["symmetric"].load_state_dict(models["none"].state_dict(), strict=False)
    for mode, m in models.items():
        opts[mode] = torch.optim.Adam(m.parameters(), lr=1e-6, betas=(0.9, 0.98), eps=1e-6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, args.dim, generator=g)
    mask = torch.zeros(args.batch, args.seq, dtype=torch.bool)
    mask[-1, args.seq * 3 // 4:] = True
    target = torch.randn(args.batch, args.seq, args.dim, generator=g)

    wall = {mode: [] for mode in models}
    cpu = {mode: [] for mode in models}
    for mode in models:  # warm-up (allocator, first-call overheads, range initialisation)
        _train_step(models[mode], opts[mode], x, mask, target)
    pair_wall, pair_cpu = [], []
    for i in range(args.steps):  # interleaved, alternating which mode goes first; paired ratios cancel load drift
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        for mode in order:
            w, c = _train_step(models[mode], opts[mode], x, mask, target)
            wall[mode].append(w)
            cpu[mode].append(c)
        pair_wall.append(wall["symmetric"][-1] / wall["none"][-1])
        pair_cpu.append(cpu["symmetric"][-1] / cpu["none"][-1])
    med_w = {mode: statistics.median(t) for mode, t in wall.items()}
    med_c = {mode: statistics.median(t) for mode, t in cpu.items()}
    ratio_cpu, ratio_wall = statistics.median(pair_cpu), statistics.median(pair_wall)

    shape = (f"{args.layers} post-LN layers, hidden {args.dim}, {args.heads} heads, FFN {args.ffn}, "
             f"batch {args.batch} x seq {args.seq}, dropout {args.dropout}, Adam, {threads} thread(s)")
    print(f"QAT overhead: {shape}")
    print(f"{'mode':<12}{'wall med s':>12}{'wall min':>10}{'wall max':>10}{'cpu med s':>12}")
    for mode in models:
        print(f"{mode:<12}{med_w[mode]:>12.3f}{min(wall[mode]):>10.3f}{max(wall[mode]):>10.3f}{med_c[mode]:>12.3f}")
    print(f"ratio symmetric / float: CPU time {ratio_cpu:.3f}, wall {ratio_wall:.3f} (medians of {args.steps} "
          f"interleaved pairs; target <= 1.5)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _train_step(models["symmetric"], opts["symmetric"], x, mask, target)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print(json.dumps({
        "benchmark": "qat_overhead", "ratio": round(ratio_cpu, 4), "ratio_wall": round(ratio_wall, 4),
        "float_step_cpu_s": round(med_c["none"], 4), "symmetric_step_cpu_s": round(med_c["symmetric"], 4),
        "float_step_wall_s": round(med_w["none"], 4), "symmetric_step_wall_s": round(med_w["symmetric"], 4),
        "layers": args.layers, "hidden": args.dim, "heads": args.heads, "ffn": args.ffn,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": threads, "device": "cpu",
    }))


if __name__ == "__main__":
    main()
