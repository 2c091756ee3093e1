"""GLUE preprocessing (scripts/preprocess_GLUE_tasks.sh -> ibert_plugin.assets.glue) on tiny fixtures.

Self-contained: uses tests/fixtures/glue_tiny (SST-2 = single sentence, RTE = pair) and the tiny WordPiece
vocabulary in tests/fixtures/wordpiece_tiny, so no asset package is needed. The success path runs the real
bash script once (ALL -> both tasks); error cases are checked in-process (fast) plus once through the script.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures"
SCRIPT = REPO / "scripts" / "preprocess_GLUE_tasks.sh"
WP = FIX / "wordpiece_tiny"


def _env(tmp_path):
    env = dict(os.environ, IBERT_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    return env


def test_script_is_lf_and_strict():
    text = SCRIPT.read_bytes()
    assert b"\r" not in text
    assert b"set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    wrapper = REPO / "examples" / "roberta" / "preprocess_GLUE_tasks.sh"
    assert wrapper.resolve() == SCRIPT.resolve() or "preprocess_GLUE_tasks.sh" in wrapper.read_text()


@pytest.mark.slow
def test_script_all_tasks_wordpiece(tmp_path):
    from fairseq.data import Dictionary, data_utils

    out = tmp_path / "bin"
    r = subprocess.run(["bash", str(SCRIPT), str(FIX / "glue_tiny"), "ALL", "--bpe", "wordpiece",
                        "--bpe-dir", str(WP), "--out", str(out)], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    d = Dictionary.load(str(WP / "dict.txt"))
    # Single-sentence task: input0 + label, no input1.
    sst = out / "SST-2-bin"
    assert sorted(p.name for p in sst.iterdir()) == ["input0", "label"]
    ds = data_utils.load_indexed_dataset(str(sst / "input0" / "train"), d)
    assert len(ds) == 6
    toks = [d[i] for i in ds[3]]  # "a boring mess of a movie ." -> WordPiece split of "mess", then </s>
    assert toks == ["a", "boring", "me", "##ss", "of", "a", "movie", ".", "</s>"]
    assert len(data_utils.load_indexed_dataset(str(sst / "input0" / "valid"), d)) == 2
    assert len(data_utils.load_indexed_dataset(str(sst / "input0" / "test"), d)) == 2
    ld = Dictionary.load(str(sst / "label" / "dict.txt"))
    labels = data_utils.load_indexed_dataset(str(sst / "label" / "train"), ld)
    assert [ld[t[0]] for t in labels] == ["1", "0", "1", "0", "1", "0"]
    # Pair task: input0, input1, label; RTE labels.
    rte = out / "RTE-bin"
    assert sorted(p.name for p in rte.iterdir()) == ["input0", "input1", "label"]
    in1 = data_utils.load_indexed_dataset(str(rte / "input1" / "train"), d)
    assert [d[i] for i in in1[0]] == ["a", "cat", "is", "on", "the", "mat", ".", "</s>"]
    ld = Dictionary.load(str(rte / "label" / "dict.txt"))
    assert {ld[i] for i in range(ld.nspecial, len(ld))} >= {"entailment", "not_entailment"}
    assert (out / "RTE-processed" / "dev.input0").read_text().splitlines()[0] == "the movie was funny ."


def test_script_error_exit(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(FIX / "glue_tiny"), "NOPE", "--bpe-dir", str(WP)],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "unknown task 'NOPE'" in err[0]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_script_binary_tsv_is_one_error_line(tmp_path):
    g = _copy(tmp_path)
    (g / "RTE" / "dev.tsv").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(128, 256)) * 4)  # a gzip, say
    out = tmp_path / "o"
    r = subprocess.run(["bash", str(SCRIPT), str(g), "RTE", "--bpe", "wordpiece", "--bpe-dir", str(WP), "--out",
                        str(out)], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{g / 'RTE' / 'dev.tsv'}:1: not UTF-8 text (byte 0x8b at offset 1)" in err[0]
    assert not out.exists()


# ------------------------------------------------------------------ in-process error cases
def _run(argv, capsys):
    from ibert_plugin.assets import glue

    rc = glue.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return rc, lines, err


def _copy(tmp_path):
    g = tmp_path / "glue"
    shutil.copytree(FIX / "glue_tiny", g)
    return g


@pytest.mark.parametrize("case", ["unknown_task", "missing_folder", "missing_file", "bad_columns", "bad_label",
                                  "latin1", "binary"])
def test_bad_inputs(tmp_path, capsys, case):
    g = _copy(tmp_path)
    task, want = "SST-2", None
    if case == "unknown_task":
        task, want = "FOO", "unknown task 'FOO'"
    elif case == "missing_folder":
        shutil.rmtree(g / "SST-2")
        want = "SST-2: task folder not found"
    elif case == "missing_file":
        (g / "SST-2" / "dev.tsv").unlink()
        want = "dev.tsv: file not found"
    elif case == "bad_columns":
        with open(g / "RTE" / "train.tsv", "a") as f:
            f.write("9\tonly two fields\n")
        task, want = "RTE", "train.tsv:6: expected 4 tab-separated fields, got 2"
    elif case == "bad_label":
        with open(g / "SST-2" / "dev.tsv", "a") as f:
            f.write("a sentence\tpositive\n")
        want = "dev.tsv:4: bad label 'positive'"
    elif case == "latin1":
        with open(g / "SST-2" / "dev.tsv", "ab") as f:
            f.write(b"un caf\xe9 fade\t0\n")
        want = "dev.tsv:4: not UTF-8 text (byte 0xe9 at offset"
    elif case == "binary":
        (g / "SST-2" / "train.tsv").write_bytes(b"\x00\x01\x02\x03\tpacked\n")
        want = "train.tsv:1: binary data (a NUL byte), not a TSV text file"
    out = tmp_path / "bin"
    rc, lines, err = _run([str(g), task, "--bpe", "wordpiece", "--bpe-dir", str(WP), "--out", str(out)], capsys)
    assert rc == 2
    assert len(lines) == 1, err
    assert want in lines[0], lines[0]
    # Never a partial dataset, nor an empty output folder.
    assert not (out / f"{task}-bin").exists()
    assert not out.exists()
