"""The engine's exact-double requantization against its int64 formulas, in one process, interleaved.

On AVX2 builds (no 64-bit multiply or arithmetic shift) ``resid_ln``, i-GELU and attention requantize in exact
doubles (``docs/engine.md``); ``kernels.set_double_requant(False)`` forces the int64 formulas. Both forms give the
same integers (``tests/test_engine_kernels.py``); this measures what the double form buys on the shipped engine:
the imported MiniLM compiled to W7A8 or ternary, the first ``--dev-sentences`` RT-SENT dev sentences in file order
(padded per batch), every repetition timing both forms back to back. Per form: the engine's total and its per-op
times (``IntegerEngine.profile``). On an AVX-512 build the double form is off and both arms run the int64 formulas.

    python benchmarks/requant_forms.py --threads 1 --batch 32 --weight-bits 7

Prints a table, then ONE JSON object as the last line.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import harness
import integer_engine as IE  # benchmarks/integer_engine.py: MiniLM data and models
from ibert_plugin.engine import EngineError, convert, kernels
from ibert_plugin.engine.engine import IntegerEngine


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--weight-bits", choices=["8", "7", "2"], default="7")
    p.add_argument("--dev-sentences", type=int, default=256)
    p.add_argument("--reps", type=int, default=4)
    a = p.parse_args(argv)
    if a.threads < 1 or a.batch < 1 or a.dev_sentences < 1 or a.reps < 2:
        raise EngineError("--threads, --batch and --dev-sentences must be >= 1, --reps >= 2")
    torch.set_num_threads(a.threads)
    K = kernels.load()
    d, calib, dev, state, _ = IE._minilm_data(a.dev_sentences, [a.batch])
    eng = IntegerEngine(convert.compile_model(IE.minilm_model(a.weight_bits, d, state, calib)), threads=a.threads)
    batches = dev[a.batch]
    eng.profile = True
    totals = {"double": [], "int64": []}
    ops = {"double": {}, "int64": {}}
    try:
        for rep in range(a.reps + 1):  # the first round warms both forms up and is not counted
            for form in ("double", "int64"):
                K.set_double_requant(form == "double")
                eng.timings = {}
                t0 = time.perf_counter()
                for b in batches:
                    eng.encode(b)
                dt = time.perf_counter() - t0
                if rep:
                    totals[form].append(dt)
                    for k, v in eng.timings.items():
                        ops[form][k] = ops[form].get(k, 0.0) + v / a.reps
    finally:
        K.set_double_requant(True)
    ratio = harness.summarize([i / d_ for i, d_ in zip(totals["int64"], totals["double"])])
    s = {f: harness.summarize(v) for f, v in totals.items()}
    print(f"engine W{a.weight_bits}A8, batch {a.batch}, {a.threads} thread(s), {a.dev_sentences} sentences, "
          f"double form active: {K.double_requant_active()}")
    print(f"  total: double {s['double'].median * 1e3:.0f} ms, int64 {s['int64'].median * 1e3:.0f} ms; "
          f"int64 / double {ratio.median:.3f} [{ratio.min:.3f}, {ratio.max:.3f}]")
    for k in sorted(ops["double"]):
        print(f"  {k:<12} double {ops['double'][k] * 1e3:8.1f} ms   int64 {ops['int64'].get(k, 0) * 1e3:8.1f} ms")
    rec = {"benchmark": "requant_forms", "cpu": IE._cpu_name(), "cpu_isa": IE._cpu_isa(),
           "double_form_active": K.double_requant_active(), "weight_bits": int(a.weight_bits), "batch": a.batch,
           "threads": a.threads, "sentences": a.dev_sentences, "reps": a.reps,
           "total_ms": {f: s[f].median * 1e3 for f in s},
           "int64_over_double": {"median": ratio.median, "min": ratio.min, "max": ratio.max},
           "ops_ms": {f: {k: v * 1e3 for k, v in o.items()} for f, o in ops.items()}}
    harness.emit(rec)
    return rec


if __name__ == "__main__":
    try:
        main()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
