"""Integer engine vs FP32 PyTorch on a roberta_base-shaped encoder (12 x 768, FFN 3072, 12 heads), sequence 128.

Cases: 7-bit I-BERT weights (fbgemm acc32 route), ternary weights (fbgemm acc16 route), full 8-bit weights (exact
ORT u8u8 route); ``--route ort`` forces the ONNX Runtime routes for comparison.
The host is a shared VM whose FP32 times vary by up to ~30 % between runs, so each case also reports the ratio of
the fastest repetitions (``speedup_of_mins``) next to the ratio of medians (``speedup``). Same weights for both paths (the FP32 model uses the dequantized integer weights), eval, ``torch.no_grad``,
``torch.set_num_threads(threads)``; FP32 and INT runs are interleaved and medians reported. ``bit_exact``: the engine's
integer activations (every module output of every layer) equal the float64 spec reference
(``engine.reference.forward_int``) on that input; tests/test_engine_bitexact.py checks the engine against the QAT
model itself. Prints a human table, then ONE JSON object as last line.

    python benchmarks/integer_engine.py [--threads 2] [--reps 7] [--layers 12] [--batches 1 8] [--cases 7bit ternary 8bit]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ibert_plugin.engine import convert, engine, gemm, reference, synthetic  # noqa: E402


class FloatEncoder(nn.Module):
    """Plain FP32 post-LN RoBERTa encoder (nn.Linear, SDPA, nn.LayerNorm, GELU) with the dequantized weights."""

    def __init__(self, st: convert.QState):
        super().__init__()
        D = st.tok_w.shape[1]
        self.padding_idx = st.padding_idx
        self.tok = nn.Embedding.from_pretrained(st.tok_w.float().clone(), freeze=True)
        self.pos = nn.Embedding.from_pretrained(st.pos_w.float().clone(), freeze=True)
        self.ln = self._ln(st.emb_ln, D)
        self.layers = nn.ModuleList()
        for L in st.layers:
            m = nn.Module()
            for name in ("q", "k", "v", "o", "fc1", "fc2"):
                setattr(m, name, self._lin(getattr(L, name)))
            m.ln1, m.ln2, m.heads = self._ln(L.attn_ln, D), self._ln(L.ffn_ln, D), L.heads
            self.layers.append(m)
        self.eval()

    @staticmethod
    def _lin(lin):
        n_out, n_in = lin.w_int.shape
        layer = nn.Linear(n_in, n_out)
        layer.weight.data = (lin.w_int.float() * lin.s_w[:, None]).contiguous()
        layer.bias.data = lin.bias.float().clone()
        return layer

    @staticmethod
    def _ln(ln, D):
        layer = nn.LayerNorm(D)
        layer.weight.data, layer.bias.data = ln.gamma.float().clone(), ln.beta.float().clone()
        return layer

    def forward(self, tokens):
        pad = tokens.eq(self.padding_idx)
        x = self.tok(tokens) + self.pos(engine.make_positions(tokens, self.padding_idx))
        x = self.ln(x) * (~pad).unsqueeze(-1)
        B, T, D = x.shape
        mask = torch.zeros(B, 1, 1, T).masked_fill(pad[:, None, None, :], -math.inf)
        for m in self.layers:
            H = m.heads
            q, k, v = (getattr(m, n)(x).view(B, T, H, D // H).transpose(1, 2) for n in ("q", "k", "v"))
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D)
            x = m.ln1(x + m.o(ctx))
            x = m.ln2(x + m.fc2(F.gelu(m.fc1(x))))
        return x


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fp32_weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_bit_exact(eng, im, tokens) -> bool:
    _, acts = eng.encode(tokens, collect=True)[1:]
    _, ref = reference.forward_int(im, tokens)
    return all(torch.equal(acts[k].to(torch.float64), ref[k].reshape(acts[k].shape)) for k in ref)


def median_ms(xs):
    return 1000.0 * statistics.median(xs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions at batch 8 (batch 1 uses 3x)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--cases", nargs="+", default=["7bit", "ternary", "8bit"])
    ap.add_argument("--vocab", type=int, default=50265)
    ap.add_argument("--profile", action="store_true", help="print a per-op breakdown of the engine")
    ap.add_argument("--skip-exact", action="store_true", help="skip the bit-exactness check")
    ap.add_argument("--route", choices=engine.IntegerEngine.ROUTE_CHOICES, default="auto", help="engine GEMM routes")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    gemm.set_default_threads(args.threads)
    D, FF, H = 768, 3072, 12
    results = []
    for case in args.cases:
        calib = synthetic.random_tokens(4, 64, args.vocab, seed=11)
        st = synthetic.random_qstate(layers=args.layers, dim=D, ffn=FF, heads=H, vocab=args.vocab, max_pos=512,
                                     mode=case, seed=3, calib_tokens=calib)
        im = convert.compile_qstate(st)
        fp = FloatEncoder(st)
        gemm.malloc_trim()
        r0 = rss_bytes()
        eng = engine.IntegerEngine(im, threads=args.threads, route=args.route)
        eng_rss = rss_bytes() - r0
        route = eng.routes[0]["fc1"]
        mem_fp32 = fp32_weight_bytes(fp)
        mem_int = eng.weight_bytes(include_head=False)  # like-for-like: the FP32 encoder has no head either
        for B in args.batches:
            toks = synthetic.random_tokens(B, args.seq, args.vocab, seed=100 + B, pad=False)
            exact = None if args.skip_exact else check_bit_exact(eng, im, toks[: min(B, 8)])
            with torch.no_grad():
                fp(toks)
                eng.encode(toks)
                reps = args.reps * (3 if B == 1 else 1)
                tf, ti = [], []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fp(toks)
                    t1 = time.perf_counter()
                    eng.encode(toks)
                    t2 = time.perf_counter()
                    tf.append(t1 - t0)
                    ti.append(t2 - t1)
            if args.profile:
                eng.profile, eng.timings = True, {}
                for _ in range(3):
                    eng.encode(toks)
                eng.profile = False
                tot = sum(eng.timings.values())
                print(f"  profile {case} B={B}: " + ", ".join(f"{k} {1000 * v / 3:.1f}" for k, v in
                                                           sorted(eng.timings.items(), key=lambda kv: -kv[1]))
                      + f" (sum {1000 * tot / 3:.1f} ms)")
            row = dict(case=case, route=route, batch=B, seq=args.seq, fp32_ms=round(median_ms(tf), 2),
                       int_ms=round(median_ms(ti), 2), speedup=round(median_ms(tf) / median_ms(ti), 3),
                       fp32_min_ms=round(1000 * min(tf), 2), int_min_ms=round(1000 * min(ti), 2),
                       speedup_of_mins=round(min(tf) / min(ti), 3),
                       bit_exact=exact, fp32_weight_mb=round(mem_fp32 / 2 ** 20, 1),
                       int_weight_mb=round(mem_int / 2 ** 20, 1), mem_ratio=round(mem_int / mem_fp32, 3),
                       engine_rss_mb=round(eng_rss / 2 ** 20, 1), reps=reps)
            results.append(row)
            print(f"{case:8s} {route:5s} B={B:<2d} fp32 {row['fp32_ms']:8.1f} ms  int {row['int_ms']:8.1f} ms  "
                  f"x{row['speedup']:.2f}  bit_exact={exact}  weights {row['int_weight_mb']} MB vs "
                  f"{row['fp32_weight_mb']} MB (1/{1 / row['mem_ratio']:.2f}); engine RSS +{row['engine_rss_mb']} MB",
                  flush=True)
        del eng, fp
    print()
    print(f"{'case':8s} {'route':5s} {'batch':>5s} {'fp32_ms':>9s} {'int_ms':>9s} {'speedup':>8s} {'bit_exact':>9s} "
          f"{'mem_ratio':>9s}")
    for r in results:
        print(f"{r['case']:8s} {r['route']:5s} {r['batch']:5d} {r['fp32_ms']:9.1f} {r['int_ms']:9.1f} "
              f"{r['speedup']:8.2f} {str(r['bit_exact']):>9s} {r['mem_ratio']:9.3f}")
    summary = dict(benchmark="integer_engine", threads=args.threads, layers=args.layers, seq=args.seq,
                   shape="roberta_base", load=os.getloadavg(), results=results,
                   exact_reference="float64 spec reference (engine.reference.forward_int)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
