"""Accuracy on the embedded task: FP vs I-BERT W8A8 / W7A8 vs TernaryBERT W2A8 vs integer-only ternary on RT-SENT.

Runs the demo pipeline (``ibert_plugin.demo``; finished stages and scores are reused) without the engine stage. Each
model's checkpoint is chosen on dev (fairseq's ``checkpoint_best.pt``) and scored on the 1,000 labelled held-out test
sentences; each quantized model's test gap to FP comes with a paired bootstrap 95% interval over those sentences
(:func:`ibert_plugin.stats.paired_bootstrap`, 10,000 resamples, seed 0), and is called noise when the interval
contains 0. Targets: W8A8 within 0.5 points of FP, W2A8 TernaryBERT within 1.0 point, integer-only ternary within 1.5.
Extra demo flags pass through, e.g. ``--ternary-methods twn,lat`` or ``--quick`` (a smoke run: ``"smoke": true``)::

    python benchmarks/rt_sent_accuracy.py [--quick] [--peers torch_int8,ort_int8_dynamic,ort_int8_static,ov_int8]

``--peers`` adds the post-training int8 quantizers a deployment engineer would try instead (``benchmarks/peers.py``,
no training): each is built from the demo's FP checkpoint (the plain FP32 encoder of ``integer_engine.FloatEncoder``,
exported to ONNX where the peer needs it; static quantizers calibrated on the first ``--calib-sentences`` training
sentences), its encoder output goes through the FP checkpoint's own float classification head, and it is scored on
the same test sentences with the same paired bootstrap against FP. A peer whose library is missing is reported as
unavailable (``requirements-bench.txt`` installs ONNX Runtime's quantizer, OpenVINO and NNCF).

Prints the demo's table, then ONE JSON object as the last line.
"""
import json
import sys
import tempfile
from pathlib import Path

from harness import emit
from ibert_plugin import demo

TARGETS = {"w8": 0.5, "tern_twn": 1.0, "tern_lat": 1.0, "int_tern": 1.5}


#: The post-training int8 peers scored by default with ``--peers`` (``peers.INT8_PEERS``).
DEFAULT_PEERS = "torch_int8,ort_int8_dynamic,ort_int8_static,ov_int8"


def _split_argv(argv):
    """(this script's --peers / --calib-sentences, the rest for the demo)."""
    import argparse

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--peers", default=None, help=f"comma-separated post-training peers (e.g. {DEFAULT_PEERS}), or "
                                                 "'default'")
    p.add_argument("--calib-sentences", type=int, default=48)
    own, rest = p.parse_known_args(argv)
    if own.peers == "default":
        own.peers = DEFAULT_PEERS
    return own, rest


def peer_rows(table: dict, names, calib_sentences: int, threads: int, log=print) -> list:
    """Rows of the post-training peers ``names`` (of ``peers.PEERS``, checked by :func:`main`) of the FP checkpoint of
    the demo's ``table`` (its ``--json`` output), scored on the test split like the demo's rows."""
    import torch
    from fairseq import checkpoint_utils

    from ibert_plugin.demo import TASK
    from ibert_plugin.recipes.scoring import cached_scores, score_checkpoint
    from ibert_plugin.stats import paired_bootstrap
    from integer_engine import FloatEncoder
    from peers import build_peers, hidden_states

    fp_row = next(r for r in table["rows"] if r["key"] == "fp")
    data_bin, glue_dir = Path(table["data_bin"]), Path(table["glue_dir"])
    fp_scores = cached_scores(Path(fp_row["checkpoint"]), data_bin, glue_dir, TASK, Path(table["score_cache"]))["test"]
    models, _cfg, fs_task = checkpoint_utils.load_model_ensemble_and_task(
        [fp_row["checkpoint"]], arg_overrides={"data": str(data_bin)})
    enc = FloatEncoder(models[0].eval())
    fs_task.load_dataset("train")
    train = fs_task.dataset("train")
    calib = [train[i]["net_input.src_tokens"] for i in range(min(calib_sentences, len(train)))]
    pad = enc.padding_idx
    example = torch.full((4, max(len(r) for r in calib[:4])), pad, dtype=torch.long)
    for i, r in enumerate(calib[:4]):
        example[i, :len(r)] = r
    built = build_peers(enc, calib, example, threads, only=list(names), log=log)

    rows = []
    # the plain FP32 encoder through the same head: what every peer starts from (equal to FP up to float rounding)
    for name, run in [("fp32_plain_encoder", enc), *[(n, built[n].run) for n in names]]:
        peer = built.get(name)
        row = {"model": f"peer:{name}", "precision": "post-training, no training", "test_sentences": len(fp_scores)}
        if peer is not None:
            row.update(library=peer.library, version=peer.version, route=peer.route)
        if run is None:
            row.update(available=False, error=peer.error)
            rows.append(row)
            continue
        with torch.no_grad():
            sc = score_checkpoint(Path(fp_row["checkpoint"]), data_bin, glue_dir, TASK,
                                  encoder=lambda t, run=run: hidden_states(run(t)))["test"]
        gap = paired_bootstrap(fp_scores, sc)
        row.update(available=True, test_acc=round(100.0 * sum(sc) / len(sc), 2), gap_vs_fp=round(gap.gap, 2),
                   gap_ci95=[round(gap.low, 2), round(gap.high, 2)], gap_is_noise=not gap.significant,
                   calib_sentences=len(calib) if name in ("ort_int8_static", "ov_int8") else 0)
        log(f"  {name:20s} test {row['test_acc']:.2f}  gap to FP {gap.gap:+.2f} [{gap.low:+.2f}, {gap.high:+.2f}]"
            f"{' noise' if not gap.significant else ''}")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    own, argv = _split_argv(list(sys.argv[1:] if argv is None else argv))
    if own.peers is not None:  # checked before the demo's hour of training, not after
        from peers import PEERS

        bad = [n for n in own.peers.split(",") if n not in PEERS]
        if bad or own.calib_sentences < 1:
            print(f"error: unknown peer(s) {', '.join(bad)}; choose from {', '.join(PEERS)}" if bad else
                  "error: --calib-sentences must be >= 1", file=sys.stderr)
            return 2
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
    record = {"benchmark": "rt_sent_accuracy", "smoke": table["smoke"], "split": "test (checkpoint chosen on dev)",
              "bootstrap": {"resamples": 10000, "seed": 0, "level": 0.95}, "rows": rows}
    if own.peers:
        import torch

        print("post-training peers of the FP checkpoint (test split, gap to FP with its paired bootstrap 95% CI):")
        record["peers"] = peer_rows(table, [n for n in own.peers.split(",") if n], own.calib_sentences,
                                    torch.get_num_threads())
    emit(record)
    return rc


if __name__ == "__main__":
    sys.exit(main())
