"""Running a planned stage: the fairseq-train process(es) tee'd to the log, resume records, export, the summary.

``main(argv) -> RunResult`` (raises :class:`~.options.RunError` for usage errors) and ``cli(argv) -> exit code``
are what ``run.py`` exposes.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..catalog import SQUAD_TASKS
from ..quant.config import ConfigError
from ..wiring.lifetime import LIFETIME_ENV, RunLock, RunLockedError, child_preexec
from .allocator import allocator_env
from .allocator import describe as describe_allocator
from .options import RunError, parse_args
from .plan import REPO, Plan, make_plan

__all__ = ["RunResult", "main", "cli", "parse_best"]


@dataclasses.dataclass
class RunResult:
    """Outcome of one stage (``argv``: the fairseq-train command(s), one per launched process)."""

    returncode: int
    task: str
    mode: str
    log_path: Optional[str]
    ckpt_dir: Optional[str]
    checkpoint: Optional[str]  # checkpoint_best.pt when it exists
    metric: str
    best: Optional[float]
    wall_time: float
    argv: List[List[str]]
    resumed: bool = False
    packed_model: Optional[str] = None
    dry_run: bool = False
    failed_step: Optional[str] = None  # "fairseq-train" or "export" when returncode != 0

    def summary(self) -> str:
        best = "n/a" if self.best is None else f"{self.best:g}"
        ckpt = self.packed_model or self.checkpoint or "none"
        return (f"summary: {self.task} [{self.mode}] best dev {self.metric} = {best} | checkpoint: {ckpt} | "
                f"log: {self.log_path} | wall time {self.wall_time:.1f}s")


class _Tee:
    """Copies a child's merged stdout/stderr to our stdout verbatim (tqdm redraws included) and to the log file
    line by line, keeping only the last carriage-return segment of each line."""

    def __init__(self, log_file):
        self.log = log_file
        self.pending = ""

    def feed(self, data: bytes) -> None:
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        except (AttributeError, ValueError):  # stdout replaced (e.g. captured): text only
            sys.stdout.write(data.decode("utf-8", "replace"))
        self.pending += data.decode("utf-8", "replace")
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.log.write(line.rsplit("\r", 1)[-1].rstrip("\r") + "\n")
        self.log.flush()

    def close(self) -> None:
        if self.pending:
            self.log.write(self.pending.rsplit("\r", 1)[-1] + "\n")
            self.pending = ""
        self.log.flush()



def _child_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _launch(plan: Plan, side_logs: list, alloc: Dict[str, str], lock: RunLock) -> List[subprocess.Popen]:
    """Start every rank: rank 0 with a pipe (tee'd to the log), the others writing ``<stamp>.rankN.log``;
    ``alloc`` is :func:`~.allocator.allocator_env`'s choice of malloc. Each rank dies with this process
    (``PR_SET_PDEATHSIG``, also for the workers fairseq spawns) and holds the run folder's ``lock`` too."""
    procs = []
    for rank, (argv, env) in enumerate(zip(plan.argvs, plan.env_per_rank)):
        env = _child_env({**alloc, **env, LIFETIME_ENV: "1"})
        kw = dict(stderr=subprocess.STDOUT, env=env, preexec_fn=child_preexec(), pass_fds=(lock.fd,))
        if rank == 0:
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, **kw))
        else:
            side_logs.append(open(plan.config_dir / f"{plan.stamp}.rank{rank}.log", "a", encoding="utf-8"))
            procs.append(subprocess.Popen(argv, stdout=side_logs[-1], **kw))
    return procs


