"""run.py error paths: one ``error: ...`` line on stderr, non-zero exit, no traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_py(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def assert_one_error_line(p, code, *needles):
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("case", [
    (["--task", "rte"], ["unknown task 'rte'", "RTE, SST-2, MNLI, QNLI, CoLA, QQP, MRPC, STS-B, RT-SENT, BOOLQ"]),
    (["--task", "SST"], ["unknown task 'SST'"]),
    (["--task", "RTE", "--arch", "bert"], ["unknown arch 'bert'"]),
    (["--task", "RTE", "--bs", "16.0"], ["--bs"]),
    (["--task", "RTE", "--quant-mode", "asymmetric"], ["--quant-mode"]),
    (["--task", "RTE", "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_usage_errors(case, tmp_path):
    args, needles = case
    assert_one_error_line(run_py(*args, "--dry-run", cwd=tmp_path), 2, *needles)


def test_missing_data_and_restore(tiny_glue, tmp_path):
    base = ["--arch", "tiny", "--output-dir", str(tmp_path), "--dry-run"]
    p = run_py("--task", "RTE", "--data-dir", str(tmp_path / "nowhere"), "--quant-mode", "none", *base)
    assert_one_error_line(p, 2, "data folder not found", "RTE-bin")
    p = run_py("--task", "RTE", "--data-dir", str(tiny_glue), "--restore-file", str(tmp_path / "x.pt"), *base)
    assert_one_error_line(p, 2, "restore file not found")
    p = run_py("--task", "RTE", "--data-dir", str(tiny_glue), *base)  # QAT (default mode) without a restore file
    assert_one_error_line(p, 2, "--restore-file")
    p = run_py("--task", "RTE", "--data-dir", str(tiny_glue), "--arch", "roberta_base", "--quant-mode", "none",
               "--model-dir", str(tmp_path), "--output-dir", str(tmp_path), "--dry-run")
    assert_one_error_line(p, 2, "pretrained model not found")


def test_bits_and_stage_flags(tiny_glue, tmp_path):
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"x")
    base = ["--task", "RTE", "--arch", "tiny", "--data-dir", str(tiny_glue), "--restore-file", str(ck),
            "--output-dir", str(tmp_path), "--dry-run"]
    assert_one_error_line(run_py(*base, "--weight-bits", "9"), 2, "--weight-bits 9 out of range")
    assert_one_error_line(run_py(*base, "--weight-bits", "1"), 2, "out of range")
    assert_one_error_line(run_py(*base, "--quant-mode", "ternarybert", "--weight-bits", "4"), 2, "2 or 8")
    assert_one_error_line(run_py(*base, "--quant-mode", "ternarybert", "--input-bits", "16"), 2, "--input-bits")
    assert_one_error_line(run_py(*base, "--pred-distill"), 2, "needs --quant-mode ternarybert")


def test_fairseq_failure_points_at_log(tiny_glue, tmp_path, run_env):
    p = run_py("--task", "RTE", "--arch", "tiny", "--quant-mode", "none", "--data-dir", str(tiny_glue),
               "--output-dir", str(tmp_path), "--cpu", "--", "--no-such-fairseq-flag", env=run_env)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: fairseq-train failed with exit code 2; see ") and last.endswith(".log")
    log = Path(last.rsplit("see ", 1)[1])
    assert "unrecognized arguments: --no-such-fairseq-flag" in log.read_text()
