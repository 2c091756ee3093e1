"""Integer-engine command line.

    python -m ibert_plugin.engine convert --checkpoint CKPT --output model.int [--data-bin DIR] [--bpe auto]
                                          [--bpe-dir D] [--task T] [--head NAME]
    python -m ibert_plugin.engine predict --model model.int [SENTENCE ...] [--tsv FILE [--task T]]
                                          [--format tsv|jsonl] [--output F]
    python -m ibert_plugin.engine eval --model model.int --tsv FILE [--task T] [--predictions OUT] [--json F]
    python -m ibert_plugin.engine eval --checkpoint CKPT --data-bin DIR [--split valid | --tsv FILE --task T]
                                       [--compare-qat] [--compare-fp32] [--predictions OUT] [--json F]
    python -m ibert_plugin.engine selftest

``convert`` compiles a symmetric-mode ``ibert_roberta`` sentence-classification checkpoint into an IBERT-INT model
file (``model_file.py``, ``docs/integer_model_format.md``): every integer constant, the float head, the dictionary and
tokenizer of ``DIR`` (default: the data directory the checkpoint was trained on; ``--bpe auto`` tells GPT-2 from
WordPiece by the dictionary; BPE files from ``--bpe-dir``, default ``<data>/gpt2_bpe`` or ``<data>/minilm``) and the
label names. ``predict`` and ``eval --model`` run from that file alone: no fairseq import, no QAT model. ``predict``
reads sentences from its arguments, from stdin (one example per line; a pair task's two sentences tab-separated) or
from a GLUE-format TSV, and writes ``index``, ``prediction`` and one probability per label as TSV, or JSON lines.
``eval`` prints accuracy (when labels are known) and throughput; with ``--checkpoint`` it reads fairseq data
(a binarised split, or a TSV tokenized with ``DIR``'s dictionaries) and can also run the QAT model (``--compare-qat``,
accuracy must be identical) and the same weights in float (``--compare-fp32``, speedup). ``--predictions`` writes
``index<TAB>label`` rows (GLUE submission layout). Bad input: one ``error:`` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import EngineError


def _add_run_args(p):
    from .engine import IntegerEngine

    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--route", choices=IntegerEngine.ROUTE_CHOICES, default="auto",
                   help="GEMM routes: auto = the fastest route per weight that is exact for its range and passed this "
                        "CPU's self-test; ort = ONNX Runtime only (u8s8 / u8u8); u8u8 = the exact 16-bit route "
                        "everywhere")


def _add_tsv_args(p, task_help):
    p.add_argument("--tsv", default=None, help="GLUE-format TSV (columns as in the GLUE task --task)")
    p.add_argument("--task", default=None, help=task_help)
    p.add_argument("--tsv-kind", choices=["auto", "dev", "test"], default="auto",
                   help="with --tsv: dev (labelled) or test layout; auto: from the file name (test*.tsv is test)")


def _parser():
    ap = argparse.ArgumentParser(prog="python -m ibert_plugin.engine")
    sub = ap.add_subparsers(dest="cmd", required=True)

    cv = sub.add_parser("convert", help="checkpoint -> IBERT-INT integer model file")
    cv.add_argument("--checkpoint", required=True)
    cv.add_argument("--output", required=True, help="model file to write (e.g. model.int)")
    cv.add_argument("--data-bin", default=None,
                    help="binarised data dir whose input0/label dictionaries the model uses (default: the "
                         "checkpoint's training data dir)")
    cv.add_argument("--bpe", choices=["auto", "gpt2", "wordpiece"], default="auto",
                    help="BPE of the dictionary (auto: detected from it)")
    cv.add_argument("--bpe-dir", default=None, help="BPE files (default <data>/gpt2_bpe or <data>/minilm)")
    cv.add_argument("--task", default=None, help="GLUE task of the model (e.g. RT-SENT): default TSV layout")
    cv.add_argument("--head", default="sentence_classification_head")

    pr = sub.add_parser("predict", help="labels and probabilities for raw sentences, from a model file")
    pr.add_argument("--model", required=True, help="IBERT-INT model file (from convert)")
    pr.add_argument("sentences", nargs="*", help="sentences (default: one example per stdin line)")
    _add_tsv_args(pr, "with --tsv: GLUE task of the file's column layout (default: the model file's task)")
    pr.add_argument("--format", choices=["tsv", "jsonl"], default="tsv")
    pr.add_argument("--output", default=None, help="write here instead of stdout")
    _add_run_args(pr)

    ev = sub.add_parser("eval", help="accuracy + throughput of the integer engine")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="IBERT-INT model file (no fairseq; input: --tsv)")
    src.add_argument("--checkpoint", default=None, help="fairseq checkpoint (input: --data-bin)")
    ev.add_argument("--data-bin", default=None, help="with --checkpoint: binarised data dir (dictionaries, splits)")
    ev.add_argument("--split", default="valid", help="binarised split of --data-bin (ignored with --tsv)")
    _add_tsv_args(ev, "with --tsv: GLUE task of the file's column layout (e.g. RT-SENT, SST-2; with --model the "
                      "file's task by default)")
    ev.add_argument("--bpe", choices=["auto", "gpt2", "wordpiece"], default="auto",
                    help="with --checkpoint --tsv: the BPE of --data-bin (auto: detected from its dictionary)")
    ev.add_argument("--bpe-dir", default=None,
                    help="with --checkpoint --tsv: BPE files (default <data>/gpt2_bpe or <data>/minilm)")
    ev.add_argument("--predictions", default=None, help="write index<TAB>predicted label rows to this file")
    _add_run_args(ev)
    ev.add_argument("--head", default="sentence_classification_head")
    ev.add_argument("--compare-qat", action="store_true", help="with --checkpoint: also evaluate the QAT model")
    ev.add_argument("--compare-fp32", action="store_true",
                    help="with --checkpoint: also time the FP32 forward of the same weights (quant_mode none)")
    ev.add_argument("--json", default=None, help="also write the result object to this file")
    sub.add_parser("selftest", help="GEMM route self-test on this CPU")
    return ap


# ------------------------------------------------------------------------------------------------------------------
# checkpoint side (fairseq)
# ------------------------------------------------------------------------------------------------------------------
def _load_checkpoint(path: str):
    """(QAT model, cfg) of a checkpoint; a file torch or fairseq cannot read is one "not a valid checkpoint" line."""
    import pickle
    import zipfile

    from ibert_plugin.wiring.checkpoint_file import CheckpointError

    from . import convert

    try:
        return convert.load_qat_checkpoint(path)
    except EngineError as exc:
        cause = exc.__cause__
        if cause is None or isinstance(cause, EngineError):
            raise
        if isinstance(cause, CheckpointError):  # already one sentence: "<path> is not a valid checkpoint (...)"
            raise EngineError(str(cause)) from None
        # torch's own messages are essays ending in "re-run with weights_only=False": name the file's problem
        if not zipfile.is_zipfile(path):
            why = "not a torch zip archive: corrupt or truncated"
        elif isinstance(cause, pickle.UnpicklingError):
            why = "it holds Python objects other than tensors and fairseq's configuration"
        elif isinstance(cause, (OSError, RuntimeError, EOFError, zipfile.BadZipFile)):
            why = "unreadable torch archive"
        else:
            why = "no fairseq ibert_roberta model in it"
        raise EngineError(f"{path} is not a valid checkpoint ({why})") from None


def _setup_task(cfg, data_bin: str):
    """The checkpoint's ``sentence_prediction`` task on ``data_bin`` (its dictionaries, exactly as in training)."""
    from fairseq import tasks
    from omegaconf import OmegaConf, open_dict

    task_cfg = cfg["task"] if isinstance(cfg, dict) or hasattr(cfg, "__getitem__") else None
    if task_cfg is None or task_cfg.get("_name", None) not in (None, "sentence_prediction"):
        raise EngineError("the checkpoint was not trained with the sentence_prediction task")
    if not os.path.isdir(data_bin):
        raise EngineError(f"data directory not found: {data_bin}")
    tc = OmegaConf.create(dict(task_cfg)) if isinstance(task_cfg, dict) else task_cfg
    with open_dict(tc):
        tc.data = data_bin
    try:
        return tasks.setup_task(tc)
    except FileNotFoundError as exc:
        raise EngineError(f"{data_bin}: no fairseq dictionaries ({exc})") from None