def _pump(proc: subprocess.Popen, tee: _Tee) -> threading.Thread:
    def run():
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            tee.feed(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _stop(procs: List[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait(procs: List[subprocess.Popen]) -> int:
    """0 when every rank exits cleanly; the first failure code otherwise (the other ranks, which would block in a
    collective, are stopped)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            _stop(procs)
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def run_processes(plan: Plan, alloc: Dict[str, str], lock: RunLock) -> int:
    """Run the fairseq-train process(es) to the end (``alloc``: :func:`~.allocator.allocator_env`'s variables;
    ``lock``: the held :class:`~ibert_plugin.wiring.lifetime.RunLock` of the run folder); on interruption stop them
    all and re-raise."""
    procs: List[subprocess.Popen] = []
    side_logs: list = []
    with open(plan.log_path, "a", encoding="utf-8") as log:
        log.write(f"[run.py] memory allocator: {describe_allocator(alloc)}\n")
        tee = _Tee(log)
        try:
            procs = _launch(plan, side_logs, alloc, lock)
            pump = _pump(procs[0], tee)
            rc = _wait(procs)
            pump.join(timeout=10)
            return rc
        except BaseException:
            _stop(procs)
            raise
        finally:
            tee.close()
            for f in side_logs:
                f.close()


_FLOAT = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"


def parse_best(log_text: str, metric: str, subset: str = "valid") -> Optional[float]:
    """Best dev metric from fairseq's validation lines (``best_<metric>`` when logged, else the max seen)."""
    best_re = re.compile(rf"\|\s*best_{re.escape(metric)}\s+{_FLOAT}\s*(?:\||$)")
    val_re = re.compile(rf"\|\s*{re.escape(metric)}\s+{_FLOAT}\s*(?:\||$)")
    tag = f"valid on '{subset}' subset"
    best, seen = None, []
    for line in log_text.splitlines():
        if tag not in line:
            continue
        m = best_re.search(line)
        if m:
            best = float(m.group(1))
        m = val_re.search(line)
        if m:
            seen.append(float(m.group(1)))
    if best is None and seen:
        best = max(seen)
    return best


def repair_last_checkpoint(ckpt_dir: Path) -> Optional[str]:
    """An interrupted run can leave a truncated checkpoint_last.pt (killed while fairseq copied it). Replace it with
    the newest readable checkpoint in the same folder, or remove it so fairseq restarts from --finetune-from-model."""
    last = ckpt_dir / "checkpoint_last.pt"
    if not last.is_file() or zipfile.is_zipfile(last):
        return None
    others = sorted((p for p in ckpt_dir.glob("checkpoint*.pt") if p != last and zipfile.is_zipfile(p)),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    if others:
        shutil.copyfile(others[0], last)
        return f"checkpoint_last.pt was truncated; replaced by {others[0].name}"
    last.unlink()
    return "checkpoint_last.pt was truncated and no other checkpoint is readable; removed it"


def write_record(plan: Plan, status: str, **extra) -> None:
    """Atomically write ``<stamp>.json``: the resume key and the run's status (running, interrupted, ...)."""
    rec = {"key": plan.key, "status": status, "stamp": plan.stamp, "mode": plan.mode, "task": plan.task,
           "argv": plan.argvs, "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    rec.update(extra)
    tmp = plan.record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, plan.record_path)


def export_packed(plan: Plan) -> Tuple[int, Optional[Path]]:
    """``python -m ibert_plugin.export --omit-lm-head`` on checkpoint_best.pt (sentence classification never uses
    the masked-LM head); drops the float checkpoints unless they are to be kept."""
    best = plan.ckpt_dir / "checkpoint_best.pt"
    if not best.is_file():
        with open(plan.log_path, "a") as log:
            log.write(f"[run.py] export skipped: {best} not found\n")
        return 1, None
    out = plan.ckpt_dir / "model_packed.pt"
    cmd = [sys.executable, "-m", "ibert_plugin.export", "--checkpoint", str(best), "--output", str(out),
           "--omit-lm-head"]
    with open(plan.log_path, "a") as log:
        log.write(f"[run.py] {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=_child_env({})).returncode
    if rc != 0:
        return rc, None
    if not plan.keep_fp:
        for ck in plan.ckpt_dir.glob("checkpoint*.pt"):
            ck.unlink()
    return 0, out


def _print_dry_run(plan: Plan) -> None:
    for cmd, env in zip(plan.argvs, plan.env_per_rank):
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        print((prefix + " " if prefix and len(plan.argvs) > 1 else "") + shlex.join(cmd))


def _start_log(plan: Plan) -> None:
    plan.config_dir.mkdir(parents=True, exist_ok=True)
    repair = repair_last_checkpoint(plan.ckpt_dir) if plan.resumed else None
    with open(plan.log_path, "a", encoding="utf-8") as log:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        log.write(f"[run.py] {'resume' if plan.resumed else 'start'} {now} (GMT)\n")
        if repair:
            log.write(f"[run.py] {repair}\n")
            print(f"[run.py] {repair}", flush=True)
        for cmd in plan.argvs:
            log.write(f"[run.py] {shlex.join(cmd)}\n")


def main(argv: Optional[Sequence[str]] = None) -> RunResult:
    """Plan and run one stage (``--dry-run``: plan and print the command(s) only)."""
    t0 = time.time()
    args = parse_args(argv)
    plan = make_plan(args)
    try:
        alloc = allocator_env()
    except ConfigError as e:
        raise RunError(str(e)) from None
    if args.dry_run:
        _print_dry_run(plan)
        return RunResult(0, plan.task, plan.mode, str(plan.log_path), str(plan.ckpt_dir), None, plan.metric, None,
                         time.time() - t0, plan.argvs, resumed=plan.resumed, dry_run=True)
    try:
        lock = RunLock(plan.ckpt_dir).acquire()  # before anything touches the folder, its log or its record
    except RunLockedError as e:
        raise RunError(str(e)) from None
    except OSError as e:
        raise RunError(f"cannot lock the run folder {plan.ckpt_dir}: {e.strerror}") from None
    with lock:
        _start_log(plan)
        write_record(plan, "running")
        print(f"[run.py] {'resuming' if plan.resumed else 'starting'} {plan.task} [{plan.mode}]; log: "
              f"{plan.log_path}", flush=True)
        try:
            rc = run_processes(plan, alloc, lock)
        except KeyboardInterrupt:
            write_record(plan, "interrupted")
            raise
        packed, failed_step = None, ("fairseq-train" if rc != 0 else None)
        if rc == 0 and plan.export:
            rc, packed = export_packed(plan)
            failed_step = "export" if rc != 0 else None
        write_record(plan, "finished" if rc == 0 else "failed", returncode=rc)
    best_ckpt = plan.ckpt_dir / "checkpoint_best.pt"
    text = plan.log_path.read_text(encoding="utf-8", errors="replace")
    return RunResult(
        returncode=rc, task=plan.task, mode=plan.mode, log_path=str(plan.log_path),
        ckpt_dir=None if plan.no_save else str(plan.ckpt_dir),
        checkpoint=str(best_ckpt) if best_ckpt.is_file() else None, metric=plan.metric,
        best=parse_best(text, plan.metric), wall_time=time.time() - t0, argv=plan.argvs, resumed=plan.resumed,
        packed_model=str(packed) if packed else None, failed_step=failed_step)


def _sigterm(signum, frame):  # treat `kill <run.py pid>` like Ctrl-C: stop the workers, keep the run resumable
    raise KeyboardInterrupt


def _task_of(argv: Sequence[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == "--":
            return None
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return None


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``run.py``'s exit code: 0, 2 (usage; one ``error:`` line), 130 (interrupted) or fairseq's.

    ``--task SQUAD1|SQUAD2`` runs the span-extraction recipe (:func:`ibert_plugin.recipes.squad.run_squad`) instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if _task_of(argv) in SQUAD_TASKS:
        from .squad import run_squad

        return run_squad(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
    try:
        result = main(argv)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("error: interrupted; relaunch the same command to resume", file=sys.stderr)
        return 130
    if result.dry_run:
        return 0
    if result.returncode != 0:
        print(f"error: {result.failed_step} failed with exit code {result.returncode}; see {result.log_path}",
              file=sys.stderr)
        return result.returncode
    print(result.summary(), flush=True)
    return 0
