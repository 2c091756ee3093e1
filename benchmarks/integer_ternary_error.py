"""Hidden-state error of the integer-only ternary MiniLM next to fake-quant ternary, both against the FP model.

Weights: the imported MiniLM (``data/minilm/model.pt``, all-MiniLM-L6-v2 shape, 6 x 384) loaded strictly into
``ibert_roberta_minilm`` three times: FP (``--quant-mode none``), integer-only ternary (``--quant-mode symmetric
--weight-bits 2``: TWN weights with I-BERT's integer activations, i-GELU, i-softmax, i-LayerNorm) and TernaryBERT
fake-quant ternary (``--quant-mode ternarybert --weight-bits 2``: ternary weights, 8-bit activations, float
nonlinearities). The integer model's activation ranges are calibrated in train mode (no gradient, dropout 0) on real
RT-SENT training sentences; nothing is trained. Error per hidden state (0 = embedding LayerNorm output, ``i`` = layer
``i`` output) on held-out RT-SENT dev sentences, non-padding tokens only: relative Frobenius error
``||h - h_fp|| / ||h_fp||``.

Runs on any checkout of the plugin (only fairseq's model registry and ``return_all_hiddens`` are used), so the same
script measures the code before and after a numerics change, e.g. ``git worktree add /tmp/old <commit>`` and
``PYTHONPATH=/tmp/old python benchmarks/integer_ternary_error.py``. ``--nonlinear-constants`` is passed to the model
(a checkout without the option stops with argparse's ``error:`` line).

Usage: ``OMP_NUM_THREADS=2 python benchmarks/integer_ternary_error.py [--calib 128] [--eval 64]``; the last line
is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path and "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(REPO))


class _Task:
    def __init__(self, dictionary):
        self.source_dictionary = dictionary

    def max_positions(self):
        return 512


def _build(dictionary, state, extra):
    from fairseq import options
    from fairseq.models import ARCH_MODEL_REGISTRY

    import ibert_plugin  # noqa: F401  (registers the architectures)

    parser = options.get_training_parser()
    argv = ["unused", "--task", "sentence_prediction", "--num-classes", "2", "--arch", "ibert_roberta_minilm",
            "--max-positions", "512", "--dropout", "0", "--attention-dropout", "0", *extra]
    args = options.parse_args_and_arch(parser, argv)
    model = ARCH_MODEL_REGISTRY["ibert_roberta_minilm"].build_model(args, _Task(dictionary))
    model.load_state_dict(dict(state), strict=True)  # (fairseq upgrades the dict in place)
    return model.eval()


def _batches(dictionary, data_dir: Path, split: str, n: int, bsz: int):
    from ibert_plugin.assets import glue

    cols, _, _ = glue.read_split(data_dir / "glue" / "RT-SENT" / f"{split}.tsv", glue.TASKS["RT-SENT"], split)
    enc = glue.BpeEncoder("wordpiece", data_dir / "minilm")
    rows = [torch.tensor([dictionary.bos()] + dictionary.encode_line(s, append_eos=False,
                                                                      add_if_not_exist=False).tolist()[:126]
                         + [dictionary.eos()]) for s in enc.encode_all(cols[0][:n])]
    out = []
    for i in range(0, len(rows), bsz):
        chunk = rows[i:i + bsz]
        t = torch.full((len(chunk), max(len(r) for r in chunk)), dictionary.pad(), dtype=torch.long)
        for j, r in enumerate(chunk):
            t[j, : len(r)] = r
        out.append(t)
    return out


@torch.no_grad()
def _states(model, tokens):
    _, extra = model(tokens, features_only=True, return_all_hiddens=True)
    return [h.transpose(0, 1).double() for h in extra["inner_states"]]  # B x T x C each


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO / "data"), help="asset folder (minilm/, glue/RT-SENT/)")
    ap.add_argument("--calib", type=int, default=128, help="RT-SENT train sentences for calibration")
    ap.add_argument("--eval", type=int, default=64, help="RT-SENT dev sentences for the error")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--nonlinear-constants", default=None, help="paper / refit (checkouts that have the option)")
    ap.add_argument("--label", default=None, help="name of this run in the JSON (e.g. the commit)")
    args = ap.parse_args()
    data = Path(args.data)
    for rel in ("minilm/model.pt", "minilm/dict.txt", "glue/RT-SENT/train.tsv", "glue/RT-SENT/dev.tsv"):
        if not (data / rel).exists():
            print(f"error: asset missing: {data / rel} (run: python -m ibert_plugin.assets build)", file=sys.stderr)
            sys.exit(2)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary

    d = Dictionary.load(str(data / "minilm" / "dict.txt"))
    d.add_symbol("<mask>")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(data / "minilm" / "model.pt"))["model"]
    state = {k: v for k, v in state.items() if not k.startswith("classification_heads.")}
    nl = [] if args.nonlinear_constants is None else ["--nonlinear-constants", args.nonlinear_constants]

    def build(extra):
        model = _build(d, state, extra)
        model.classification_heads.clear()
        return model

    fp = build(["--quant-mode", "none"])
    integer = build(["--quant-mode", "symmetric", "--weight-bits", "2", *nl])
    fake = build(["--quant-mode", "ternarybert", "--weight-bits", "2"])
    integer.train()
    with torch.no_grad():
        for tokens in _batches(d, data, "train", args.calib, args.batch_size):
            integer(tokens, features_only=True)
    integer.eval()
    num = {"integer_ternary": None, "fake_quant_ternary": None}
    den = None
    for tokens in _batches(d, data, "dev", args.eval, args.batch_size):
        keep = tokens.ne(d.pad()).unsqueeze(-1).double()
        ref = _states(fp, tokens)
        sq = torch.stack([((h * keep) ** 2).sum() for h in ref])
        den = sq if den is None else den + sq
        for name, model in (("integer_ternary", integer), ("fake_quant_ternary", fake)):
            e = torch.stack([(((h - r) * keep) ** 2).sum() for h, r in zip(_states(model, tokens), ref)])
            num[name] = e if num[name] is None else num[name] + e
    rel = {k: (v / den).sqrt().tolist() for k, v in num.items()}
    print(f"relative hidden-state error vs FP ({args.eval} RT-SENT dev sentences, calibrated on {args.calib})")
    print(f"{'state':<10}{'integer ternary':>18}{'fake-quant ternary':>20}{'ratio':>8}")
    for i, (a, b) in enumerate(zip(rel["integer_ternary"], rel["fake_quant_ternary"])):
        print(f"{'emb' if i == 0 else f'layer {i}':<10}{a:>18.4f}{b:>20.4f}{a / b:>8.2f}")
    print(json.dumps({"benchmark": "integer_ternary_error", "label": args.label,
                      "nonlinear_constants": args.nonlinear_constants, "calib_sentences": args.calib,
                      "eval_sentences": args.eval, "relative_error": rel}, sort_keys=True))


if __name__ == "__main__":
    main()