def _detect_bpe(dictionary) -> str:
    """GPT-2 BPE dictionaries hold byte-pair ids (digits); WordPiece dictionaries hold word pieces."""
    syms = [dictionary[i] for i in range(dictionary.nspecial, min(len(dictionary), dictionary.nspecial + 500))]
    digits = sum(x.isdigit() for x in syms)
    return "gpt2" if syms and digits > len(syms) // 2 else "wordpiece"


def _text_encoder(task, bpe: str, bpe_dir, num_inputs: int):
    """The engine's fairseq-free tokenizer for the task's dictionary (the same one a model file stores)."""
    from ibert_plugin.assets.common import AssetError, data_dir

    from .tokenizer import TextEncoder, gpt2_tokenizer_json

    src = task.source_dictionary
    bpe = _detect_bpe(src) if bpe == "auto" else bpe
    d = Path(bpe_dir) if bpe_dir else data_dir() / ("gpt2_bpe" if bpe == "gpt2" else "minilm")
    if bpe == "gpt2":
        tok_json = gpt2_tokenizer_json(d)
    else:
        from ibert_plugin.assets.wordpiece_bpe import load_wordpiece_tokenizer

        try:
            tok_json = load_wordpiece_tokenizer(str(d)).to_str()
        except (FileNotFoundError, AssetError) as exc:
            raise EngineError(f"{exc} (run: python -m ibert_plugin.assets build --only minilm)") from None
    init_tok = getattr(task.cfg, "init_token", src.bos())
    sep_tok = getattr(task.cfg, "separator_token", src.eos())
    return TextEncoder(bpe=bpe, tokenizer_json=tok_json, symbols=list(src.symbols), bos=src.bos(), pad=src.pad(),
                       eos=src.eos(), unk=src.unk(), init_token=init_tok, separator_token=sep_tok,
                       max_positions=int(task.max_positions()), num_inputs=num_inputs)


