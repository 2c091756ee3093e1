"""Integer engine vs FP32 PyTorch, bit-exact against the QAT model, at roberta_base shape and on real sentences.

Weights (``--cases``): ``8bit`` (W8A8 I-BERT, per-channel 8-bit), ``7bit`` (W7A8, per-channel 7-bit), ``ternary``
(integer-only ternary W2A8: TWN weights, I-BERT integer GELU / softmax / LayerNorm); all ``--quant-mode symmetric``.
Inputs (``--inputs``):

* ``base``: a real ``ibert_roberta`` of roberta_base shape (12 x 768, FFN 3072, 12 heads, vocab 50265; ``--layers``)
  with random BERT-init weights, perturbed biases and LayerNorm affine (gamma 1 + 0.2 N(0, 1) with 5 % sign flips,
  beta 0.1 N(0, 1), biases 0.05 N(0, 1)), calibrated by train-mode forwards on random tokens, converted with
  ``engine.convert.from_model``; random tokens, ``--seq`` 128, ``--batches`` 1 and 8, no padding.
* ``real``: the imported MiniLM (``data/minilm/model.pt``, 6 x 384) calibrated on RT-SENT train sentences, run on
  the RT-SENT dev sentences in file order (the demo's engine-stage inputs) in batches of ``--real-batches`` 8 and 32,
  each padded to its longest row.

Timing: the FP32 PyTorch forward (a plain post-LN encoder: nn.Linear, SDPA, nn.LayerNorm, exact GELU, with the QAT
model's float weights) and ``IntegerEngine.encode`` alternate inside every repetition (one repetition = every batch
of the case), warm, ``torch.no_grad``, ``torch.set_num_threads(--threads)``. Per repetition ratio = FP32 time /
engine time; reported: the median ratio with its min and max over repetitions, median times, the engine's linear
routes (attention: the fused C++ kernel attention_u8) and the weight bits.
``bit_exact``: every hooked QAT module output (embeddings, every QuantAct, softmax, GELU, every LayerNorm; padding
rows masked) equals the engine's integers (``engine.qat_compare``) on every timed batch, and so do the logits of
the classification head.
Prints a table, then ONE JSON object as the last line.

    python benchmarks/integer_engine.py [--threads 2] [--reps 7] [--inputs base real] [--cases 7bit ternary 8bit]
    python benchmarks/integer_engine.py --quick      # 2 layers, 2 repetitions, batch 8, 96 dev sentences
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

from ibert_plugin.engine import EngineError, convert, engine, gemm, qat_compare  # noqa: E402

WEIGHTS = {"8bit": ("8", "W8A8"), "7bit": ("7", "W7A8"), "ternary": ("2", "W2A8 integer-only ternary")}
BASE_DIMS = dict(layers=12, dim=768, ffn=3072, heads=12, vocab=50265)


# ------------------------------------------------------------------------------------------------------ models
def _dictionary(vocab: int):
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(vocab - len(d) - 1):
        d.add_symbol(f"w{i}")
    d.add_symbol("<mask>")
    return d


def _build(arch: str, dictionary, extra, seed: int = 0):
    """``arch`` (an ``ibert_roberta`` variant) for ``dictionary`` with a 2-class sentence head."""
    from fairseq import options
    from fairseq.models import ARCH_MODEL_REGISTRY

    import ibert_plugin  # noqa: F401  (registers the architectures)

    class _Task:
        source_dictionary = dictionary

        @staticmethod
        def max_positions():
            return 512

    argv = ["unused-data", "--task", "sentence_prediction", "--num-classes", "2", "--arch", arch,
            "--max-positions", "512", *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    torch.manual_seed(seed)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, _Task())
    model.register_classification_head(qat_compare.HEAD, num_classes=2)
    return model


def _perturb_affine(model, seed: int) -> None:
    """Non-trivial biases and LayerNorm affine (random init has biases 0, gamma 1, beta 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.encoder.sentence_encoder.named_parameters():
            if name.endswith("bias"):
                is_ln = "layer_norm" in name or "layernorm" in name
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if is_ln else 0.05))
            elif name.endswith("weight") and ("layer_norm" in name or "layernorm" in name):
                sign = torch.where(torch.rand(p.shape, generator=g) < 0.05, -1.0, 1.0)
                p.copy_(sign * (1.0 + 0.2 * torch.randn(p.shape, generator=g)))


