"""Accuracy on the embedded task: FP vs I-BERT INT8 vs TernaryBERT W2A8 on RT-SENT (real MiniLM), one run.

Runs the demo pipeline (``ibert_plugin.demo``; finished stages are reused) and reports the dev accuracy of each
precision and its gap to the FP model it started from. Targets: INT8 within 0.3 points (I-BERT reports +0.3 on
average), W2A8 within 1.0 point (TernaryBERT). Extra demo flags pass through, e.g.::

    python benchmarks/rt_sent_accuracy.py --ternary-updates 800 --ternary-methods twn,lat --integer-ternary

Prints the demo's table, then ONE JSON object as the last line.
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibert_plugin import demo  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        rc = demo.main([*argv, "--skip-engine", "--json", str(out)])
        rows = json.loads(out.read_text())
    fp = next(r["dev_acc"] for r in rows if r["precision"] == "FP32")
    result = {
        "benchmark": "rt_sent_accuracy",
        "fp32_dev_acc": fp,
        "rows": [
            {"precision": r["precision"], "dev_acc": r["dev_acc"], "delta_vs_fp": round(r["dev_acc"] - fp, 2),
             "size_mb": r["size_mb"]}
            for r in rows
        ],
    }
    print(json.dumps(result))
    return rc


if __name__ == "__main__":
    sys.exit(main())
