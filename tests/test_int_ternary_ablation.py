"""benchmarks/int_ternary_ablation.py refuses bad input with one error line before any training."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole pipelines / subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "int_ternary_ablation.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO)


def test_unknown_variant_is_one_error_line(tmp_path):
    r = _run("--demo-dir", str(tmp_path), "--variants", "baseline,nope")
    assert r.returncode == 2 and r.stderr.strip() == \
        "error: unknown variant 'nope' (choose baseline, fd_gelu, fd_nonlinear, distill)"


def test_missing_checkpoints_name_the_flag(tmp_path):
    r = _run("--demo-dir", str(tmp_path / "no_demo"), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: no FP checkpoint (run the demo first, or pass --fp-checkpoint)"]
    fp = tmp_path / "fp.pt"
    fp.write_bytes(b"x")
    r = _run("--demo-dir", str(tmp_path / "no_demo"), "--fp-checkpoint", str(fp), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 2 and "--ternary-checkpoint" in r.stderr and "Traceback" not in r.stderr