def _label_names(task, num_classes: int):
    ld = task.label_dictionary
    return [ld[i + ld.nspecial] for i in range(num_classes)]


def _qat_engine(args):
    """(engine, QAT model, task) for ``--checkpoint``; the engine's head is ``--head``."""
    from . import convert
    from .engine import IntegerEngine

    model, cfg = _load_checkpoint(args.checkpoint)
    task = _setup_task(cfg, args.data_bin)
    V = model.encoder.sentence_encoder.embed_tokens.weight.shape[0]
    if len(task.source_dictionary) != V:
        raise EngineError(f"dictionary size mismatch: {args.data_bin} has {len(task.source_dictionary)} entries, "
                          f"the checkpoint's embedding table {V}")
    if args.head not in getattr(model, "classification_heads", {}):
        raise EngineError(f"the checkpoint has no classification head {args.head!r}")
    im = convert.compile_model(model, args.head)
    return IntegerEngine(im, threads=args.threads, route=args.route), model, task


def _convert(args):
    from . import convert, model_file

    model, cfg = _load_checkpoint(args.checkpoint)
    data_bin = args.data_bin or (cfg["task"].get("data") if cfg.get("task") is not None else None)
    if not data_bin:
        raise EngineError("the checkpoint does not name its data directory: give --data-bin")
    if args.data_bin is None and not os.path.isdir(data_bin):
        raise EngineError(f"the checkpoint's data directory {data_bin} is not here: give --data-bin")
    task = _setup_task(cfg, data_bin)
    heads = getattr(model, "classification_heads", {})
    if args.head not in heads:
        raise EngineError(f"the checkpoint has no classification head {args.head!r}")
    V = model.encoder.sentence_encoder.embed_tokens.weight.shape[0]
    if len(task.source_dictionary) != V:
        raise EngineError(f"dictionary size mismatch: {data_bin} has {len(task.source_dictionary)} entries, the "
                          f"checkpoint's embedding table {V}")
    if args.task is not None:
        _task_spec(args.task)
    num_inputs = 2 if os.path.isdir(os.path.join(data_bin, "input1")) else 1
    text = _text_encoder(task, args.bpe, args.bpe_dir, num_inputs)
    im = convert.compile_model(model, args.head)
    labels = _label_names(task, heads[args.head].out_proj.weight.shape[0])
    source = {"checkpoint": os.path.basename(args.checkpoint), "sha256": model_file.sha256_file(args.checkpoint),
              "head": args.head, "data_bin": os.path.abspath(data_bin)}
    header = model_file.save(args.output, im, text=text, labels=labels, source=source, task=args.task)
    a, b = header["arch"], header["bits"]
    print(f"wrote {args.output} ({model_file.FORMAT_NAME} v{model_file.FORMAT_VERSION}, "
          f"{os.path.getsize(args.output) / 1e6:.1f} MB): {a['layers']} layers x {a['embed_dim']}, "
          f"{'ternary' if b['ternary'] else str(b['weight']) + '-bit'} weights, {text.bpe} tokenizer, "
          f"labels {labels}")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# model-file side (no fairseq)