class one_thread:
    """QAT-side work (calibration, bit-exactness) on one thread: it is not timed, and many small ops in a 2-thread
    OpenMP pool crawl on a busy host. Restores the pool size on exit."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _calibrate(model, batches):
    model.train()
    with torch.no_grad(), one_thread():
        for tokens in batches:
            model(tokens, features_only=True)
    return model.eval()


def _random_tokens(batch, T, vocab, seed, padding_idx=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(padding_idx + 3, vocab - 1, (batch, T), generator=g)
    t[:, 0], t[:, -1] = 0, 2  # <s> ... </s>
    return t


def base_model(wb: str, layers: int, seq: int):
    d = _dictionary(BASE_DIMS["vocab"])
    extra = ["--encoder-layers", str(layers), "--quant-mode", "symmetric", "--weight-bits", wb]
    model = _build("ibert_roberta_base", d, extra, seed=3)
    _perturb_affine(model, seed=4)
    return _calibrate(model, [_random_tokens(4, seq, len(d), seed=11 + i) for i in range(2)])


def _minilm_data(n_dev: int, batches):
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary, data_utils

    from ibert_plugin.assets import glue
    from ibert_plugin.assets.common import data_dir

    root = data_dir()
    need = [root / "minilm" / n for n in ("model.pt", "dict.txt")] + [root / "glue" / "RT-SENT" / f"{s}.tsv"
                                                                      for s in ("train", "dev")]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise EngineError(f"assets missing: {', '.join(missing)} (run: python -m ibert_plugin.assets build)")
    d = Dictionary.load(str(root / "minilm" / "dict.txt"))
    d.add_symbol("<mask>")
    enc = glue.BpeEncoder("wordpiece", root / "minilm")

    def rows(split, n):
        cols, _, _ = glue.read_split(root / "glue" / "RT-SENT" / f"{split}.tsv", glue.TASKS["RT-SENT"], split)
        return [torch.tensor([d.bos()] + d.encode_line(s, append_eos=True, add_if_not_exist=False).tolist())
                for s in enc.encode_all(cols[0][:n])]

    def collate(rs, b):
        return [data_utils.collate_tokens(rs[i:i + b], d.pad(), left_pad=False) for i in range(0, len(rs), b)]

    train, dev = rows("train", 48), rows("dev", n_dev)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(root / "minilm" / "model.pt"))["model"]
    return d, collate(train, 16), {b: collate(dev, b) for b in batches}, state, [len(r) for r in dev]


def minilm_model(wb: str, d, state, calib):
    model = _build("ibert_roberta_minilm", d, ["--quant-mode", "symmetric", "--weight-bits", wb])
    model.load_state_dict(state, strict=True)
    return _calibrate(model, calib)


# ------------------------------------------------------------------------------------------------------ FP32
class FloatEncoder(nn.Module):
    """Plain FP32 post-LN RoBERTa encoder (nn.Linear, SDPA, nn.LayerNorm, exact GELU) with the QAT model's float
    weights: what FP32 PyTorch inference of the same checkpoint costs, without fairseq's per-call overheads."""

    def __init__(self, model):
        super().__init__()
        enc = model.encoder.sentence_encoder
        self.padding_idx = enc.padding_idx
        self.tok = nn.Embedding.from_pretrained(enc.embed_tokens.weight.detach().float().clone(), freeze=True)
        self.pos = nn.Embedding.from_pretrained(enc.embed_positions.weight.detach().float().clone(), freeze=True)
        self.ln = self._ln(enc.layernorm_embedding)
        self.layers = nn.ModuleList()
        for L in enc.layers:
            m = nn.Module()
            att = L.self_attn
            for name, src in (("q", att.q_proj), ("k", att.k_proj), ("v", att.v_proj), ("o", att.out_proj),
                              ("fc1", L.fc1), ("fc2", L.fc2)):
                setattr(m, name, self._lin(src))
            m.ln1, m.ln2, m.heads = self._ln(L.self_attn_layer_norm), self._ln(L.final_layer_norm), att.num_heads
            self.layers.append(m)
        self.eval()

    @staticmethod
    def _lin(src):
        layer = nn.Linear(src.in_features, src.out_features)
        layer.weight.data = src.weight.detach().float().clone()
        layer.bias.data = src.bias.detach().float().clone()
        return layer

    @staticmethod
    def _ln(src):
        layer = nn.LayerNorm(src.weight.shape[0])
        layer.weight.data, layer.bias.data = src.weight.detach().float().clone(), src.bias.detach().float().clone()
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


