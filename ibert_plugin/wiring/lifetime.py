"""Training processes that never outlive their launcher, and run folders one trainer at a time (fairseq-free).

* :func:`child_preexec`: the ``preexec_fn`` with which ``run.py`` and the SQuAD recipe start ``fairseq-train``: the
  child asks the kernel for ``SIGKILL`` when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``, kept across
  ``exec``), so ``kill -9`` of the launcher takes the trainer with it instead of leaving an orphan that keeps
  writing checkpoints.
* :func:`die_with_parent_from_env`: fairseq's own workers (``torch.multiprocessing.spawn`` for multi-GPU training,
  which re-imports the plugin through ``--user-dir``) do the same towards their parent, when the launcher set
  :data:`LIFETIME_ENV`; called by :func:`ibert_plugin.wiring.register`. ``PR_SET_PDEATHSIG`` is cleared by ``fork``,
  so every generation sets it itself: launcher -> fairseq-train -> spawned ranks.
* :class:`RunLock`: an exclusive ``fcntl.flock`` on ``<folder>/.run.lock`` held while a trainer uses the folder
  (the lock's file descriptor is also handed to the trainer, so the lock lasts as long as either lives). A second
  launch on the same folder fails with one line naming the PID that holds it. The kernel drops the lock when its
  holders die, ``kill -9`` included: no stale lock files to clean up.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import signal
from pathlib import Path
from typing import Callable, Optional

__all__ = ["LIFETIME_ENV", "LOCK_NAME", "RunLock", "RunLockedError", "child_preexec", "die_with_parent_from_env",
           "set_parent_death_signal"]

#: Set (to "1") in the environment of training children; processes spawned by them die with their parent too.
LIFETIME_ENV = "IBERT_DIE_WITH_PARENT"
#: Lock file inside a run's checkpoint folder.
LOCK_NAME = ".run.lock"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits; False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux / no prctl
        return False


def child_preexec(parent_pid: Optional[int] = None) -> Callable[[], None]:
    """``preexec_fn`` for a training child of ``parent_pid`` (default: this process): dies with it (also when the
    parent died between ``fork`` and the ``prctl``)."""
    parent = os.getpid() if parent_pid is None else parent_pid

    def preexec() -> None:
        set_parent_death_signal()
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def die_with_parent_from_env() -> None:
    """In a ``multiprocessing`` child (fairseq's spawned ranks) of a training process started with
    :data:`LIFETIME_ENV`: die with the parent. Other processes are left alone (the direct child of the launcher
    already has it from :func:`child_preexec`)."""
    if not os.environ.get(LIFETIME_ENV):
        return
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return
    set_parent_death_signal()
    if os.getppid() != parent.pid:  # the parent died before the prctl
        os._exit(1)


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """Exclusive lock on a run folder for a trainer's lifetime (``with RunLock(folder) as lock: ...``).

    Args:
        folder: the checkpoint / save folder (created if missing).

    Attributes:
        fd: the lock file's descriptor while held: pass it to the trainer (``Popen(pass_fds=[lock.fd])``) so the
            lock lasts as long as the trainer even if the launcher is gone.
    """

    def __init__(self, folder: os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLockedError` naming the holder's PID (never waits)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunLockedError(f"run folder {self.folder} is in use by another trainer (PID {holder} holds "
                                 f"{self.path.name}): wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a launch that just opened it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
