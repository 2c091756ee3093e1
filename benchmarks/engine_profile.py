"""Where the integer engine's time goes, per op, next to the FP32 PyTorch forward of the same weights.

Cases (``--shapes``):

* ``minilm``: the imported MiniLM (6 x 384, FFN 1536, 12 heads) calibrated on RT-SENT train sentences, on the first
  ``--dev-sentences`` RT-SENT dev sentences (the demo's engine-stage inputs, tokenized as the demo does) in batches
  of ``--real-batches`` (8 and 32), either in file order padded to each batch's longest row (``--order file``) or
  through ``IntegerEngine.predict_batches``'s length buckets (``--order length``).
* ``base``: a random-weight ``ibert_roberta_base`` (``--layers``), random tokens, seq ``--seq`` 128,
  ``--batch`` 1 and 8.
* ``squad``: the MiniLM models on SQuAD-length windows (``--squad-seq`` 384 random tokens, ``--squad-batch`` 8).

Per case it also reports the share of the engine's wall time spent in the linear GEMMs and the achieved int8
multiply-accumulates per second (GEMM MACs / GEMM time, and GEMM + attention MACs / engine time) against the CPU's
int8 peak for the routes used (``PEAK_GMACS_PER_CORE`` x threads, the reference AVX2 host's measured instruction-mix
peaks; ``--peak-gmacs`` for another CPU), and the FP32 forward's GMAC/s against the FP32 FMA peak.

Models and the FP32 twin come from ``benchmarks/integer_engine.py`` (the same calibration and the same plain FP32
encoder). Per op the engine's kernel module and GEMM objects are wrapped by timers (a wrapper costs ~1 us a call); a
call's time is charged to its op: ``gemm_qkv`` / ``gemm_out`` / ``gemm_fc1`` / ``gemm_fc2`` (with the route named),
``attention`` (one fused call: q/k/v requant, QK^T, i-softmax, P.V, context requant), ``resid_ln``, ``gelu``,
``embed_ln``; ``python`` is the rest of ``encode`` (argument checks, views, glue between calls). Both clocks are
recorded per repetition: wall (``perf_counter``) and the process's CPU time (``process_time``, all threads; it
includes OpenMP workers' spin-waits but not time spent descheduled, so on a loaded host it is the steadier of the
two). Reported: the median over ``--reps`` repetitions; FP32 and engine alternate inside each repetition.

    python benchmarks/engine_profile.py [--threads 2] [--reps 5] [--cases 7bit ternary]
                                        [--order file length] [--shapes minilm base squad]
    python benchmarks/engine_profile.py --quick          # 2 layers of base, 64 dev sentences, 2 repetitions

Prints a table per case, then ONE JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import integer_engine as IE  # noqa: E402  (benchmarks/integer_engine.py: models, calibration, FP32 twin)
from ibert_plugin.engine import EngineError, gemm  # noqa: E402
from ibert_plugin.engine.intmodel import LINEARS  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _Timer:
    """Accumulates wall and CPU seconds per op name."""

    def __init__(self):
        self.t = {c: defaultdict(float) for c in CLOCKS}
        self.calls = defaultdict(int)
        self.macs = defaultdict(int)

    def wrap(self, name, fn, macs=None):
        """``fn`` timed under ``name``; ``macs(*args, **kwargs)`` (optional) counts its multiply-accumulates."""
        def timed(*a, **k):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.t["wall"][name] += time.perf_counter() - w0
                self.t["cpu"][name] += time.process_time() - c0
                self.calls[name] += 1
                if macs is not None:
                    self.macs[name] += macs(*a, **k)
        return timed


class _KernelProxy:
    """The kernel module with every function timed under its own name (``gelu_u8`` etc.)."""

    OP = {"attention_u8": "attention", "attention_run": "attention", "resid_ln_run": "resid_ln", "gelu_run": "gelu_u8"}

    def __init__(self, K, timer):
        self._K, self._timer = K, timer

    def __getattr__(self, name):
        macs = _attention_macs if name in ("attention_u8", "attention_run") else None
        return self._timer.wrap(self.OP.get(name, name), getattr(self._K, name), macs)


def _attention_macs(*a, **k):
    """QK^T + P V multiply-accumulates of one attention call (the engine calls it by keyword): 2 B H T^2 dh =
    2 (B T) T D."""
    acc, B, T = k["acc"], int(k["batch"]), int(k["seq_len"])
    return 2 * B * T * T * (acc.shape[1] // 3)


#: Peak int8 multiply-accumulates per second per core by GEMM route, on the reference AVX2 host (2-core AMD EPYC
#: Zen 3, ~3.2 GHz, no VNNI; register-only loops of the route's instruction mix, docs in the CPU kernel reference):
#: u8 x s8 vpmaddubsw + vpmaddwd + vpaddd (fbgemm acc32, ORT u8s8) 99 G; int16 accumulation (fbgemm acc16,
#: ternary) 164 G; s16 x s16 vpmaddwd (ORT u8u8) 85 G. FP32 FMA: 51 G. Other CPUs: pass --peak-gmacs.
PEAK_GMACS_PER_CORE = {"fbgemm": 99.0, "u8s8": 99.0, "fbgemm16": 164.0, "u8u8": 85.0, "fp32": 51.0}


def instrument(eng, timer):
    """Wrap the engine's kernels and GEMM objects; returns a function that undoes it."""
    saved = [(eng, "K", eng.K)]
    eng.K = _KernelProxy(eng.K, timer)
    for lay in eng.layers:
        for k in LINEARS:
            g = getattr(lay, k)
            saved.append((lay, k, g))
            setattr(lay, k, timer.wrap(f"gemm_{'out' if k == 'out_proj' else k} [{g.route}]", g,
                                       lambda a, *_, g=g: a.numel() * g.N))

    def undo():
        for obj, k, v in saved:
            setattr(obj, k, v)
    return undo


