"""What the benchmark scripts share: the repository on ``sys.path``, timing, the summary, the final JSON line.

Importing this module (``import harness`` from a script in ``benchmarks/``) puts the repository root first on
``sys.path``, so the checkout's ``ibert_plugin`` is the one measured. Conventions (``docs/benchmarks.md``):

* a figure is the **median with [min, max]** over repetitions (:func:`summarize`), never a single timing when
  repetitions were made; contenders are interleaved in one run;
* a script prints its human table first and, as its **last line, one JSON object** (:func:`emit`).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Summary:
    """Median, minimum and maximum of a set of repetitions.

    Attributes:
        median: the median (mean of the two middle values for an even count).
        min: the smallest value.
        max: the largest value.
        n: how many values.
    """

    median: float
    min: float
    max: float
    n: int

    def format(self, fmt: str = ".2f", unit: str = "") -> str:
        """``"1.36x [1.30, 1.66]"`` for ``fmt=".2f", unit="x"``."""
        return f"{self.median:{fmt}}{unit} [{self.min:{fmt}}, {self.max:{fmt}}]"

    def to_dict(self, prefix: str = "") -> Dict[str, float]:
        """``{prefix: median, prefix_min: min, prefix_max: max}`` (``median`` / ``min`` / ``max`` without prefix)."""
        if not prefix:
            return {"median": self.median, "min": self.min, "max": self.max}
        return {prefix: self.median, f"{prefix}_min": self.min, f"{prefix}_max": self.max}


def summarize(values: Sequence[float]) -> Summary:
    """:class:`Summary` of ``values`` (at least one)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize: no values")
    return Summary(statistics.median(vals), min(vals), max(vals), len(vals))


def timed(fn: Callable[[], Any]) -> Tuple[float, float, Any]:
    """Run ``fn()`` once: ``(wall seconds, process CPU seconds of all threads, its result)``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def emit(record: Dict[str, Any], **dumps_kwargs: Any) -> None:
    """Print ``record`` as the script's last line: one JSON object (flushed, so a caller can read it at once)."""
    print(json.dumps(record, **dumps_kwargs), flush=True)