# ------------------------------------------------------------------------------------------------------------------
def _load_model_file(args):
    """(engine, ModelFile) for ``--model``."""
    from . import model_file
    from .engine import IntegerEngine

    mf = model_file.load(args.model)
    if mf.text is None:
        raise EngineError(f"{args.model} holds no tokenizer: re-run convert")
    if not mf.model.head:
        raise EngineError(f"{args.model} holds no classification head")
    return IntegerEngine(mf.model, threads=args.threads, route=args.route), mf


def _task_spec(name: str):
    from ibert_plugin.assets import glue

    spec = glue.TASKS.get(name)
    if spec is None:
        raise EngineError(f"unknown task {name!r} (choose from {', '.join(glue.ALL_ORDER)})")
    if spec.labels is None:
        raise EngineError(f"{name} is a regression task: the engine CLI predicts classes only")
    return spec


def _read_tsv(args, default_task):
    """(input columns, labels or None) of ``--tsv`` in the layout of ``--task`` (or ``default_task``)."""
    from ibert_plugin.assets import glue
    from ibert_plugin.assets.common import AssetError

    task = args.task or default_task
    if not task:
        raise EngineError("--tsv needs --task (the GLUE column layout, e.g. RT-SENT or SST-2)")
    spec = _task_spec(task)
    kind = args.tsv_kind
    if kind == "auto":
        kind = "test" if os.path.basename(args.tsv).startswith("test") else "dev"
    try:
        cols, labels, _ = glue.read_split(Path(args.tsv), spec, kind)
    except AssetError as exc:
        raise EngineError(str(exc)) from None
    return cols, labels


def _argv_sentences(sentences):
    """Command-line sentences, each checked to be UTF-8 (Python keeps undecodable argv bytes as lone surrogates)."""
    for i, sent in enumerate(sentences, 1):
        try:
            sent.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = sent[exc.start].encode("utf-8", "surrogateescape")
            raise EngineError(f"sentence argument {i} is not UTF-8 text (byte 0x{bad[0]:02x} at character "
                              f"{exc.start})") from None
    return sentences


def _stdin_lines():
    """stdin's lines, decoded as UTF-8 (one error naming the line and byte instead of a UnicodeDecodeError)."""
    from ibert_plugin.assets.common import AssetError, decode_utf8

    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        text = decode_utf8(data, "<stdin>")
    except AssetError as exc:
        raise EngineError(str(exc)) from None
    return [ln.rstrip("\r") for ln in text.split("\n")]


