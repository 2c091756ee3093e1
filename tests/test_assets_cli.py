"""CLI error handling of ``python -m ibert_plugin.assets``: one ``error:`` line, exit status 2, no traceback."""
import os
import subprocess
import sys
from pathlib import Path

from ibert_plugin.assets.__main__ import main
from ibert_plugin.assets.common import AssetError, atomic_path, data_dir

REPO = Path(__file__).resolve().parents[1]


def _errors(capsys):
    err = capsys.readouterr().err
    return [ln for ln in err.splitlines() if ln.startswith("error:")], err


def test_unknown_step(capsys, tmp_path):
    assert main(["build", "--data-dir", str(tmp_path), "--only", "bpe,nope"]) == 2
    lines, err = _errors(capsys)
    assert len(lines) == 1 and "nope" in lines[0] and "Traceback" not in err


def test_import_hf_missing_dir(capsys, tmp_path):
    assert main(["import-hf", "--model-dir", str(tmp_path / "absent"), "--output", str(tmp_path / "o")]) == 2
    lines, _ = _errors(capsys)
    assert len(lines) == 1 and "absent" in lines[0]


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("IBERT_DATA_DIR", raising=False)
    assert data_dir() == (REPO / "data").resolve()
    monkeypatch.setenv("IBERT_DATA_DIR", str(tmp_path / "env"))
    assert data_dir() == (tmp_path / "env").resolve()
    assert data_dir(str(tmp_path / "flag")) == (tmp_path / "flag").resolve()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "f.txt"
    try:
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise AssetError("boom")
    except AssetError:
        pass
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_module_entry_point_exit_code(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "ibert_plugin.assets", "build", "--data-dir", str(tmp_path),
                        "--only", "bogus"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] and "Traceback" not in r.stderr
