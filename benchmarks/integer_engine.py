"""Integer engine vs FP32 PyTorch and the int8 deployment peers, bit-exact against the QAT model.

Weights (``--cases``): ``8bit`` (W8A8 I-BERT, per-channel 8-bit), ``7bit`` (W7A8, per-channel 7-bit), ``ternary``
(integer-only ternary W2A8: TWN weights, I-BERT integer GELU / softmax / LayerNorm); all ``--quant-mode symmetric``.
Inputs (``--inputs``):

* ``real``: the imported MiniLM (``data/minilm/model.pt``, 6 x 384; ``python -m ibert_plugin.assets build``)
  calibrated on 48 RT-SENT train sentences, run on the RT-SENT dev sentences in file order (the demo's engine-stage
  inputs) in batches of ``--real-batches`` 1, 8 and 32, each padded to its longest row.
* ``squad``: the same MiniLM models on SQuAD-length windows (``--squad-seq`` 384 random tokens, ``--squad-batch`` 8).
* ``base``: a real ``ibert_roberta`` of roberta_base shape (12 x 768, FFN 3072, 12 heads, vocab 50265; ``--layers``)
  with random BERT-init weights, perturbed biases and LayerNorm affine (gamma 1 + 0.2 N(0, 1) with 5 % sign flips,
  beta 0.1 N(0, 1), biases 0.05 N(0, 1)), calibrated by train-mode forwards on random tokens, converted with
  ``engine.convert.from_model``; random tokens, ``--seq`` 128, ``--batches`` 1 and 8, no padding.

Contenders, all on the same float weights (the QAT model's; ``same_fp32_weights`` checks that every case's float
weights are identical), sentences, batches and threads: ``fp32`` (a plain post-LN encoder: nn.Linear, SDPA,
nn.LayerNorm, exact GELU), the deployment peers of ``benchmarks/peers.py`` (``--peers``: torch dynamic int8, ONNX
Runtime FP32 / dynamic int8 / static QDQ int8, OpenVINO FP32 / NNCF static int8 when ``openvino`` and ``nncf`` are
installed, ``pip install -r requirements-bench.txt``; a peer that cannot be built is listed with its error) and
``engine_<case>`` (``IntegerEngine.encode``). In every repetition each contender runs every batch of the case, the
order rotating by one per repetition; warm, ``torch.no_grad``, ``torch.set_num_threads(--threads)``. Reported per
contender: median [min, max] over repetitions of FP32 time / contender time; per engine row ``vs_peers`` (peer time /
engine time, median [min, max]) and ``vs_fastest_int8_peer``; each contender's library, version and route.
``bit_exact``: every hooked QAT module output (embeddings, every QuantAct, softmax, GELU, every LayerNorm; padding
rows masked) equals the engine's integers (``engine.qat_compare``) on every timed batch (``--exact-batches N``: the
first N of each case, named in ``bit_exact_note``), and so do the logits of the classification head.
Prints a table, then ONE JSON object as the last line.

    python benchmarks/integer_engine.py [--threads 2] [--reps 3] [--inputs real base squad] [--cases 8bit 7bit ternary]
                                        [--peers torch_int8 ort_fp32 ... | none]
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
from ibert_plugin.quant.config import IBERT_W7A8, IBERT_W8A8, INT_TERNARY_W2  # noqa: E402

WEIGHTS = {"8bit": ("8", "W8A8"), "7bit": ("7", "W7A8"), "ternary": ("2", "W2A8 integer-only ternary")}
BASE_DIMS = dict(layers=12, dim=768, ffn=3072, heads=12, vocab=50265)
#: The engine's models by weight bits: the named presets (the ternary one is the shipped integer-only TWN model).
PRESETS = {"8": IBERT_W8A8, "7": IBERT_W7A8, "2": INT_TERNARY_W2}


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
    extra = ["--encoder-layers", str(layers), *PRESETS[wb].to_flags()]
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
    model = _build("ibert_roberta_minilm", d, PRESETS[wb].to_flags())
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


def time_contenders(contenders, batches, reps):
    """Per repetition every contender runs every batch; the order rotates by one each repetition (so no contender
    always follows the same one). Returns {name: [seconds per repetition]}."""
    names = list(contenders)
    with torch.no_grad():
        for fn in contenders.values():  # warm-up (buffers, sessions, OpenMP / TBB pools, shape caches)
            for b in batches[:2]:
                fn(b)
        times = {n: [] for n in names}
        for r in range(reps):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                fn = contenders[n]
                t0 = time.perf_counter()
                for b in batches:
                    fn(b)
                times[n].append(time.perf_counter() - t0)
    return times


def fp32_weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def convert_both(model, args):
    """(engine, FP32 twin) of a calibrated QAT model."""
    eng = convert.from_model(model, threads=args.threads, route=args.route)
    torch.set_num_threads(args.threads)
    return eng, FloatEncoder(model)


def _weights_key(fp: nn.Module):
    return [p.detach().clone() for p in fp.parameters()]


def _stats(v):
    return dict(median=round(statistics.median(v), 3), min=round(min(v), 3), max=round(max(v), 3))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _cpu_isa() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown"
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return ", ".join(isa) or "no AVX2"


class CaseSet:
    """One timed case: a list of token batches of one batch size (``inputs`` real / squad / base)."""

    def __init__(self, inputs, batch, batches, shape, extra):
        self.inputs, self.batch, self.batches, self.shape, self.extra = inputs, batch, batches, shape, extra


def run_group(build_model, sets, calib_rows, args, log=print):
    """Engines for every weight case of ``build_model`` and the peers of its FP32 twin, timed interleaved on every
    case set. Returns (rows, peer descriptions)."""
    import peers as P

    engines, exact, fp, fp_key, same = {}, {}, None, None, True
    for case in args.cases:
        model = build_model(WEIGHTS[case][0])
        eng = convert.from_model(model, threads=args.threads, route=args.route)
        torch.set_num_threads(args.threads)
        twin = FloatEncoder(model)
        if fp is None:
            fp, fp_key = twin, _weights_key(twin)
        else:
            same = same and all(torch.equal(a, b) for a, b in zip(fp_key, _weights_key(twin)))
        del twin
        for j, cs in enumerate(sets):
            n = len(cs.batches) if args.exact_batches is None else min(args.exact_batches, len(cs.batches))
            exact[case, j] = (None, "skipped") if args.skip_exact else check_bit_exact(eng, model, cs.batches[:n])
            if not args.skip_exact and exact[case, j][0] and n < len(cs.batches):
                exact[case, j] = (True, f"checked on the first {n} of {len(cs.batches)} timed batches")
        del model
        gemm.malloc_trim()
        engines[case] = eng
        log(f"  engine {case}: routes {sorted({r for lay in eng.routes for r in lay.values()})}, bit_exact "
            f"{[exact[case, j][0] for j in range(len(sets))]}")
    peers = P.build_peers(fp, calib_rows, sets[0].batches[0], args.threads,
                          only=[p for p in args.peers if p != "none"], log=log) if fp is not None else {}
    torch.set_num_threads(args.threads)
    rows = []
    for j, cs in enumerate(sets):
        contenders = {"fp32": fp}
        contenders.update({n: p.run for n, p in peers.items() if p.run is not None})
        contenders.update({f"engine_{c}": e.encode for c, e in engines.items()})
        one = len(cs.batches) == 1 and cs.batch == 1  # a single small forward: more repetitions
        reps = args.reps * (3 if one else 1)
        times = time_contenders(contenders, cs.batches, reps)
        tf = times["fp32"]
        n_sent = sum(b.shape[0] for b in cs.batches)
        base = dict(inputs=cs.inputs, shape=cs.shape, threads=args.threads, batch=cs.batch, batches=len(cs.batches),
                    sentences=n_sent, reps=reps, fp32_ms=round(1000 * statistics.median(tf), 2),
                    fp32_sentences_per_s=round(n_sent / statistics.median(tf), 1), same_fp32_weights=same, **cs.extra)
        for name, tc in times.items():
            ratios = [f / c for f, c in zip(tf, tc)]
            row = dict(base, contender=name, ms=round(1000 * statistics.median(tc), 2),
                       sentences_per_s=round(n_sent / statistics.median(tc), 1),
                       speedup_median=round(statistics.median(ratios), 3), speedup_min=round(min(ratios), 3),
                       speedup_max=round(max(ratios), 3))
            if name in peers:
                pr = peers[name]
                row.update(library=pr.library, version=pr.version, route=pr.route)
            elif name == "fp32":
                row.update(library="torch", version=torch.__version__,
                           route="plain FP32 encoder (nn.Linear, SDPA, nn.LayerNorm, exact GELU)",
                           fp32_weight_mb=round(fp32_weight_bytes(fp) / 2 ** 20, 1))
            else:
                case = name[len("engine_"):]
                eng = engines[case]
                wb, label = WEIGHTS[case]
                routes = sorted({r for lay in eng.routes for r in lay.values()})
                ok, why = exact[case, j]
                row.update(library="ibert_plugin engine", version="this tree", case=case, weights=label,
                           weight_bits=int(wb), routes=routes, route=f"{','.join(routes)} + fused attention_u8",
                           attention_route="fused attention_u8", int_ms=row["ms"],
                           int_sentences_per_s=row["sentences_per_s"], bit_exact=ok, bit_exact_note=why,
                           int_weight_mb=round(eng.weight_bytes(include_head=False) / 2 ** 20, 1),
                           vs_peers={p: _stats([tp / c for tp, c in zip(times[p], tc)]) for p in times
                                     if p in peers})
                ints = [p for p in P.INT8_PEERS if p in row["vs_peers"]]
                if ints:
                    best = min(ints, key=lambda p: statistics.median(times[p]))
                    row["vs_fastest_int8_peer"] = dict(peer=best, **row["vs_peers"][best])
            rows.append(row)
            log(f"{cs.inputs:5s} B={cs.batch:<2d} {name:17s} {row['ms']:9.1f} ms  x{row['speedup_median']:.2f} "
                f"[{row['speedup_min']:.2f}, {row['speedup_max']:.2f}]" +
                (f"  bit_exact={row['bit_exact']}" if "bit_exact" in row else ""), flush=True)
        if args.profile:
            for case, eng in engines.items():
                eng.profile, eng.timings = True, {}
                with torch.no_grad():
                    for b in cs.batches:
                        eng.encode(b)
                eng.profile = False
                log(f"  profile {cs.inputs} {case} B={cs.batch}: " + ", ".join(
                    f"{k} {1000 * v:.1f}" for k, v in sorted(eng.timings.items(), key=lambda kv: -kv[1])) + " ms")
    return rows, {n: p.describe() for n, p in peers.items()}


def main(argv=None):
    import peers as P

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (a single batch-1 forward uses 3x)")
    ap.add_argument("--inputs", nargs="+", choices=["real", "base", "squad"], default=["real", "base", "squad"])
    ap.add_argument("--cases", nargs="+", choices=list(WEIGHTS), default=["8bit", "7bit", "ternary"])
    ap.add_argument("--peers", nargs="+", choices=list(P.PEERS) + ["none"], default=list(P.PEERS),
                    help="deployment peers to time (benchmarks/peers.py); 'none' for engine vs FP32 only")
    ap.add_argument("--layers", type=int, default=BASE_DIMS["layers"], help="roberta_base layers (base inputs)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="base inputs: batch sizes")
    ap.add_argument("--real-batches", type=int, nargs="+", default=[1, 8, 32], help="real inputs: batch sizes")
    ap.add_argument("--squad-seq", type=int, default=384, help="squad inputs: window length (MiniLM)")
    ap.add_argument("--squad-batch", type=int, default=8, help="squad inputs: windows per batch")
    ap.add_argument("--dev-sentences", type=int, default=1000, help="real inputs: first N RT-SENT dev sentences")
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 repetitions, batch 8, 96 dev sentences")
    ap.add_argument("--profile", action="store_true", help="print a per-op breakdown of the engine")
    ap.add_argument("--skip-exact", action="store_true", help="skip the bit-exactness check")
    ap.add_argument("--exact-batches", type=int, default=None,
                    help="check bit-exactness on the first N timed batches of each case only (default: all)")
    ap.add_argument("--route", choices=engine.IntegerEngine.ROUTE_CHOICES, default="auto", help="engine GEMM routes")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.reps, args.batches, args.real_batches, args.dev_sentences = 2, 2, [8], [8], 96
    for name in ("threads", "reps", "layers", "seq", "dev_sentences", "squad_seq", "squad_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batches + args.real_batches) < 1:
        ap.error("batch sizes must be >= 1")
    if args.exact_batches is not None and args.exact_batches < 1:
        ap.error("--exact-batches must be >= 1")
    if "none" in args.peers and len(args.peers) > 1:
        ap.error("--peers none cannot be combined with peer names")

    torch.set_num_threads(args.threads)
    gemm.set_default_threads(args.threads)
    results, contenders = [], {}
    try:
        if "real" in args.inputs or "squad" in args.inputs:
            d, calib, dev, state, lengths = _minilm_data(args.dev_sentences, args.real_batches)
            model_desc = "imported MiniLM (6 x 384, FFN 1536)"
            real_desc = dict(model=model_desc, data="RT-SENT dev (file order, padded per batch)",
                             mean_len=round(statistics.mean(lengths), 1), max_len=max(lengths))
            sets = [CaseSet("real", b, dev[b], "minilm", dict(real_desc))
                    for b in args.real_batches if "real" in args.inputs]
            if "squad" in args.inputs:
                sets.append(CaseSet("squad", args.squad_batch,
                                    [_random_tokens(args.squad_batch, args.squad_seq, len(d), seed=7)], "minilm",
                                    dict(model=model_desc, data="random tokens (SQuAD-length windows)",
                                         seq=args.squad_seq)))
            rows = [r[r.ne(d.pad())] for b in calib for r in b]  # the 48 train sentences, unpadded
            print(f"== MiniLM: {', '.join(f'{c.inputs} b{c.batch}' for c in sets)}", flush=True)
            r, c = run_group(lambda wb: minilm_model(wb, d, state, calib), sets, rows, args)
            results += r
            contenders["minilm"] = c
        if "base" in args.inputs:
            sets = [CaseSet("base", b, [_random_tokens(b, args.seq, BASE_DIMS["vocab"], seed=100 + b)],
                            "roberta_base", dict(layers=args.layers, seq=args.seq,
                                                 model="ibert_roberta_base, random BERT-init weights"))
                    for b in args.batches]
            rows = [t for i in range(2) for t in _random_tokens(4, args.seq, BASE_DIMS["vocab"], seed=11 + i)]
            print(f"== roberta_base ({args.layers} layers): batches {args.batches}", flush=True)
            r, c = run_group(lambda wb: base_model(wb, args.layers, args.seq), sets, rows, args)
            results += r
            contenders["roberta_base"] = c
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(f"{'inputs':6s} {'batch':>5s} {'contender':17s} {'ms':>9s} {'x FP32':>7s} {'[min, max]':>14s} "
          f"{'vs fastest int8 peer':>26s} {'bit_exact':>9s}")
    for r in results:
        vs = r.get("vs_fastest_int8_peer")
        vs_s = f"{vs['median']:.2f} ({vs['peer']})" if vs else ""
        print(f"{r['inputs']:6s} {r['batch']:5d} {r['contender']:17s} {r['ms']:9.1f} {r['speedup_median']:7.2f} "
              f"{'[%.2f, %.2f]' % (r['speedup_min'], r['speedup_max']):>14s} {vs_s:>26s} "
              f"{str(r.get('bit_exact', '')):>9s}")
    eng_rows = [r for r in results if r["contender"].startswith("engine_")]
    summary = dict(benchmark="integer_engine", threads=args.threads, quick=args.quick, load=os.getloadavg(),
                   cpu=_cpu_name(), cpu_isa=_cpu_isa(), cpu_vnni=_has_vnni(), torch=torch.__version__,
                   contenders=contenders, results=results,
                   speedup="median [min, max] over repetitions of FP32-PyTorch time / contender time; vs_peers: "
                           "peer time / engine time per repetition",
                   bit_exact_reference="QAT model's hooked integers and logits (engine.qat_compare)",
                   all_bit_exact=all(r["bit_exact"] for r in eng_rows) if not args.skip_exact else None)
    print(json.dumps(summary))
    return 0


def _has_vnni():
    from ibert_plugin.engine import kernels

    fb = kernels.load_fbgemm()
    return None if fb is None else bool(fb.has_vnni())


if __name__ == "__main__":
    sys.exit(main())
