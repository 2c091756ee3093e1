"""SQuAD post-training ablation: one FP checkpoint, each quantization component switched on alone, no training.

Where does a quantized span model lose F1 before QAT or distillation has had a chance to recover it? Each variant
rebuilds the FP checkpoint's model in a quantized mode, calibrates what needs calibrating (I-BERT's activation
ranges and LayerNorm shifts: forwards in training mode, dropout off, no weight update, on ``--calib-windows``
training windows) and scores a SQuAD file with the official EM/F1. Variants (``--variants``, comma-separated):

* ``fp``: the checkpoint as it is;
* ``T<bits>:<clip>``: TernaryBERT fake quantization, weights at ``bits`` (2 = TWN ternary, 8 = symmetric 8-bit, to
  isolate the activations), 8-bit dynamic activations clipped to ``clip`` (``T8:2.5``, ``T8:10``, ``T2:10``);
  ``T2r:<clip>`` is TWN with one ``alpha`` per output row of every Linear (``--ternary-linear row``);
* ``<bits>[:<force_dequant>][@<ln_var_bits>]``: I-BERT integer-only at ``bits`` weight bits, optionally with one
  nonlinear op in float (``8:gelu``, ``8:softmax``, ``8:layernorm``, ``8:nonlinear``) and a LayerNorm variance bound
  (``8@32`` = upstream's 2^32).

Example (the table of ``docs/squad.md``; the benchmark's FP checkpoint, official dev articles 4 and 7)::

    python benchmarks/squad_ptq_ablation.py --checkpoint outputs/bench_squad_cpu/runs/fp/checkpoint_best.pt \\
        --train-file outputs/bench_squad_cpu/data/train.json --dev-articles 4,7 \\
        --variants fp,T8:2.5,T8:10,T2:10,8@32,8:gelu@32,8:layernorm@32,8

Prints one line per variant, then ONE JSON object as the last line. Bad input: one ``error:`` line, exit 2.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _article_indices(spec: str, n: int):
    """``all``, or comma-separated indices and inclusive ranges (``1,2``, ``0-59``) of the dev file's articles."""
    if spec == "all":
        return list(range(n))
    idx = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            idx += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise SystemExit(f"error: --dev-articles {spec!r}: expected 'all' or indices like 1,2 or 0-59") from None
    if not idx or any(not 0 <= i < n for i in idx):
        raise SystemExit(f"error: --dev-articles: indices must be in 0..{n - 1}")
    return idx


def parse_variant(spec: str) -> dict:
    """``fp`` / ``T<bits>[r]:<clip>`` / ``<bits>[:<force_dequant>][@<ln_var_bits>]`` -> model-config overrides."""
    from ibert_plugin.quant.config import FORCE_DEQUANT

    try:
        if spec == "fp":
            return {}
        if spec.startswith("T"):
            bits, _, clip = spec[1:].partition(":")
            row = bits.endswith("r")
            b = int(bits[:-1] if row else bits)
            if b not in (2, 8) or (row and b != 2):
                raise ValueError
            out = {"quant_mode": "ternarybert", "weight_bits": b, "weight_quant_method": "twn" if b == 2 else "sym",
                   "input_bits": 8, "clip_val": float(clip or 2.5)}
            if row:
                out["ternary_linear"] = "row"
            return out
        body, _, var_bits = spec.partition("@")
        bits, _, fd = body.partition(":")
        if fd and fd not in FORCE_DEQUANT:
            raise ValueError
        out = {"quant_mode": "symmetric", "weight_bits": int(bits), "force_dequant": fd or "none"}
        if var_bits:
            out["ln_var_bits"] = int(var_bits)
        return out
    except ValueError:
        raise SystemExit(f"error: variant {spec!r}: expected fp, T<2|2r|8>:<clip> or <bits>[:<force_dequant>]"
                         "[@<ln_var_bits>]") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="FP SQuAD checkpoint (the recipe's fp/checkpoint_best.pt)")
    ap.add_argument("--train-file", required=True, help="SQuAD JSON the calibration windows are drawn from")
    ap.add_argument("--eval-file", default=None,
                    help="SQuAD JSON to score (default: --dev-articles of SQUAD1/test.json, the official v1.1 dev)")
    ap.add_argument("--dev-articles", default="4,7", help="articles of the official v1.1 dev set (default 4,7)")
    ap.add_argument("--data-dir", default=str(REPO / "data" / "squad"))
    ap.add_argument("--tokenizer-dir", default=str(REPO / "data" / "minilm"))
    ap.add_argument("--variants", default="fp,T8:2.5,T8:10,T2:10,8@32,8:gelu@32,8:layernorm@32,8")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    overrides = {v: parse_variant(v) for v in variants}
    if args.calib_windows < 1:
        print("error: --calib-windows must be >= 1", file=sys.stderr)
        return 2
    for p in (args.checkpoint, args.train_file):
        if not Path(p).is_file():
            print(f"error: {p} not found", file=sys.stderr)
            return 2

    import numpy as np
    import torch

    import ibert_plugin  # noqa: F401  (registers the architectures)
    from ibert_plugin.squad.data import SquadError, read_squad
    from ibert_plugin.squad.evaluate import evaluate_file, model_logits
    from ibert_plugin.squad.features import OffsetTokenizer, build_features
    from ibert_plugin.tasks.squad import load_dictionary
    from ibert_plugin.wiring.checkpoint_file import CheckpointError, check_fairseq_checkpoint
    from squad_accuracy import calibrated_model

    tmp = tempfile.TemporaryDirectory()
    eval_file = args.eval_file
    source = eval_file
    if eval_file is None:
        dev_path = Path(args.data_dir) / "SQUAD1" / "test.json"  # the whole official v1.1 dev set
        if not dev_path.is_file():
            print(f"error: {dev_path} not found; build it with: python -m ibert_plugin.assets build --only squad",
                  file=sys.stderr)
            return 2
        dev = json.loads(dev_path.read_text())
        idx = _article_indices(args.dev_articles, len(dev["data"]))
        eval_file = str(Path(tmp.name) / "eval.json")
        Path(eval_file).write_text(json.dumps(dict(dev, data=[dev["data"][i] for i in idx]), ensure_ascii=False))
        source = "official SQuAD v1.1 dev, articles " + ", ".join(f"{i} ({dev['data'][i]['title']})" for i in idx)
    d = load_dictionary(argparse.Namespace(dict_path="", tokenizer_dir=args.tokenizer_dir))
    tok = OffsetTokenizer(Path(args.tokenizer_dir), d)
    try:
        examples = read_squad(args.train_file)
    except SquadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        state = check_fairseq_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = np.random.RandomState(args.seed)
    pool = [examples[i] for i in rng.permutation(len(examples))[:4 * args.calib_windows]]
    feats = build_features(pool, tok)[:args.calib_windows]  # the recipe's windows: 384 / stride 128 / query 64
    calib = [torch.from_numpy(f.tokens).long() for f in feats]
    results = {}
    for spec in variants:
        t0 = time.time()
        model = calibrated_model(state, overrides[spec], calib, tok.pad)
        s = evaluate_file(eval_file, tok, model_logits(model, d.pad()), batch_size=32)
        results[spec] = {"exact": round(s["exact"], 2), "f1": round(s["f1"], 2)}
        print(f"{spec:>16}: EM {s['exact']:6.2f} F1 {s['f1']:6.2f}  ({s['total']} q, {time.time() - t0:.0f} s)",
              flush=True)
    print(json.dumps({"benchmark": "squad_ptq_ablation", "checkpoint": str(args.checkpoint), "eval": source,
                      "calib_windows": len(feats), "variants": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