# ------------------------------------------------------------------------------------------------------ measuring
def check_bit_exact(eng, model, batches):
    """(all equal, first failure or None): every hooked integer and the logits on every batch.

    The QAT model runs at the engine's thread count: the integers do not depend on it, but the float head's last bits
    do (BLAS blocking follows the OpenMP pool size), and the engine runs its head at ``eng.threads``.
    """
    n0 = torch.get_num_threads()
    torch.set_num_threads(eng.threads)
    try:
        return _check_bit_exact(eng, model, batches)
    finally:
        torch.set_num_threads(n0)


def _check_bit_exact(eng, model, batches):
    for i, tokens in enumerate(batches):
        _, bad, logits = qat_compare.compare(eng, model, tokens)
        if bad:
            first = next(iter(bad))
            return False, f"batch {i}: {len(bad)} modules differ, first {first} ({bad[first]} integers)"
        if not torch.equal(eng.classify(tokens), logits):
            return False, f"batch {i}: logits differ (integers equal)"
    return True, None


def time_interleaved(fp, eng, batches, reps):
    """Per repetition: every batch through FP32, then through the engine. Returns (fp32 s, engine s) lists."""
    with torch.no_grad():
        for b in batches[:2]:  # warm-up (buffers, ORT sessions, OpenMP pool)
            fp(b)
            eng.encode(b)
        tf, ti = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            for b in batches:
                fp(b)
            t1 = time.perf_counter()
            for b in batches:
                eng.encode(b)
            t2 = time.perf_counter()
            tf.append(t1 - t0)
            ti.append(t2 - t1)
    return tf, ti


def fp32_weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def convert_both(model, args):
    """(engine, FP32 twin) of a calibrated QAT model."""
    eng = convert.from_model(model, threads=args.threads, route=args.route)
    torch.set_num_threads(args.threads)
    return eng, FloatEncoder(model)


