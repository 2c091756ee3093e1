"""benchmarks/harness.py: the median [min, max] summary, timing and the final JSON line the benchmarks share."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("harness", REPO / "benchmarks" / "harness.py")
harness = sys.modules["harness"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(harness)


def test_summary_is_median_min_max():
    s = harness.summarize([1.66, 1.30, 1.36, 1.41, 1.32])
    assert (s.median, s.min, s.max, s.n) == (1.36, 1.30, 1.66, 5)
    assert s.format(".2f", "x") == "1.36x [1.30, 1.66]"
    assert s.to_dict("ratio") == {"ratio": 1.36, "ratio_min": 1.30, "ratio_max": 1.66}
    assert harness.summarize([1, 2, 3, 4]).median == 2.5  # even count: mean of the middle two
    with pytest.raises(ValueError, match="no values"):
        harness.summarize([])


def test_timed_measures_wall_and_cpu():
    wall, cpu, out = harness.timed(lambda: (time.sleep(0.05), 7)[1])
    assert out == 7 and wall >= 0.05 and cpu < wall  # sleeping costs wall time, almost no CPU


def test_a_benchmark_prints_its_json_last():
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "nonlinear_error.py")], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", IBERT_QAT_KERNELS="0"))
    assert p.returncode == 0, p.stderr[-2000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["benchmark"] == "nonlinear_error" and last["within_bounds"] is True
