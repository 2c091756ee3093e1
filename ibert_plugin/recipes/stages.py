"""The stage runner of the demo and of the benchmarks that reuse its stages: ``run.py`` stages with a schedule, a
progress watcher and reuse of finished stages.

* :func:`schedule_flags` / :func:`validation_count`: the ``run.py`` flags of a stage of N updates (LR warmup and
  linear decay fitted to N, validation and saving every so many updates) and how many validation passes fairseq
  makes for it (``updates_per_epoch`` is the task's: RT-SENT has 268 at batch 32);
* :class:`Stage`: one stage (its ``run.py`` argv and its kind in the cost model :data:`COST`);
* :class:`Progress`: reads the stage's fairseq log while it trains and reports updates done and time left;
* :func:`run_stage`: runs the stage in-process (``run.py``'s :func:`ibert_plugin.recipes.execute.main`) unless a
  state file records it finished with the same argv (:class:`Done`);
* :func:`stage_output` / :func:`run_command`: everything a stage prints, its child processes' output included, into
  the stage's log file (and, verbose, the terminal too).

Notes and the commands run are printed with a ``[demo]`` tag, as the demo always did. Errors are :class:`StageError`
(the demo's ``DemoError``). No fairseq at import time: training runs in the ``fairseq-train`` processes ``run.py``
launches.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]

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


class StageError(Exception):
    """A stage failed; the message names the stage (the demo adds where its log is)."""


def note(msg: str) -> None:
    """A note on stderr (benchmarks that reuse the demo's stages; the demo itself prints through its console)."""
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def fmt_min(seconds: float) -> str:
    """``12.5 min``."""
    return f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------------------------------------ stage output
class LogSink(io.TextIOBase):
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
    :func:`run_command`) to ``log_path``; with ``verbose`` also stream it to ``terminal`` (default: the current
    stdout)."""
    terminal = terminal or sys.stdout
    outer = sys.stdout, sys.stderr
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        sink = LogSink(log, terminal if verbose else None)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield sink
            sink.flush()
        finally:
            _unhook_logging(sink, outer)


def _unhook_logging(sink, outer) -> None:
    """A logging handler created inside :func:`stage_output` (fairseq's ``basicConfig(stream=sys.stdout)`` on its
    first import) holds the stage's sink, whose log file closes with the block: point it back at the stream the block
    replaced (standard error: standard output may end with a program's JSON line), so that later records are not
    "I/O operation on closed file" errors."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is sink:
                h.setStream(outer[1])


def run_command(cmd: List[str], what: str) -> None:
    """Run a child process in the repository; its merged output goes to the current ``sys.stdout`` (a stage log
    inside :func:`stage_output`). A non-zero exit is a :class:`StageError` naming ``what``."""
    print(f"[demo] {what}: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for chunk in iter(lambda: proc.stdout.read1(65536), b""):
        sys.stdout.write(chunk.decode("utf-8", "replace"))
        sys.stdout.flush()
    rc = proc.wait()
    if rc != 0:
        raise StageError(f"{what} failed with exit code {rc}")


# ------------------------------------------------------------------------------------------------ schedule and ETA
@dataclass
class Stage:
    """One training stage of a plan: its ``run.py`` flags and its cost-model kind (a key of :data:`COST`)."""

    key: str
    label: str
    kind: str
    updates: int
    validations: int
    argv: List[str] = field(default_factory=list)

    def estimate(self) -> float:
        """Seconds the stage takes by the cost model: start, updates, validations and test-split scoring."""
        fixed, per_update, per_val = COST[self.kind]
        return fixed + per_update * self.updates + per_val * self.validations + SCORE_S[self.kind]


def schedule_flags(updates: int, warmup: float, validate_every: Optional[int]) -> List[str]:
    """run.py flags: stop after ``updates``, fit the LR schedule (warmup, linear decay) into it, and validate (and
    save, so that ``checkpoint_best.pt`` can come from mid-epoch) every ``validate_every`` updates."""
    flags = ["--max-update", str(updates), "--", "--total-num-update", str(updates),
             "--warmup-updates", str(int(updates * warmup)), "--log-interval", str(max(1, min(10, updates // 5)))]
    if validate_every and validate_every < updates:
        flags += ["--validate-interval-updates", str(validate_every), "--save-interval-updates", str(validate_every),
                  "--keep-interval-updates", "1"]
    return flags


def validation_count(updates: int, validate_every: Optional[int], updates_per_epoch: int) -> int:
    """Validation passes fairseq makes in a stage of ``updates``: every ``validate_every`` updates, at each epoch end
    (every ``updates_per_epoch``), and at the last update; a pass that falls on two of these counts once."""
    points = {updates}
    points |= set(range(updates_per_epoch, updates + 1, updates_per_epoch))
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
        console: where the stage line is drawn (an object with ``progress(step, fraction, detail)`` and ``tty``, the
            demo's ``Console``); None prints a note on stderr every ``interval`` instead.
    """

    def __init__(self, output_dir: Path, interval: float = 60.0, console=None):
        self.output_dir = output_dir
        self.interval = interval
        self.console = console
        self.speed = 1.0  # observed / modelled time per update, carried to later stages

    @staticmethod
    def updates_in(log_text: str) -> Optional[int]:
        """The last update count (``num_updates``) in a fairseq log, None before the first."""
        hits = re.findall(r"num_updates[= ](\d+)", log_text)
        return int(hits[-1]) if hits else None

    def _newest_log(self, since: float) -> Optional[Path]:
        logs = [p for p in self.output_dir.glob("*/*/*/*.log") if ".rank" not in p.name and p.stat().st_mtime >= since]
        return max(logs, key=lambda p: p.stat().st_mtime) if logs else None

    def _show(self, step: str, fraction: Optional[float], detail: str) -> None:
        if self.console is not None:
            self.console.progress(step, fraction, detail)
        else:
            note(f"{step} {detail}")

    def watch(self, stage: Stage, later_s: float, stop: threading.Event, step: Optional[str] = None) -> None:
        """Report ``stage``'s progress until ``stop`` is set; ``later_s``: cost-model seconds of the stages after it,
        ``step``: the stage line's name (default the stage's label)."""
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
                eta = f", ~{fmt_min(left)} left (demo ~{fmt_min(left + later_s * self.speed)})" if left > 0 else ""
                self._show(step, 0.0, f"starting, {fmt_min(elapsed)} elapsed{eta}")
                continue
            if done != seen:
                seen, t_seen = done, time.time()
            # the rate as of the latest update: after the last one, validation / export / scoring time must not
            # read as slower training (it would inflate every later stage's estimate)
            trained = t_seen - t0
            rate = max(trained - COST[stage.kind][0], 0.5 * trained) / done
            self.speed = max(0.25, min(4.0, rate / per_update))
            if done >= stage.updates:
                self._show(step, 1.0, f"{done}/{stage.updates} updates, {fmt_min(elapsed)} elapsed; final "
                                      f"validation and checkpoint (demo ~{fmt_min(later_s * self.speed)} after)")
                continue
            left = rate * (stage.updates - done) + COST[stage.kind][2] + SCORE_S[stage.kind]
            self._show(step, done / stage.updates,
                       f"{done}/{stage.updates} updates, {fmt_min(elapsed)} elapsed, ~{fmt_min(left)} left "
                       f"(demo ~{fmt_min(left + later_s * self.speed)})")


# ----------------------------------------------------------------------------------------------------------- stages
class Done:
    """A stage result remembered from an earlier run (same run.py arguments, outputs still on disk): the fields of
    its state-file record (``checkpoint``, ``packed_model``, ``best``, ``metric``, ``stage_seconds``, ``log_path``)."""

    def __init__(self, record: Dict):
        self.__dict__.update(record)

    def summary(self) -> str:
        return f"reusing {self.checkpoint} (best dev {self.metric} = {self.best})"


def run_stage(stage: Stage, state_file: Path, fresh: bool, progress: Progress, later_s: float,
              step: Optional[str] = None):
    """Run one ``run.py`` stage (it spawns fairseq-train) and return its result (``run.py``'s ``RunResult`` with
    ``stage_seconds``, or a :class:`Done`).

    A stage that already finished with the same arguments (a record in ``state_file``, keyed by its argv) is reused
    instead of retrained (``fresh`` retrains). ``run.py``'s own output (fairseq's, tee'd) goes to the current
    ``sys.stdout``; ``progress`` watches the training, ``step`` names the stage line.
    """
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    key = " ".join(stage.argv)
    done = state.get(key)
    if done and not fresh and all(Path(p).exists() for p in (done["checkpoint"], done.get("packed_model") or "/")):
        result = Done(done)
        print(f"[demo] {stage.label}: {result.summary()}", flush=True)
        return result
    from .execute import main as run_main
    from .options import RunError

    print(f"[demo] {stage.label}: python run.py {key}", flush=True)
    t0 = time.time()
    stop = threading.Event()
    watcher = threading.Thread(target=progress.watch, args=(stage, later_s, stop, step), daemon=True)
    watcher.start()
    try:
        result = run_main(stage.argv)
    except RunError as e:
        raise StageError(f"{stage.label}: {e}") from None
    finally:
        stop.set()
        watcher.join(timeout=5)
    if result.returncode != 0 or not result.checkpoint:
        raise StageError(f"{stage.label} failed (exit {result.returncode}); see {result.log_path}")
    result.stage_seconds = time.time() - t0
    print(f"[demo] {result.summary()}", flush=True)
    state[key] = dict(checkpoint=result.checkpoint, packed_model=result.packed_model, best=result.best,
                      metric=result.metric, stage_seconds=result.stage_seconds, log_path=result.log_path)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=2))
    return result
