"""Process lifetime and run-folder locks (issue 24): a training child never outlives its launcher (``kill -9`` of
run.py, fairseq's spawned workers too), one trainer per run folder, atomic checkpoint copies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ibert_plugin.wiring.lifetime import LIFETIME_ENV, RunLock, RunLockedError

pytestmark = pytest.mark.slow  # whole pipelines / subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[1]


def _children(pid: int):
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(cond, timeout, step=0.1):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


def _kill_tree(pids):
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_run_lock_names_the_holder_and_is_released_by_death(tmp_path):
    with RunLock(tmp_path / "ck") as held:
        with pytest.raises(RunLockedError, match=rf"run folder {tmp_path / 'ck'} is in use by another trainer "
                                                 rf"\(PID {os.getpid()} holds \.run\.lock\)"):
            RunLock(tmp_path / "ck").acquire()
        assert held.fd is not None
    RunLock(tmp_path / "ck").acquire().release()  # released on exit
    # a holder killed with SIGKILL releases it too (kernel-held lock, no stale file to clean)
    code = (f"from ibert_plugin.wiring.lifetime import RunLock; import time; "
            f"RunLock({str(tmp_path / 'k')!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=f"PID {p.pid} "):
        RunLock(tmp_path / "k").acquire()
    p.kill()
    p.wait()
    RunLock(tmp_path / "k").acquire().release()


def test_atomic_checkpoint_copy_never_leaves_a_partial_destination(tmp_path, monkeypatch):
    """fairseq makes checkpoint_last.pt / checkpoint_best.pt with checkpoint_utils.PathManager.copy; a copy that
    dies half-way must leave the previous complete file (here: a copy that writes half the bytes, then fails)."""
    import shutil

    from fairseq import checkpoint_utils

    import ibert_plugin  # noqa: F401  (registers with fairseq)

    src, dst = tmp_path / "checkpoint1.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"N" * 1000)
    dst.write_bytes(b"O" * 800)
    real = shutil.copyfile

    def dying_copy(a, b, *args, **kw):
        with open(a, "rb") as f, open(b, "wb") as g:
            g.write(f.read()[:500])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", dying_copy)
    with pytest.raises(OSError):
        checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"O" * 800
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint1.pt", "checkpoint_last.pt"]
    monkeypatch.setattr(shutil, "copyfile", real)
    assert checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"N" * 1000


def test_spawned_workers_die_with_their_parent(tmp_path):
    """fairseq's multi-GPU ranks are torch.multiprocessing.spawn workers that import the plugin (``--user-dir``):
    under a launcher that set IBERT_DIE_WITH_PARENT they die when the process that spawned them is killed."""
    (tmp_path / "spawn_worker.py").write_text(textwrap.dedent("""
        import os, sys, time

        def work(i, out):
            import fairseq  # noqa: F401  (as fairseq's distributed_main does)
            import ibert_plugin  # noqa: F401  (fairseq_cli.train.main: import_user_module)
            open(os.path.join(out, f"w{i}"), "w").write(str(os.getpid()))
            time.sleep(120)

        if __name__ == "__main__":
            import torch.multiprocessing as mp
            mp.spawn(work, args=(sys.argv[1],), nprocs=2, join=True)
        """))
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}", **{LIFETIME_ENV: "1"})
    parent = subprocess.Popen([sys.executable, str(tmp_path / "spawn_worker.py"), str(tmp_path)], env=env)
    try:
        ok = _wait_for(lambda: all((tmp_path / f"w{i}").is_file() and (tmp_path / f"w{i}").read_text()
                                   for i in range(2)), 120)
        assert ok, "workers did not start"
        workers = [int((tmp_path / f"w{i}").read_text()) for i in range(2)]
        assert all(_alive(w) for w in workers)
        parent.kill()
        parent.wait()
        assert _wait_for(lambda: not any(_alive(w) for w in workers), 15), "spawned workers outlived their parent"
    finally:
        parent.kill()
        _kill_tree([int(p.read_text()) for p in tmp_path.glob("w?") if p.read_text()])


def test_kill9_of_run_py_takes_the_trainer_and_a_second_launch_is_refused(tiny_glue, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = [sys.executable, str(REPO / "run.py"), "--task", "RTE", "--quant-mode", "none", "--arch", "tiny",
            "--data-dir", str(tiny_glue), "--output-dir", str(tmp_path), "--cpu", "--max-update", "100000",
            "--", "--num-workers", "0", "--no-save"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    trainer = None
    try:
        trainer = _wait_for(lambda: next(iter(_children(first.pid)), None), 60)
        assert trainer is not None, "run.py started no trainer"
        logs = lambda: list(tmp_path.glob("none/RTE-tiny/*/*.log"))  # noqa: E731
        assert _wait_for(lambda: any("num_updates" in p.read_text() or "| epoch 001" in p.read_text()
                                     for p in logs()), 120), "the trainer never started training"
        # the same command again, on the same run folder: refused in one line naming the holder
        second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1, second.stderr[-2000:]
        assert err[0].startswith("error: run folder ") and f"is in use by another trainer (PID {first.pid} " in err[0]
        # kill -9 of run.py alone (not its process group): the trainer must follow
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert _wait_for(lambda: not _alive(trainer), 15), "fairseq-train outlived run.py (orphan still training)"
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if trainer:
            _kill_tree([trainer])
