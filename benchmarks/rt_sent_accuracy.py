"""Accuracy on the embedded task: FP vs I-BERT W8A8 / W7A8 vs TernaryBERT W2A8 vs integer-only ternary on RT-SENT.

Runs the demo pipeline (``ibert_plugin.demo``; finished stages and scores are reused) without the engine stage. Each
model's checkpoint is chosen on dev (fairseq's ``checkpoint_best.pt``) and scored on the 1,000 labelled held-out test
sentences; each quantized model's test gap to FP comes with a paired bootstrap 95% interval over those sentences
(:func:`ibert_plugin.stats.paired_bootstrap`, 10,000 resamples, seed 0), and is called noise when the interval
contains 0. Targets: W8A8 within 0.5 points of FP, W2A8 TernaryBERT within 1.0 point, integer-only ternary within 1.5.
Extra demo flags pass through, e.g. ``--ternary-methods twn,lat`` or ``--quick`` (a smoke run: ``"smoke": true``)::

    python benchmarks/rt_sent_accuracy.py [--quick]

Prints the demo's table, then ONE JSON object as the last line.
"""
import json
import sys
import tempfile
from pathlib import Path

from harness import emit
from ibert_plugin import demo

TARGETS = {"w8": 0.5, "tern_twn": 1.0, "tern_lat": 1.0, "int_tern": 1.5}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        try:
            rc = demo.main([*argv, "--skip-engine", "--json", str(out)])
        except demo.DemoError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        table = json.loads(out.read_text())
    rows = []
    for r in table["rows"]:
        row = {"model": r["key"], "precision": r["precision"], "updates": r["updates"], "dev_acc": r["dev_acc"],
               "test_acc": round(r["test_acc"], 2), "test_sentences": r["test_sentences"],
               "size_mb": round(r["size_mb"], 2)}
        gap = r.get("gap")
        if gap is not None:
            row.update(gap_vs_fp=round(gap["gap"], 2), gap_ci95=[round(gap["low"], 2), round(gap["high"], 2)],
                       gap_is_noise=not gap["significant"])
            if r["key"] in TARGETS:
                row["target_gap"] = -TARGETS[r["key"]]
                row["meets_target"] = gap["gap"] >= -TARGETS[r["key"]]
        rows.append(row)
    emit({"benchmark": "rt_sent_accuracy", "smoke": table["smoke"], "split": "test (checkpoint chosen on dev)",
          "bootstrap": {"resamples": 10000, "seed": 0, "level": 0.95}, "rows": rows})
    return rc


if __name__ == "__main__":
    sys.exit(main())