def length_batches(rows, bs, pad):
    """The batches ``IntegerEngine.predict_batches`` forms: rows sorted by length, ``bs`` at a time, right-padded."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].numel())
    out = []
    for s in range(0, len(order), bs):
        idx = order[s: s + bs]
        t = torch.full((len(idx), rows[idx[-1]].numel()), pad, dtype=torch.int64)
        for j, i in enumerate(idx):
            t[j, : rows[i].numel()] = rows[i]
        out.append(t)
    return out


def profile_case(eng, fp, batches, reps, order, rows=None, bs=None):
    """Median per-op engine seconds (both clocks), median engine / FP32 totals, per-rep ratios."""
    def eng_run():
        if order == "length":
            eng.predict_batches(rows, bs)
        else:
            for b in batches:
                eng.encode(b)

    with torch.no_grad():
        for b in batches[:2]:
            fp(b)
        eng_run()
        per_rep, tot = [], {c: {"fp32": [], "int": []} for c in CLOCKS}
        for _ in range(reps):
            w0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                fp(b)
            w1, c1 = time.perf_counter(), time.process_time()
            timer = _Timer()
            undo = instrument(eng, timer)
            try:
                eng_run()
            finally:
                undo()
            w2, c2 = time.perf_counter(), time.process_time()
            tot["wall"]["fp32"].append(w1 - w0)
            tot["wall"]["int"].append(w2 - w1)
            tot["cpu"]["fp32"].append(c1 - c0)
            tot["cpu"]["int"].append(c2 - c1)
            for c in CLOCKS:
                timer.t[c]["python"] = tot[c]["int"][-1] - sum(timer.t[c].values())
            per_rep.append(timer)
    ops = sorted({k for t in per_rep for k in t.t["wall"]}, key=lambda k: -statistics.median(
        t.t["wall"].get(k, 0.0) for t in per_rep))
    med = {c: {k: statistics.median(t.t[c].get(k, 0.0) for t in per_rep) for k in ops} for c in CLOCKS}
    calls = {k: per_rep[0].calls.get(k, 0) for k in ops}
    calls["_macs"] = dict(per_rep[0].macs)
    ratios = {c: [f / i for f, i in zip(tot[c]["fp32"], tot[c]["int"])] for c in CLOCKS}
    return med, calls, tot, ratios


def mac_rates(med, macs, wall_int, threads, peak_override=None):
    """GEMM share of the engine's wall time and achieved int8 MAC/s vs the CPU's peak (per route, x threads)."""
    gemm_ops = [k for k in med["wall"] if k.startswith("gemm_")]
    gemm_s = sum(med["wall"][k] for k in gemm_ops)
    gemm_macs = sum(macs.get(k, 0) for k in gemm_ops)
    all_macs = gemm_macs + macs.get("attention", 0)
    routes = sorted({k.split("[")[1].rstrip("]") for k in gemm_ops})
    # peak of the route mix, weighted by MACs (the slowest route bounds a mixed model)
    peak = None
    if peak_override:
        peak = peak_override * 1e9 * threads
    elif all(r in PEAK_GMACS_PER_CORE for r in routes) and gemm_macs:
        per_route = defaultdict(int)
        for k in gemm_ops:
            per_route[k.split("[")[1].rstrip("]")] += macs.get(k, 0)
        t_peak = sum(m / (PEAK_GMACS_PER_CORE[r] * 1e9 * threads) for r, m in per_route.items())
        peak = gemm_macs / t_peak
    out = dict(gemm_share_wall=round(gemm_s / wall_int, 3), gemm_routes=routes, gemm_gmacs=round(gemm_macs / 1e9, 3),
               attention_gmacs=round(macs.get("attention", 0) / 1e9, 3),
               gemm_gmac_per_s=round(gemm_macs / gemm_s / 1e9, 1) if gemm_s else None,
               engine_gmac_per_s=round(all_macs / wall_int / 1e9, 1),
               peak_gmac_per_s=round(peak / 1e9, 1) if peak else None)
    if peak:
        out["gemm_pct_of_peak"] = round(100 * gemm_macs / gemm_s / peak, 1)
        out["engine_pct_of_peak"] = round(100 * all_macs / wall_int / peak, 1)
    return out


def report(label, med, calls, tot, ratios, n_sent, threads=2, peak=None):
    wall_int = statistics.median(tot["wall"]["int"])
    rates = mac_rates(med, calls.get("_macs", {}), wall_int, threads, peak)
    cpu_int = statistics.median(tot["cpu"]["int"])
    print(f"\n== {label}: {n_sent} sentences; engine {1000 * wall_int:.1f} ms wall / {1000 * cpu_int:.1f} ms CPU, "
          f"FP32 {1000 * statistics.median(tot['wall']['fp32']):.1f} ms wall / "
          f"{1000 * statistics.median(tot['cpu']['fp32']):.1f} ms CPU; FP32/engine median wall "
          f"x{statistics.median(ratios['wall']):.2f} [{min(ratios['wall']):.2f}, {max(ratios['wall']):.2f}], CPU "
          f"x{statistics.median(ratios['cpu']):.2f} [{min(ratios['cpu']):.2f}, {max(ratios['cpu']):.2f}]")
    print(f"  {'op':28s} {'calls':>6s} {'wall ms':>9s} {'wall %':>7s} {'cpu ms':>9s} {'cpu %':>7s}")
    for k in med["wall"]:
        print(f"  {k:28s} {calls.get(k, 0):6d} {1000 * med['wall'][k]:9.2f} {100 * med['wall'][k] / wall_int:6.1f}% "
              f"{1000 * med['cpu'][k]:9.2f} {100 * med['cpu'][k] / cpu_int:6.1f}%")
    pk = rates["peak_gmac_per_s"]
    print(f"  GEMMs {100 * rates['gemm_share_wall']:.1f}% of wall; GEMM {rates['gemm_gmac_per_s']} GMAC/s, "
          "whole engine "
          f"{rates['engine_gmac_per_s']} GMAC/s" + (f" vs peak {pk} GMAC/s ({rates['gemm_pct_of_peak']}% / "
                                                      f"{rates['engine_pct_of_peak']}%)" if pk else " (peak unknown)"))
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", nargs="+", choices=list(IE.WEIGHTS), default=["7bit", "ternary"])
    ap.add_argument("--shapes", nargs="+", choices=["minilm", "base", "squad"], default=["minilm", "base", "squad"])
    ap.add_argument("--order", nargs="+", choices=["file", "length"], default=["file"],
                    help="minilm: batches in file order, and/or IntegerEngine.predict_batches' length buckets")
    ap.add_argument("--real-batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--dev-sentences", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12, help="base: encoder layers")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="base: batch sizes")
    ap.add_argument("--squad-seq", type=int, default=384, help="squad: MiniLM window length (random tokens)")
    ap.add_argument("--squad-batch", type=int, default=8, help="squad: windows per batch")
    ap.add_argument("--peak-gmacs", type=float, default=None,
                    help="per-core int8 peak in GMAC/s (default: the reference host's per-route table)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.reps, args.dev_sentences = 2, 2, 64
    for name in ("threads", "reps", "layers", "seq", "dev_sentences", "squad_seq", "squad_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.real_batches + args.batch) < 1:
        ap.error("batch sizes must be >= 1")
    torch.set_num_threads(args.threads)
    gemm.set_default_threads(args.threads)
    results = []
    ns = argparse.Namespace(threads=args.threads, route="auto")

    def record(label, shape, case, batch, med, calls, tot, ratios, n_sent, **extra):
        rates = report(label, med, calls, tot, ratios, n_sent, args.threads, args.peak_gmacs)
        fp_s = statistics.median(tot["wall"]["fp32"])
        all_macs = 1e9 * (rates["gemm_gmacs"] + rates["attention_gmacs"])
        rates["fp32_gmac_per_s"] = round(all_macs / fp_s / 1e9, 1)
        rates["fp32_peak_gmac_per_s"] = PEAK_GMACS_PER_CORE["fp32"] * args.threads
        results.append(dict(shape=shape, case=case, batch=batch, med=med,
                            calls={k: v for k, v in calls.items() if k != "_macs"}, ratio_wall=ratios["wall"],
                            ratio_cpu=ratios["cpu"], int_wall_ms=1000 * statistics.median(tot["wall"]["int"]),
                            fp32_wall_ms=1000 * fp_s, **rates, **extra))

    try:
        if "minilm" in args.shapes or "squad" in args.shapes:
            d, calib, dev, state, lengths = IE._minilm_data(args.dev_sentences, args.real_batches)
            rows = [r[r.ne(d.pad())] for b in dev[args.real_batches[0]] for r in b]
            for case in args.cases:
                model = IE.minilm_model(IE.WEIGHTS[case][0], d, state, calib)
                eng, fp = IE.convert_both(model, ns)
                for b, order in [(b, o) for b in args.real_batches for o in args.order if "minilm" in args.shapes]:
                    # FP32 gets the batches predict_batches forms (same buckets) when the engine runs length-sorted
                    fb = dev[b] if order == "file" else length_batches(rows, b, d.pad())
                    med, calls, tot, ratios = profile_case(eng, fp, fb, args.reps, order, rows, b)
                    label = f"minilm {case} ({IE.WEIGHTS[case][1]}) batch {b} order {order}"
                    record(label, "minilm", case, b, med, calls, tot, ratios, len(rows), order=order,
                           mean_len=statistics.mean(lengths))
                if "squad" in args.shapes:
                    toks = [IE._random_tokens(args.squad_batch, args.squad_seq, len(d), seed=7)]
                    med, calls, tot, ratios = profile_case(eng, fp, toks, args.reps, "file")
                    record(f"minilm squad windows {case} ({IE.WEIGHTS[case][1]}) seq {args.squad_seq} batch "
                           f"{args.squad_batch}", "squad", case, args.squad_batch, med, calls, tot, ratios,
                           args.squad_batch, seq=args.squad_seq)
                del model, eng, fp
        if "base" in args.shapes:
            for case in args.cases:
                model = IE.base_model(IE.WEIGHTS[case][0], args.layers, args.seq)
                eng, fp = IE.convert_both(model, ns)
                for bs in args.batch:
                    toks = [IE._random_tokens(bs, args.seq, IE.BASE_DIMS["vocab"], seed=100 + bs)]
                    med, calls, tot, ratios = profile_case(eng, fp, toks, args.reps * (3 if bs == 1 else 1), "file")
                    record(f"roberta_base {case} ({IE.WEIGHTS[case][1]}) {args.layers} layers seq {args.seq} batch "
                           f"{bs}", "base", case, bs, med, calls, tot, ratios, bs, layers=args.layers)
                del model, eng, fp
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        r["med"] = {c: {k: round(1000 * v, 3) for k, v in r["med"][c].items()} for c in r["med"]}
        for c in ("wall", "cpu"):
            v = r.pop(f"ratio_{c}")
            r[f"speedup_{c}"] = dict(median=round(statistics.median(v), 3), min=round(min(v), 3),
                                     max=round(max(v), 3))
    print(json.dumps(dict(benchmark="engine_profile", threads=args.threads, reps=args.reps, load=os.getloadavg(),
                          units="ms (median over repetitions)", results=results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
