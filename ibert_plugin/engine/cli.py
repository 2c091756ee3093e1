"""Integer-engine command line.

    python -m ibert_plugin.engine eval --checkpoint CKPT --data-bin DIR [--split valid | --tsv FILE --task T]
                                       [--batch-size 8] [--compare-qat] [--compare-fp32] [--predictions OUT] [--json F]
    python -m ibert_plugin.engine selftest

``eval`` runs a symmetric-mode ``ibert_roberta`` sentence-classification checkpoint on the integer engine. Input is a
fairseq-binarised split of ``DIR`` (``DIR/input0``, ``DIR/label``), or a GLUE-format TSV (``--tsv``, columns as in
the GLUE task ``--task``: a dev file with labels is scored, a test file only predicted), BPE-encoded with the same
local BPE as ``DIR`` (``--bpe auto`` tells GPT-2 from WordPiece by the dictionary) and mapped through ``DIR``'s
dictionaries. It prints accuracy (when labels are known) and throughput (sentences/s); ``--compare-qat`` also runs the
QAT model (accuracy must be identical), ``--compare-fp32`` the same weights in float for a speedup;
``--predictions`` writes ``index<TAB>label`` rows (GLUE submission layout). Bad input: one error line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _parser():
    ap = argparse.ArgumentParser(prog="python -m ibert_plugin.engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="accuracy + throughput of the integer engine")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data-bin", required=True)
    ev.add_argument("--split", default="valid", help="binarised split of --data-bin (ignored with --tsv)")
    ev.add_argument("--tsv", default=None, help="GLUE-format TSV to predict on instead of a binarised split")
    ev.add_argument("--task", default=None, help="with --tsv: GLUE task of the file's column layout (e.g. RT-SENT, SST-2)")
    ev.add_argument("--tsv-kind", choices=["auto", "dev", "test"], default="auto",
                    help="with --tsv: dev (labelled) or test layout; auto: from the file name (test*.tsv is test)")
    ev.add_argument("--bpe", choices=["auto", "gpt2", "wordpiece"], default="auto",
                    help="with --tsv: the BPE of --data-bin (auto: detected from its dictionary)")
    ev.add_argument("--bpe-dir", default=None, help="with --tsv: BPE files (default <data>/gpt2_bpe or <data>/minilm)")
    ev.add_argument("--predictions", default=None, help="write index<TAB>predicted label rows to this file")
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
    if args.tsv:
        batches, split_name = _tsv_batches(args, task), os.path.basename(args.tsv)
    else:
        ds = task.dataset(args.split)
        batches = [(b["net_input"]["src_tokens"], b["target"].view(-1)) for b in
                   (ds.collater([ds[i] for i in range(s, min(s + args.batch_size, len(ds)))])
                    for s in range(0, len(ds), args.batch_size))]
        split_name = args.split
    fp_model = _fp32_twin(model) if args.compare_fp32 else None
    correct = correct_qat = correct_fp = n = n_lab = 0
    t_int = t_qat = t_fp = 0.0
    preds = []
    with torch.no_grad():
        for toks, tgt in batches:
            t0 = time.perf_counter()
            pred = eng.classify(toks).argmax(-1)
            t_int += time.perf_counter() - t0
            preds.append(pred)
            n += toks.shape[0]
            if tgt is not None:
                correct += int((pred == tgt).sum())
                n_lab += tgt.numel()
            if args.compare_qat:
                t0 = time.perf_counter()
                lq, _ = model(toks, features_only=True, classification_head_name=args.head)
                t_qat += time.perf_counter() - t0
                if tgt is not None:
                    correct_qat += int((lq.argmax(-1) == tgt).sum())
            if fp_model is not None:
                t0 = time.perf_counter()
                lf, _ = fp_model(toks, features_only=True, classification_head_name=args.head)
                t_fp += time.perf_counter() - t0
                if tgt is not None:
                    correct_fp += int((lf.argmax(-1) == tgt).sum())
    if args.predictions:
        ld = task.label_dictionary
        try:
            with open(args.predictions, "w") as f:
                f.write("index\tprediction\n")
                for i, p in enumerate(torch.cat(preds).tolist() if preds else []):
                    f.write(f"{i}\t{ld[p + ld.nspecial]}\n")
        except OSError as exc:
            raise EngineError(f"cannot write --predictions {args.predictions}: {exc.strerror}") from exc
    acc = (lambda c: c / n_lab) if n_lab else (lambda c: None)
    res = {"split": split_name, "sentences": n, "labelled": n_lab, "accuracy": acc(correct),
           "sentences_per_s": n / max(t_int, 1e-9), "routes": sorted(set(eng.routes[0].values())),
           "selftest": eng.selftest.summary()}
    if args.compare_qat:
        res.update(qat_accuracy=acc(correct_qat), qat_sentences_per_s=n / max(t_qat, 1e-9))
    if fp_model is not None:
        res.update(fp32_accuracy=acc(correct_fp), fp32_sentences_per_s=n / max(t_fp, 1e-9),
                   speedup=t_fp / max(t_int, 1e-9))
    def fmt(a):
        return "n/a (no labels)" if a is None else f"{a:.4f}"

    print(f"integer engine: accuracy {fmt(res['accuracy'])} on {n} sentences ({split_name}), "
          f"{res['sentences_per_s']:.1f} sentences/s")
    if args.compare_qat:
        print(f"QAT model:      accuracy {fmt(res['qat_accuracy'])}, {res['qat_sentences_per_s']:.1f} sentences/s")
    if fp_model is not None:
        print(f"FP32 forward:   accuracy {fmt(res['fp32_accuracy'])} (same weights, float arithmetic), "
              f"{res['fp32_sentences_per_s']:.1f} sentences/s -> engine speedup {res['speedup']:.2f}x")
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _detect_bpe(dictionary) -> str:
    """GPT-2 BPE dictionaries hold byte-pair ids (digits); WordPiece dictionaries hold word pieces."""
    syms = [dictionary[i] for i in range(dictionary.nspecial, min(len(dictionary), dictionary.nspecial + 500))]
    digits = sum(x.isdigit() for x in syms)
    return "gpt2" if syms and digits > len(syms) // 2 else "wordpiece"


def _tsv_batches(args, task):
    """Read, validate, BPE-encode and batch a GLUE-format TSV exactly as ``preprocess_GLUE_tasks.sh`` + the
    ``sentence_prediction`` task would: ``<s> a </s>`` or ``<s> a </s> </s> b </s>``, right-padded."""
    import torch
    from fairseq.data import data_utils

    from ibert_plugin.assets import glue
    from ibert_plugin.assets.common import AssetError, data_dir

    from . import EngineError

    if not args.task:
        raise EngineError("--tsv needs --task (the GLUE column layout, e.g. RT-SENT or SST-2)")
    spec = glue.TASKS.get(args.task)
    if spec is None:
        raise EngineError(f"unknown task {args.task!r} (choose from {', '.join(glue.ALL_ORDER)})")
    if spec.labels is None:
        raise EngineError(f"{args.task} is a regression task: the engine CLI predicts classes only")
    kind = args.tsv_kind
    if kind == "auto":
        kind = "test" if os.path.basename(args.tsv).startswith("test") else "dev"
    src, ld = task.source_dictionary, task.label_dictionary
    bpe = _detect_bpe(src) if args.bpe == "auto" else args.bpe
    try:
        cols, labels, _ = glue.read_split(Path(args.tsv), spec, kind)
        bpe_dir = Path(args.bpe_dir) if args.bpe_dir else data_dir() / ("gpt2_bpe" if bpe == "gpt2" else "minilm")
        encoder = glue.BpeEncoder(bpe, bpe_dir)
        encoded = [encoder.encode_all(c) for c in cols]
    except AssetError as exc:
        raise EngineError(str(exc)) from exc
    init_tok = getattr(task.cfg, "init_token", src.bos())
    sep_tok = getattr(task.cfg, "separator_token", src.eos())
    max_len = task.max_positions()  # sentence_prediction: --max-positions of the checkpoint's task config
    rows, too_long = [], 0
    for r in range(len(encoded[0])):
        ids = ([] if init_tok is None else [init_tok]) + src.encode_line(
            encoded[0][r], append_eos=True, add_if_not_exist=False).tolist()
        for c in encoded[1:]:
            ids += ([] if sep_tok is None else [sep_tok]) + src.encode_line(
                c[r], append_eos=True, add_if_not_exist=False).tolist()
        if len(ids) > max_len:
            too_long += 1
            ids = ids[: max_len - 1] + [src.eos()]
        rows.append(torch.tensor(ids, dtype=torch.long))
    if too_long:
        print(f"warning: {too_long} rows longer than {max_len} tokens were truncated", file=sys.stderr)
    targets = None
    if labels is not None:
        idx = []
        for i, lab in enumerate(labels):
            j = ld.index(lab)
            if j == ld.unk():
                raise EngineError(f"{args.tsv}: label {lab!r} (row {i + 1}) is not in {args.data_bin}/label/dict.txt")
            idx.append(j - ld.nspecial)
        targets = torch.tensor(idx, dtype=torch.long)
    out = []
    for s in range(0, len(rows), args.batch_size):
        toks = data_utils.collate_tokens(rows[s: s + args.batch_size], src.pad(), left_pad=False)
        out.append((toks, None if targets is None else targets[s: s + args.batch_size]))
    return out


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
