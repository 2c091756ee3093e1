"""Shared helpers for the offline-asset tooling: data dir, errors, atomic writes, hashes, stamps.

Everything here is standard library only so that ``python -m ibert_plugin.assets`` stays cheap apart from the
plugin package import itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional

#: Repository root (``ibert_plugin/assets/common.py`` -> two levels up from the package).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Environment variable overriding the default data directory.
DATA_DIR_ENV = "IBERT_DATA_DIR"


class AssetError(RuntimeError):
    """A user-facing failure of the asset tooling; the CLIs print it as one ``error: ...`` line."""


def data_dir(explicit: Optional[str] = None) -> Path:
    """Resolve the data directory.

    Precedence: ``explicit`` (a ``--data-dir`` flag) > ``$IBERT_DATA_DIR`` > ``<repo>/data``.

    Args:
        explicit: Directory given on the command line, or None.

    Returns:
        The absolute data directory (not created).
    """
    d = explicit or os.environ.get(DATA_DIR_ENV) or str(REPO_ROOT / "data")
    return Path(d).expanduser().resolve()


def log(msg: str) -> None:
    """Progress message on stderr (stdout stays clean for machine-readable output)."""
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` decoded as UTF-8, or one AssetError ``<where>:<line>: not UTF-8 text (byte 0x.. at offset N)``
    (a binary file, or text in another encoding, is named instead of raising a UnicodeDecodeError traceback)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise AssetError(f"{where}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         f"convert it to UTF-8") from None


def sha256_file(path: os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(dest: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``dest``'s directory; rename it onto ``dest`` only on success.

    A crash or exception leaves ``dest`` untouched (old content or absent), never a half-written file that a
    later run could mistake for finished work. The temp file lives in the same directory so the final
    ``os.replace`` is atomic on POSIX.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=str(dest.parent))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the result the usual umask-derived mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(dest: os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` with LF newlines to ``dest`` atomically."""
    write_bytes_atomic(dest, text.encode("utf-8"))


def stamp_path(out_dir: Path, step: str) -> Path:
    """Location of the completion stamp of ``step`` inside ``out_dir``."""
    return out_dir / f".{step}.stamp.json"


def stamp_ok(out_dir: Path, step: str, key: Optional[Dict] = None) -> bool:
    """True iff ``step`` finished before with the same ``key`` and every recorded file still has its sha256.

    Args:
        out_dir: Directory the step writes into.
        step: Step name.
        key: Inputs that define the step (versions, source hashes); a change forces a rebuild.
    """
    sp = stamp_path(out_dir, step)
    if not sp.is_file():
        return False
    try:
        stamp = json.loads(sp.read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("key") != (key or {}):
        return False
    for rel, digest in stamp.get("files", {}).items():
        p = out_dir / rel
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True


def write_stamp(out_dir: Path, step: str, files: Iterable[str], key: Optional[Dict] = None,
                extra: Optional[Dict] = None) -> Dict[str, str]:
    """Record ``step`` as done: sha256 of each file (relative to ``out_dir``), written last and atomically.

    Returns:
        Mapping of relative path -> sha256.
    """
    hashes = {rel: sha256_file(out_dir / rel) for rel in sorted(files)}
    body = {"step": step, "key": key or {}, "files": hashes}
    if extra:
        body.update(extra)
    write_text_atomic(stamp_path(out_dir, step), json.dumps(body, indent=2, sort_keys=True) + "\n")
    return hashes
