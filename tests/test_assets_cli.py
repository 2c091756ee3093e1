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


def _readonly(monkeypatch, data):
    """Simulate a read-only data folder (tests run as root, where chmod does not stop writes): creating any file in
    it fails with EROFS, as on a read-only mount."""
    import errno
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and Path(dir).resolve().is_relative_to(data):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_build_on_read_only_data_folder(monkeypatch, tmp_path, capsys):
    """Everything built: the build succeeds without rewriting assets.json; something to write: one error line."""
    from ibert_plugin.assets import gpt2_bpe, packages

    data = (tmp_path / "data").resolve()
    monkeypatch.setattr(packages, "ensure_installed", lambda pkg: tmp_path)
    monkeypatch.setattr(gpt2_bpe, "build_gpt2_bpe", lambda src, out: out)  # its stamp says: up to date
    assert main(["build", "--data-dir", str(data), "--only", "bpe"]) == 0
    summary = data / "assets.json"
    before = (summary.stat().st_ino, summary.read_bytes())
    _readonly(monkeypatch, data)
    capsys.readouterr()
    assert main(["build", "--data-dir", str(data), "--only", "bpe"]) == 0
    assert (summary.stat().st_ino, summary.read_bytes()) == before  # not rewritten
    summary.write_text("{}")  # now the summary must change: the read-only folder is one error line
    assert main(["build", "--data-dir", str(data), "--only", "bpe"]) == 2
    lines, err = _errors(capsys)
    assert lines == [f"error: {data}: Read-only file system"] and "Traceback" not in err


def test_import_hf_malformed_config_or_weights(capsys, tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    cases = [("config.json", b"{\"model_type\": \"bert\", ", "config.json: not a JSON config ("),
             ("config.json", b"[1, 2]", "config.json: not a JSON object"),
             ("config.json", b"{\"model_type\": \"bert\", \"hidden_size\": \"big\"}",
              "config.json: missing or non-integer num_hidden_layers, hidden_size"),
             ("model.safetensors", os.urandom(4096), "model.safetensors: not a readable safetensors file (")]
    good = {"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 8, "intermediate_size": 16,
            "num_attention_heads": 2, "max_position_embeddings": 16, "vocab_size": 10}
    import json

    for name, content, want in cases:
        (src / "config.json").write_text(json.dumps(good))
        (src / name).write_bytes(content)
        assert main(["import-hf", "--model-dir", str(src), "--output", str(tmp_path / "o")]) == 2, name
        lines, err = _errors(capsys)
        assert len(lines) == 1 and want in lines[0] and "Traceback" not in err, (want, err[-2000:])