def _check_run_args(args):
    if args.batch_size < 1:
        raise EngineError("--batch-size must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise EngineError(f"--threads must be >= 1 (got {args.threads}; leave it out for the default)")


def _encode(text, cols):
    rows, truncated = text.encode(cols)
    if truncated:
        print(f"warning: {truncated} rows longer than {text.max_positions} tokens were truncated", file=sys.stderr)
    return rows


def _targets(labels, names, where):
    import torch

    idx = {n: i for i, n in enumerate(names)}
    out = []
    for i, lab in enumerate(labels):
        if lab not in idx:
            raise EngineError(f"{where}: label {lab!r} (row {i + 1}) is not one of the model's labels {names}")
        out.append(idx[lab])
    return torch.tensor(out, dtype=torch.long)


def _batches_with_targets(text, rows, targets, batch_size):
    toks = text.batches(rows, batch_size)
    out, s = [], 0
    for t in toks:
        out.append((t, None if targets is None else targets[s: s + t.shape[0]]))
        s += t.shape[0]
    return out


def _predict(args):
    import torch

    _check_run_args(args)
    eng, mf = _load_model_file(args)
    text = mf.text
    if args.tsv:
        if args.sentences:
            raise EngineError("give sentences or --tsv, not both")
        cols, _ = _read_tsv(args, mf.header.get("task"))
    else:
        lines = _argv_sentences(args.sentences) if args.sentences else _stdin_lines()
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            raise EngineError("no sentences (give them as arguments, on stdin, or with --tsv)")
        fields = [ln.split("\t") for ln in lines] if text.num_inputs > 1 else [[ln] for ln in lines]
        for i, f in enumerate(fields):
            if len(f) != text.num_inputs:
                raise EngineError(f"example {i + 1}: the model takes {text.num_inputs} tab-separated sentences, "
                                  f"got {len(f)}")
        cols = [list(c) for c in zip(*fields)]
    names = mf.labels or [str(i) for i in range(mf.header["arch"]["num_classes"])]
    # batched by length (little padding), results in input order
    probs = torch.softmax(eng.predict_batches(_encode(text, cols), args.batch_size).double(), dim=-1)
    pred = probs.argmax(-1).tolist()
    out_lines = []
    if args.format == "tsv":
        out_lines.append("\t".join(["index", "prediction"] + [f"p_{n}" for n in names]))
        out_lines += ["\t".join([str(i), names[p]] + [f"{v:.6f}" for v in row])
                      for i, (p, row) in enumerate(zip(pred, probs.tolist()))]
    else:
        out_lines += [json.dumps({"index": i, "prediction": names[p],
                                  "probabilities": dict(zip(names, row))})
                      for i, (p, row) in enumerate(zip(pred, probs.tolist()))]
    body = "\n".join(out_lines) + "\n"
    if args.output:
        try:
            Path(args.output).write_text(body)
        except OSError as exc:
            raise EngineError(f"cannot write --output {args.output}: {exc.strerror}") from None
    else:
        sys.stdout.write(body)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# eval (both sides)
# ------------------------------------------------------------------------------------------------------------------
def _eval(args):
    import torch

    _check_run_args(args)
    model = task = None
    if args.model:
        if args.compare_qat or args.compare_fp32:
            raise EngineError("--compare-qat / --compare-fp32 need --checkpoint (a model file holds no QAT model)")
        if not args.tsv:
            raise EngineError("with --model, evaluate a GLUE-format --tsv (binarised splits need --checkpoint)")
        eng, mf = _load_model_file(args)
        cols, labels = _read_tsv(args, mf.header.get("task"))
        names = mf.labels or [str(i) for i in range(mf.header["arch"]["num_classes"])]
        targets = None if labels is None else _targets(labels, names, args.tsv)
        batches = _batches_with_targets(mf.text, _encode(mf.text, cols), targets, args.batch_size)
        split_name = os.path.basename(args.tsv)
    else:
        if not args.data_bin:
            raise EngineError("--checkpoint needs --data-bin")
        if not os.path.isdir(args.data_bin):
            raise EngineError(f"data directory not found: {args.data_bin}")
        cols, labels = _read_tsv(args, None) if args.tsv else (None, None)  # bad TSV rows fail before loading
        eng, model, task = _qat_engine(args)
        names = _label_names(task, eng.im.head["out_proj.weight"].shape[0])
        if args.tsv:
            text = _text_encoder(task, args.bpe, args.bpe_dir, len(cols))
            targets = None if labels is None else _targets(labels, names, args.tsv)
            batches = _batches_with_targets(text, _encode(text, cols), targets, args.batch_size)
            split_name = os.path.basename(args.tsv)
        else:
            try:
                task.load_dataset(args.split)
            except FileNotFoundError as exc:
                raise EngineError(f"cannot load split {args.split!r} from {args.data_bin}: {exc}") from None
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
        try:
            with open(args.predictions, "w") as f:
                f.write("index\tprediction\n")
                for i, p in enumerate(torch.cat(preds).tolist() if preds else []):
                    f.write(f"{i}\t{names[p]}\n")
        except OSError as exc:
            raise EngineError(f"cannot write --predictions {args.predictions}: {exc.strerror}") from None
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
        try:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        except OSError as exc:
            raise EngineError(f"cannot write --json {args.json}: {exc.strerror}") from None
    return 0


def _fp32_twin(model):
    """The same weights in full precision (``quant_mode none``): the FP32 PyTorch baseline for timing."""
    import copy

    from omegaconf import OmegaConf, open_dict

    from ibert_plugin.wiring.checkpoint import build_model_for_state

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
    try:
        if args.cmd == "selftest":
            from . import selftest

            r = selftest.run(force=True)
            print("GEMM self-test:", r.summary())
            return 0 if r.exact_ok else 1
        return {"convert": _convert, "predict": _predict, "eval": _eval}[args.cmd](args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