def measure(inputs, case, model, eng, fp, batches, args, shape, extra):
    wb, label = WEIGHTS[case]
    routes = sorted({r for lay in eng.routes for r in lay.values()})
    exact, why = (None, "skipped") if args.skip_exact else check_bit_exact(eng, model, batches)
    reps = args.reps * (3 if batches[0].shape[0] == 1 else 1)
    tf, ti = time_interleaved(fp, eng, batches, reps)
    ratios = [f / i for f, i in zip(tf, ti)]
    n_sent = sum(b.shape[0] for b in batches)
    if args.profile:
        eng.profile, eng.timings = True, {}
        with torch.no_grad():
            for b in batches:
                eng.encode(b)
        eng.profile = False
        print(f"  profile {inputs} {case} B={batches[0].shape[0]}: " + ", ".join(
            f"{k} {1000 * v:.1f}" for k, v in sorted(eng.timings.items(), key=lambda kv: -kv[1])) + " ms")
    row = dict(inputs=inputs, case=case, weights=label, weight_bits=int(wb), routes=routes,
               attention_route="fused attention_u8",
               threads=args.threads, shape=shape, batch=int(batches[0].shape[0]), batches=len(batches),
               sentences=n_sent, fp32_ms=round(1000 * statistics.median(tf), 2),
               int_ms=round(1000 * statistics.median(ti), 2), speedup_median=round(statistics.median(ratios), 3),
               speedup_min=round(min(ratios), 3), speedup_max=round(max(ratios), 3), reps=reps,
               int_sentences_per_s=round(n_sent / statistics.median(ti), 1),
               fp32_sentences_per_s=round(n_sent / statistics.median(tf), 1), bit_exact=exact,
               bit_exact_note=why, fp32_weight_mb=round(fp32_weight_bytes(fp) / 2 ** 20, 1),
               int_weight_mb=round(eng.weight_bytes(include_head=False) / 2 ** 20, 1), **extra)
    print(f"{inputs:4s} {case:7s} {','.join(routes):14s} B={row['batch']:<2d} x{len(batches):<3d} fp32 "
          f"{row['fp32_ms']:9.1f} ms  int {row['int_ms']:9.1f} ms  x{row['speedup_median']:.2f} "
          f"[{row['speedup_min']:.2f}, {row['speedup_max']:.2f}]  bit_exact={exact}" + (f" ({why})" if why else ""),
          flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions (batch 1 uses 3x)")
    ap.add_argument("--inputs", nargs="+", choices=["base", "real"], default=["base", "real"])
    ap.add_argument("--cases", nargs="+", choices=list(WEIGHTS), default=["7bit", "ternary", "8bit"])
    ap.add_argument("--layers", type=int, default=BASE_DIMS["layers"], help="roberta_base layers (base inputs)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="base inputs: batch sizes")
    ap.add_argument("--real-batches", type=int, nargs="+", default=[8, 32], help="real inputs: batch sizes")
    ap.add_argument("--dev-sentences", type=int, default=1000, help="real inputs: first N RT-SENT dev sentences")
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 repetitions, batch 8, 96 dev sentences")
    ap.add_argument("--profile", action="store_true", help="print a per-op breakdown of the engine")
    ap.add_argument("--skip-exact", action="store_true", help="skip the bit-exactness check")
    ap.add_argument("--route", choices=engine.IntegerEngine.ROUTE_CHOICES, default="auto", help="engine GEMM routes")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.reps, args.batches, args.dev_sentences = 2, 2, [8], 96
    for name in ("threads", "reps", "layers", "seq", "dev_sentences"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batches + args.real_batches) < 1:
        ap.error("batch sizes must be >= 1")

    torch.set_num_threads(args.threads)
    gemm.set_default_threads(args.threads)
    results = []
    try:
        if "real" in args.inputs:
            d, calib, dev, state, lengths = _minilm_data(args.dev_sentences, args.real_batches)
            extra = dict(model="imported MiniLM (6 x 384, FFN 1536)", data="RT-SENT dev",
                         mean_len=round(statistics.mean(lengths), 1), max_len=max(lengths))
            for case in args.cases:
                model = minilm_model(WEIGHTS[case][0], d, state, calib)
                eng, fp = convert_both(model, args)
                for b in args.real_batches:
                    results.append(measure("real", case, model, eng, fp, dev[b], args, "minilm", extra))
                del model, eng, fp
        if "base" in args.inputs:
            for case in args.cases:
                model = base_model(WEIGHTS[case][0], args.layers, args.seq)
                eng, fp = convert_both(model, args)
                for b in args.batches:
                    toks = _random_tokens(b, args.seq, BASE_DIMS["vocab"], seed=100 + b)
                    results.append(measure("base", case, model, eng, fp, [toks], args, "roberta_base",
                                           dict(layers=args.layers, seq=args.seq)))
                del model, eng, fp
                gemm.malloc_trim()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(f"{'inputs':6s} {'case':7s} {'routes':14s} {'batch':>5s} {'fp32_ms':>9s} {'int_ms':>9s} {'x median':>8s} "
          f"{'[min, max]':>14s} {'bit_exact':>9s}")
    for r in results:
        print(f"{r['inputs']:6s} {r['case']:7s} {','.join(r['routes']):14s} {r['batch']:5d} {r['fp32_ms']:9.1f} "
              f"{r['int_ms']:9.1f} {r['speedup_median']:8.2f} "
              f"{'[%.2f, %.2f]' % (r['speedup_min'], r['speedup_max']):>14s}"
              f" {str(r['bit_exact']):>9s}")
    summary = dict(benchmark="integer_engine", threads=args.threads, quick=args.quick, load=os.getloadavg(),
                   cpu_vnni=_has_vnni(), results=results,
                   bit_exact_reference="QAT model's hooked integers and logits (engine.qat_compare)",
                   all_bit_exact=all(r["bit_exact"] for r in results) if not args.skip_exact else None)
    print(json.dumps(summary))
    return 0


def _has_vnni():
    from ibert_plugin.engine import kernels

    fb = kernels.load_fbgemm()
    return None if fb is None else bool(fb.has_vnni())


if __name__ == "__main__":
    sys.exit(main())
