"""``python -m ibert_plugin.engine eval --checkpoint CKPT --data-bin DIR [--split valid] [--batch-size N]``

Evaluates a symmetric-mode ``ibert_roberta`` sentence-classification checkpoint with the integer engine on a
fairseq-binarised ``sentence_prediction`` data directory (``DIR/input0``, ``DIR/label``): accuracy and throughput
(sentences/s); ``--compare-qat`` also runs the QAT model (accuracy must be identical). Bad input: one error line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parser():
    ap = argparse.ArgumentParser(prog="python -m ibert_plugin.engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="accuracy + throughput of the integer engine")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data-bin", required=True)
    ev.add_argument("--split", default="valid")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--route", choices=["auto", "ort", "u8u8"], default="auto",
                    help="GEMM routes: auto = fastest exact per weight (fbgemm16 ternary, fbgemm 7-bit, u8u8 8-bit); "
                         "ort = ONNX Runtime only (u8s8 / u8u8); u8u8 = the exact 16-bit route everywhere")
    ev.add_argument("--head", default="sentence_classification_head")
    ev.add_argument("--compare-qat", action="store_true", help="also evaluate the QAT model (same accuracy)")
    ev.add_argument("--compare-fp32", action="store_true",
                    help="also time the FP32 PyTorch forward of the same weights (quant_mode none) for a speedup")
    ev.add_argument("--json", default=None, help="also write the result object to this file")
    sub.add_parser("selftest", help="GEMM route self-test on this CPU")
    return ap


def _eval(args):
    import torch

    import ibert_plugin  # noqa: F401  (registers the architecture)
    from fairseq import tasks

    from . import EngineError, convert

    if not os.path.isdir(args.data_bin):
        raise EngineError(f"data directory not found: {args.data_bin}")
    if args.batch_size < 1:
        raise EngineError("--batch-size must be >= 1")
    model, cfg = convert.load_qat_checkpoint(args.checkpoint)
    task_cfg = cfg["task"] if isinstance(cfg, dict) or hasattr(cfg, "__getitem__") else None
    if task_cfg is None or task_cfg.get("_name", None) not in (None, "sentence_prediction"):
        raise EngineError("the checkpoint was not trained with the sentence_prediction task")
    task_cfg = dict(task_cfg) if not hasattr(task_cfg, "data") else task_cfg
    try:
        from omegaconf import OmegaConf, open_dict

        tc = OmegaConf.create(dict(task_cfg)) if isinstance(task_cfg, dict) else task_cfg
        with open_dict(tc):
            tc.data = args.data_bin
        task = tasks.setup_task(tc)
        task.load_dataset(args.split)
    except FileNotFoundError as exc:
        raise EngineError(f"cannot load split {args.split!r} from {args.data_bin}: {exc}") from exc
    V = model.encoder.sentence_encoder.embed_tokens.weight.shape[0]
    if len(task.source_dictionary) != V:
        raise EngineError(f"dictionary size mismatch: {args.data_bin} has {len(task.source_dictionary)} entries, "
                          f"the checkpoint's embedding table {V}")
    if args.head not in getattr(model, "classification_heads", {}):
        raise EngineError(f"the checkpoint has no classification head {args.head!r}")
    eng = convert.from_model(model, threads=args.threads, route=args.route)
    eng.im.head = {k: v for k, v in convert.qstate_from_model(model, args.head).head.items()}
    ds = task.dataset(args.split)
    batches = [ds.collater([ds[i] for i in range(s, min(s + args.batch_size, len(ds)))])
               for s in range(0, len(ds), args.batch_size)]
    fp_model = _fp32_twin(model) if args.compare_fp32 else None
    correct = correct_qat = correct_fp = n = 0
    t_int = t_qat = t_fp = 0.0
    with torch.no_grad():
        for b in batches:
            toks = b["net_input"]["src_tokens"]
            tgt = b["target"].view(-1)
            t0 = time.perf_counter()
            pred = eng.classify(toks).argmax(-1)
            t_int += time.perf_counter() - t0
            correct += int((pred == tgt).sum())
            n += tgt.numel()
            if args.compare_qat:
                t0 = time.perf_counter()
                lq, _ = model(toks, features_only=True, classification_head_name=args.head)
                t_qat += time.perf_counter() - t0
                correct_qat += int((lq.argmax(-1) == tgt).sum())
            if fp_model is not None:
                t0 = time.perf_counter()
                lf, _ = fp_model(toks, features_only=True, classification_head_name=args.head)
                t_fp += time.perf_counter() - t0
                correct_fp += int((lf.argmax(-1) == tgt).sum())
    res = {"split": args.split, "sentences": n, "accuracy": correct / max(n, 1),
           "sentences_per_s": n / max(t_int, 1e-9), "routes": sorted(set(eng.routes[0].values())),
           "selftest": eng.selftest.summary()}
    if args.compare_qat:
        res.update(qat_accuracy=correct_qat / max(n, 1), qat_sentences_per_s=n / max(t_qat, 1e-9))
    if fp_model is not None:
        res.update(fp32_accuracy=correct_fp / max(n, 1), fp32_sentences_per_s=n / max(t_fp, 1e-9),
                   speedup=t_fp / max(t_int, 1e-9))
    print(f"integer engine: accuracy {res['accuracy']:.4f} on {n} sentences ({args.split}), "
          f"{res['sentences_per_s']:.1f} sentences/s")
    if args.compare_qat:
        print(f"QAT model:      accuracy {res['qat_accuracy']:.4f}, {res['qat_sentences_per_s']:.1f} sentences/s")
    if fp_model is not None:
        print(f"FP32 forward:   accuracy {res['fp32_accuracy']:.4f} (same weights, float arithmetic), "
              f"{res['fp32_sentences_per_s']:.1f} sentences/s -> engine speedup {res['speedup']:.2f}x")
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _fp32_twin(model):
    """The same weights in full precision (``quant_mode none``): the FP32 PyTorch baseline for timing."""
    import copy

    from omegaconf import OmegaConf, open_dict

    from ibert_plugin.quant.packing import build_model_for_state

    cfg = copy.deepcopy(model.cfg if hasattr(model, "cfg") else model.args)
    if OmegaConf.is_config(cfg):
        with open_dict(cfg):
            cfg.quant_mode = "none"
    else:
        cfg.quant_mode = "none"
    state = model.state_dict()
    fp = build_model_for_state(cfg, {k: list(v.shape) for k, v in state.items()})
    fp_state = fp.state_dict()
    fp.load_state_dict({k: state[k] for k in fp_state}, strict=True)
    return fp.eval()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from . import EngineError

    try:
        if args.cmd == "selftest":
            from . import selftest

            r = selftest.run(force=True)
            print("GEMM self-test:", r.summary())
            return 0 if r.exact_ok else 1
        return _eval(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
