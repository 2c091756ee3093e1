"""CPU training step time under the system malloc and under jemalloc, as the recipes launch their training children.

Runs ``benchmarks/qat_overhead.py`` (the shipped ``ibert_roberta`` training step: criterion forward, backward, Adam;
FP, I-BERT symmetric QAT and TernaryBERT distillation) in child processes, alternately with the system allocator
(``IBERT_CPU_ALLOCATOR=system``) and with the environment :func:`ibert_plugin.recipes.allocator.allocator_env` gives
a ``fairseq-train`` child (jemalloc preloaded, ``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``), ``--rounds``
times each. For every shape and mode it reports the median step time (wall, the process's threads) of each
allocator and the per-round ratio jemalloc / system (median [min, max]); below 1 is faster.

Needs libjemalloc (Debian: ``apt-get install libjemalloc2``; ``make demo`` installs it when it can); without it the
script stops with one ``error:`` line. Prints a table, then ONE JSON object as the last line.
Usage: ``OMP_NUM_THREADS=2 python benchmarks/cpu_allocator.py [--shapes minilm,minilm_squad] [--rounds 3]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from harness import emit, summarize
from ibert_plugin.recipes.allocator import allocator_env, describe

HERE = Path(__file__).resolve().parent

ALLOCATORS = ("system", "jemalloc")


def _run(shapes: str, reps: int, env: dict) -> dict:
    p = subprocess.run([sys.executable, str(HERE / "qat_overhead.py"), "--shapes", shapes, "--reps", str(reps)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"error: qat_overhead.py failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="minilm,minilm_squad", help="qat_overhead.py shapes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="runs per allocator, alternating")
    ap.add_argument("--reps", type=int, default=2, help="timed steps per mode inside each run (after a warm-up)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.reps < 1:
        print("error: --rounds and --reps must be >= 1", file=sys.stderr)
        return 2
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    jem = allocator_env({**base, "IBERT_CPU_ALLOCATOR": "auto"})
    if not jem:
        print("error: no libjemalloc on this machine (apt-get install libjemalloc2)", file=sys.stderr)
        return 2
    envs = {"system": dict(base, IBERT_CPU_ALLOCATOR="system"), "jemalloc": {**base, **jem}}
    runs = {a: [] for a in ALLOCATORS}
    for r in range(args.rounds):
        for alloc in (ALLOCATORS if r % 2 == 0 else ALLOCATORS[::-1]):
            print(f"[cpu_allocator] round {r + 1}/{args.rounds}: {alloc}", file=sys.stderr, flush=True)
            runs[alloc].append(_run(args.shapes, args.reps, envs[alloc]))
    threads = runs["system"][0]["threads"]
    results = []
    print(f"training step wall time, {threads} thread(s), {args.rounds} alternating runs per allocator x "
          f"{args.reps} steps; jemalloc: {describe(jem)}")
    print(f"{'shape':<24}{'mode':<17}{'system s':>10}{'jemalloc s':>12}{'jemalloc / system':>26}")
    for i, shape in enumerate(runs["system"][0]["results"]):
        name = f"{shape['shape']} {shape['layers']}L b{shape['batch']}x{shape['seq']}"
        row = {"shape": shape["shape"], "batch": shape["batch"], "seq": shape["seq"], "modes": {}}
        for mode in shape["step_wall_s"]:
            t = {a: [run["results"][i]["step_wall_s"][mode] for run in runs[a]] for a in ALLOCATORS}
            ratios = summarize([j / s for s, j in zip(t["system"], t["jemalloc"])])
            rec = {"system_s": summarize(t["system"]).median, "jemalloc_s": summarize(t["jemalloc"]).median,
                   **ratios.to_dict("ratio")}
            row["modes"][mode] = rec
            print(f"{name:<24}{mode:<17}{rec['system_s']:>10.3f}{rec['jemalloc_s']:>12.3f}"
                  f"{rec['ratio']:>10.2f} [{rec['ratio_min']:.2f}, {rec['ratio_max']:.2f}]")
            name = ""
        results.append(row)
    emit({"benchmark": "cpu_allocator", "threads": threads, "rounds": args.rounds, "reps": args.reps,
          "jemalloc_env": jem, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
