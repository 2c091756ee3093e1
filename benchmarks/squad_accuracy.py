"""SQuAD accuracy: FP32, the post-training int8 peers, and the trained quantized models, on the same questions.

Data: the task folders of ``python -m ibert_plugin.assets build --only squad --squad-dir DIR`` (``docs/squad.md``):
training on ``<TASK>/train.json``, checkpoint choice on ``<TASK>/dev.json`` (the selection split), report on
``SQUAD1/test_subset.json`` (a fixed >= 2,500-question subset of the official v1.1 dev set, whole articles) or, with
``--full``, ``SQUAD1/test.json`` (all 10,570 questions); SQUAD2 on ``test.json`` (Disfl-QA's test ids of the
official v2.0 dev set) plus the disfluent rewrites of the same questions (``test_disfluent.json``).

Rows (every one scored on the same report questions; model: all-MiniLM-L6-v2 imported to fairseq, ``data/minilm``):

* ``fp32``: the FP finetuned checkpoint (recipe stage ``fp``);
* post-training peers of that checkpoint, no training (``benchmarks/peers.py``: the same constructions as the
  engine speed benchmark): ``ort_int8_dynamic`` (ONNX Runtime ``quantize_dynamic``, per-channel int8 weights, of the
  exported FP encoder), ``torch_int8_dynamic`` (``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear``),
  ``ov_int8`` (OpenVINO + NNCF static PTQ calibrated on training windows; only when ``openvino``/``nncf`` import:
  otherwise listed as unavailable) and ``w8a8_ptq`` (this plugin's I-BERT W8A8, activation ranges calibrated on
  training windows, no QAT). The span head stays float in the peers, as in the engine;
* ``int8_qat`` (I-BERT QAT, stage ``ibert``) and ``int8_qat_engine`` (the integer engine on it);
* ``w2a8_twn`` (TernaryBERT W2A8, TWN, distilled from FP; stage ``ternary``);
* ``int_ternary`` (integer-only ternary: 2-bit weights, I-BERT activations, from the W2A8 model; stage
  ``int_ternary``) and ``int_ternary_engine``.

Each engine row counts its predictions equal to its QAT model's. Per row EM and F1 (SQUAD2: HasAns/NoAns and the
no-answer threshold chosen on the selection set, applied unchanged to the report files); every F1 gap to FP with a
paired bootstrap 95 % interval over questions (``ibert_plugin.stats``). The result JSON and every row's official
predictions JSON (``{question id: answer text}``) go to ``--results-dir`` (default ``docs/results/squad/<TASK>``),
with the sha256 of every data file and the exact command. Stages are resumable (the SQuAD driver, ``run.py``):
a relaunch reuses every finished stage and peer and resumes an interrupted stage from its ``checkpoint_last.pt``.

Schedules (``SCHEDULES``; the cost model behind ``cpu`` is in ``docs/squad.md``)::

    python benchmarks/squad_accuracy.py                  # CPU schedule: SQUAD1 in about 4 hours on 2 cores
    python benchmarks/squad_accuracy.py --task SQUAD2
    python benchmarks/squad_accuracy.py --full           # GPU: TernaryBERT's 3 epochs at 384 / 128, whole dev set
    python benchmarks/squad_accuracy.py --quick          # smoke: a few dozen updates; checks the pipeline only

``--engine-speed``: the integer engine on the report file's windows (padded to the window length, batch 8 and 32)
against FP32 PyTorch and the int8 peers, median [min, max], with a bit-exactness check (:func:`engine_speed`).

Prints progress, a table, then ONE JSON object as the last line. Bad input: one ``error:`` line, exit 2.
"""
import argparse
import copy
import hashlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ibert_plugin.recipes import squad as recipe  # noqa: E402
from ibert_plugin.squad.metrics import f1_v1, f1_v2, normalize_answer  # noqa: E402
from ibert_plugin.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, paired_bootstrap_scores  # noqa: E402

#: F1 gap targets to FP (issue 21): INT8 QAT 1.0, W2A8 2.0, integer-only ternary 3.0
TARGETS = {"int8_qat": 1.0, "w2a8_twn": 2.0, "int_ternary": 3.0}
#: peer row -> benchmarks/peers.py peer it is built with
PEER_ROWS = {"ort_int8_dynamic": "ort_int8_dynamic", "torch_int8_dynamic": "torch_int8", "ov_int8": "ov_int8"}
#: trained rows -> recipe stage (folder names follow the recipe's; see STAGE_DIRS)
STAGE_ROWS = {"fp32": "fp", "int8_qat": "ibert", "int8_qat_engine": "engine", "w2a8_twn": "ternary",
              "int_ternary": "int_ternary", "int_ternary_engine": "int_ternary_engine"}
STAGE_DIRS = {"fp": "fp", "ibert": "ibert_w8", "engine": "engine", "ternary": "ternary_w2a8_twn",
              "int_ternary": "int_ternary_w2_twn", "int_ternary_engine": "int_ternary_engine"}
ROWS = ("fp32", "ort_int8_dynamic", "torch_int8_dynamic", "ov_int8", "w8a8_ptq", "int8_qat", "int8_qat_engine",
        "w2a8_twn", "int_ternary", "int_ternary_engine")
#: engine row -> the QAT row whose predictions it must reproduce
ENGINE_OF = {"int8_qat_engine": "int8_qat", "int_ternary_engine": "int_ternary"}
#: bit-width of each quantized row, for "best post-training peer of its bit-width"
BITS = {"ort_int8_dynamic": 8, "torch_int8_dynamic": 8, "ov_int8": 8, "w8a8_ptq": 8, "int8_qat": 8,
        "int8_qat_engine": 8, "w2a8_twn": 2, "int_ternary": 2, "int_ternary_engine": 2}
CALIB_WINDOWS = 64  # training windows that calibrate w8a8_ptq and ov_int8 (the PTQ ablation's count)

# The CPU schedule (docs/squad.md, "CPU schedule and its cost model"): TernaryBERT's windows (384 / 128: with
# length-sorted batches a shorter window saves nothing, it only cuts contexts into more windows), batch 32; FP
# 1.5 epochs (selection F1 at 0.5, 1.0, 1.5: the convergence verdict), the quantized stages start from FP and run
# the fraction of an epoch the 4-hour budget holds. Epochs, not update counts, so the schedule follows the data.
_CPU_COMMON = ["--per_gpu_batch_size", "32", "--learning_rate", "1e-4", "--ternary_learning_rate", "5e-4",
               "--ibert_learning_rate", "1e-5", "--int-ternary-learning-rate", "2e-5", "--clip_val", "10",
               "--pred_distill_weight", "256"]
SCHEDULES = {
    "cpu": dict(caps=None, flags={
        "SQUAD1": _CPU_COMMON + ["--num_train_epochs", "1.5", "--ternary_epochs", "0.5", "--ibert_epochs", "0.25",
                                 "--int-ternary-epochs", "0.15"],
        "SQUAD2": _CPU_COMMON + ["--num_train_epochs", "3", "--ternary_epochs", "1", "--ibert_epochs", "0.5",
                                 "--int-ternary-epochs", "0.3"]}),
    "quick": dict(caps="fp=30,ternary=6,int_ternary=4,ibert=4",
                  flags=["--per_gpu_batch_size", "16", "--learning_rate", "1e-4", "--clip_val", "10",
                         "--eval_step", "15"]),
    "full": dict(caps=None, flags=["--full", "--num_train_epochs", "2", "--ternary_epochs", "3", "--ibert_epochs", "1",
                                   "--int-ternary-epochs", "1", "--per_gpu_batch_size", "32", "--clip_val", "10"]),
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def per_question_f1(test_file: Path, predictions: Path, version_2: bool = False):
    """Token F1 (points) per question of ``test_file``, as the official script scores it (v2.0: an unanswerable
    question's gold is ``""``, F1 1 only for an empty prediction)."""
    gold = {q["id"]: [a["text"] for a in q["answers"]] for a in json.loads(test_file.read_text())["data"]
            for p in a["paragraphs"] for q in p["qas"]}
    pred = json.loads(predictions.read_text())
    if not version_2:
        return [100.0 * max(f1_v1(pred.get(qid, ""), g) for g in golds) for qid, golds in gold.items()]
    out = []
    for qid, golds in gold.items():
        golds = [g for g in golds if normalize_answer(g)] or [""]
        out.append(100.0 * max(f1_v2(pred.get(qid, ""), g) for g in golds) if qid in pred else 0.0)
    return out


def calibration_windows(train_file: Path, tok, n: int, max_seq_length: int, doc_stride: int, max_query_length: int,
                        seed: int = 0):
    """``n`` training windows (unpadded int64 token rows) of questions drawn with a fixed seed: what the
    post-training quantizers calibrate on."""
    import numpy as np
    import torch

    from ibert_plugin.squad.data import read_squad
    from ibert_plugin.squad.features import build_features

    examples = read_squad(train_file)
    pool = [examples[i] for i in np.random.RandomState(seed).permutation(len(examples))[:4 * n]]
    feats = build_features(pool, tok, max_seq_length, doc_stride, max_query_length)[:n]
    return [torch.from_numpy(f.tokens).long() for f in feats]


def _padded(rows, pad: int):
    import torch

    tokens = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens


def calibrated_model(state: dict, overrides: dict, calib_rows, pad: int, batch: int = 16):
    """The checkpoint ``state`` (``check_fairseq_checkpoint``) rebuilt with model-config ``overrides`` (e.g. I-BERT
    ``quant_mode symmetric``), dropout off; a symmetric-mode model has its activation ranges and LayerNorm shifts
    calibrated by forwards in training mode on ``calib_rows`` (no weight update). Returns it in eval mode."""
    import torch

    from ibert_plugin.wiring.checkpoint import build_model_for_state

    mc = copy.deepcopy(state["cfg"]["model"] if state.get("cfg") is not None else state["args"])
    for k, v in overrides.items():
        setattr(mc, k, v)
    sd = state["model"]
    model = build_model_for_state(mc, {k: list(v.shape) for k, v in sd.items()})
    model.load_state_dict(sd, strict=False)  # quantization buffers start at their initial values
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if overrides.get("quant_mode") == "symmetric":
        model.train()
        with torch.no_grad():
            for b0 in range(0, len(calib_rows), batch):
                model(_padded(calib_rows[b0:b0 + batch], pad), features_only=True)
    return model.eval()


def peer_logits(run, head, pad: int):
    """Span logits of a peer ``run(tokens) -> hidden states [B, T, D]`` (torch, numpy or an OpenVINO result) through
    the FP model's float span head."""
    import numpy as np
    import torch

    from ibert_plugin.squad.head import span_logits
    from peers import hidden_states

    @torch.no_grad()
    def fn(tokens):
        out = hidden_states(run(tokens))
        hidden = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))
        return span_logits(head, hidden.float(), tokens.eq(pad))

    return fn


def run_peers(a, fp_ckpt: Path, out: Path, names, fresh: bool, log=print) -> dict:
    """Score the post-training rows ``names`` (of ``PEER_ROWS`` and ``w8a8_ptq``) of the FP checkpoint like a recipe
    stage (``recipe.score_model``: selection file, then the report files). Rows scored before are reused unless
    ``fresh``; a peer that cannot be built is returned as ``{"available": False, "error": ...}``."""
    import torch

    from ibert_plugin.squad.evaluate import model_logits
    from ibert_plugin.wiring.checkpoint_file import check_fairseq_checkpoint

    todo = [n for n in names if fresh or not (out / n / "eval.json").is_file()]
    recs = {n: json.loads((out / n / "eval.json").read_text()) for n in names if n not in todo}
    if not todo:
        return recs
    from integer_engine import FloatEncoder
    from peers import build_peers

    tok, d = recipe.tokenizer(a)
    state = check_fairseq_checkpoint(str(fp_ckpt))
    fp_model = calibrated_model(state, {}, [], d.pad())
    head = fp_model.classification_heads["squad_span"]
    calib = calibration_windows(a.train_path, tok, CALIB_WINDOWS, a.max_seq_length, a.doc_stride, a.max_query_length)
    wanted = [PEER_ROWS[n] for n in todo if n in PEER_ROWS]
    built = {}
    if wanted:
        enc = FloatEncoder(fp_model)
        built = build_peers(enc, calib, _padded(calib[:8], d.pad()), torch.get_num_threads(), only=wanted, log=log)
    for name in todo:
        t0 = time.time()
        if name == "w8a8_ptq":
            model = calibrated_model(state, {"quant_mode": "symmetric", "weight_bits": 8}, calib, d.pad())
            fn, info = model_logits(model, d.pad()), {"route": f"I-BERT W8A8 (--quant-mode symmetric), activation "
                                                              f"ranges from {len(calib)} training windows, no QAT"}
        else:
            peer = built[PEER_ROWS[name]]
            info = peer.describe()
            if peer.run is None:
                recs[name] = {"available": False, "error": peer.error, **info}
                log(f"[squad_accuracy] {name}: unavailable ({peer.error})")
                continue
            fn = peer_logits(peer.run, head, d.pad())
        (out / name).mkdir(parents=True, exist_ok=True)
        recs[name] = recipe.score_model(a, fn, tok, out / name, {"available": True, "calib_windows": len(calib),
                                                                 "checkpoint": str(fp_ckpt), **info,
                                                                 "seconds": None})
        recs[name]["seconds"] = round(time.time() - t0, 1)
        (out / name / "eval.json").write_text(json.dumps(recs[name], indent=1) + "\n")
    return recs


def engine_speed(a, runs: Path, batch_sizes, reps: int, threads: int, log=print) -> dict:
    """Deliverable 5: the integer engine's encoder on real SQuAD windows of the report file (file order, each batch
    padded to the schedule's ``max_seq_length``) against FP32 PyTorch (``integer_engine.FloatEncoder`` of the FP
    checkpoint) and the int8 peers of that checkpoint, interleaved (``integer_engine.time_contenders``); seconds per
    pass over the batches, median [min, max]; ``bit_exact``: the engine's span logits equal its QAT model's on every
    timed batch."""
    import torch

    from ibert_plugin.squad.data import read_squad
    from ibert_plugin.squad.evaluate import build_engine, engine_logits, model_logits
    from ibert_plugin.squad.features import build_features
    from ibert_plugin.wiring.checkpoint_file import check_fairseq_checkpoint
    from integer_engine import FloatEncoder, time_contenders
    from peers import INT8_PEERS, build_peers

    torch.set_num_threads(threads)
    tok, d = recipe.tokenizer(a)
    feats = build_features(read_squad(a.reports["test"], version_2=a.version_2_with_negative), tok, a.max_seq_length,
                           a.doc_stride, a.max_query_length)
    fp_model = calibrated_model(check_fairseq_checkpoint(str(runs / "fp" / "checkpoint_best.pt")), {}, [], d.pad())
    fp32 = FloatEncoder(fp_model)
    calib = calibration_windows(a.train_path, tok, CALIB_WINDOWS, a.max_seq_length, a.doc_stride, a.max_query_length)
    peers = build_peers(fp32, calib, _padded(calib[:8], d.pad()), threads, only=list(INT8_PEERS), log=log)
    out = {"threads": threads, "reps": reps, "window": a.max_seq_length, "cases": {}}
    for row, stage in (("int8_qat_engine", "ibert"), ("int_ternary_engine", "int_ternary")):
        ckpt = runs / STAGE_DIRS[stage] / "checkpoint_best.pt"
        if not ckpt.is_file():
            continue
        qat = recipe.load_model(ckpt, len(d))
        eng = build_engine(qat, threads=threads)
        for b in batch_sizes:
            batches = []
            for b0 in range(0, min(len(feats), 4 * b), b):
                rows = [torch.from_numpy(f.tokens).long() for f in feats[b0:b0 + b]]
                t = torch.full((len(rows), a.max_seq_length), d.pad(), dtype=torch.long)
                for i, r in enumerate(rows):
                    t[i, :len(r)] = r
                batches.append(t)
            exact = all(torch.equal(x, y) for t in batches for x, y in
                        zip(engine_logits(eng, d.pad())(t), model_logits(qat, d.pad())(t)))
            contenders = {"engine": lambda t: eng.encode(t), "fp32_pytorch": fp32}
            contenders.update({n: p.run for n, p in peers.items() if p.run is not None})
            times = time_contenders(contenders, batches, reps)
            stats = {n: {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}
                     for n, v in times.items()}
            e = statistics.median(times["engine"])
            case = {"batch": b, "batches": len(batches), "bit_exact": exact, "seconds": stats,
                    "speedup_vs": {n: round(statistics.median(v) / e, 2) for n, v in times.items() if n != "engine"}}
            out["cases"][f"{row}_b{b}"] = case
            log(f"[squad_accuracy] {row} batch {b}: engine {e:.3f} s, bit_exact {exact}, speed-up "
                + ", ".join(f"{n} {x:.2f}x" for n, x in case["speedup_vs"].items()))
    out["unavailable_peers"] = {n: p.error for n, p in peers.items() if p.run is None}
    return out


def _row(rec: dict, report: str) -> dict:
    sub = rec[report]
    row = {"exact": round(sub["exact"], 2), "f1": round(sub["f1"], 2), "questions": sub["total"],
           "select_f1": round(rec["f1"], 2)}
    for m in ("HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "null_score_diff_threshold"):
        if m in sub:
            row[m] = round(sub[m], 2)
    return row


ROW_LABELS = {"fp32": "FP32", "ort_int8_dynamic": "ONNX Runtime dynamic int8 (post-training)",
              "torch_int8_dynamic": "torch dynamic int8 (post-training)", "ov_int8": "OpenVINO int8 (post-training)",
              "w8a8_ptq": "this plugin's W8A8, no QAT (post-training)", "int8_qat": "I-BERT INT8 QAT",
              "int8_qat_engine": "I-BERT INT8, integer engine", "w2a8_twn": "TernaryBERT W2A8 (TWN, distilled)",
              "int_ternary": "integer-only ternary", "int_ternary_engine": "integer-only ternary, integer engine"}


def markdown_table(result: dict) -> str:
    """The result JSON as the markdown table of ``docs/results.md`` / the README: one line per row (EM, F1, the F1 gap
    to FP with its paired bootstrap interval; SQUAD2 also HasAns / NoAns F1 and the disfluent report), then the rows
    not measured (pending stages, unavailable peers)."""
    v2 = result.get("version") == "2.0"
    head = ["row", "EM", "F1", "F1 gap to FP [95% CI]"] + (["HasAns F1", "NoAns F1", "disfluent F1"] if v2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, r in result["rows"].items():
        gap = (f"{r['gap_f1']:+.2f} [{r['gap_f1_ci95'][0]:+.2f}, {r['gap_f1_ci95'][1]:+.2f}]"
               + (" (noise)" if r.get("gap_f1_is_noise") else "")) if "gap_f1" in r else ""
        if "same_predictions_as_qat" in r:
            gap += f"; same predictions as its QAT model: {r['same_predictions_as_qat']} of {r['questions']}"
        cells = [ROW_LABELS.get(row, row), f"{r['exact']:.2f}", f"{r['f1']:.2f}", gap]
        if v2:
            dis = r.get("test_disfluent", {})
            cells += [f"{r.get('HasAns_f1', float('nan')):.2f}", f"{r.get('NoAns_f1', float('nan')):.2f}",
                      f"{dis['f1']:.2f}" if "f1" in dis else ""]
        lines.append("| " + " | ".join(cells) + " |")
    for row in result.get("pending", []):
        lines.append("| " + " | ".join([ROW_LABELS.get(row, row), "pending", "", ""] + [""] * (3 if v2 else 0)) + " |")
    for row, err in result.get("unavailable", {}).items():
        lines.append("| " + " | ".join([ROW_LABELS.get(row, row), "unavailable", "", str(err).replace("|", "/")]
                                        + [""] * (3 if v2 else 0)) + " |")
    return "\n".join(lines)


def write_result(*, args, argv, a, out: Path, results: Path, data: Path, caps, v2: bool, name: str, argv_recipe,
                 peer_recs: dict, t0: float) -> dict:
    """Build ``result.json`` from the recipe's ``summary.json`` and the peers' records, copy each row's predictions
    into ``results/predictions``, print the table and write the JSON. Rows whose stage has not finished are listed
    under ``pending`` and ``complete`` is false: a partial result says so, it never passes for a whole one."""
    summary = json.loads((out / "runs" / "summary.json").read_text())
    st = summary["stages"]
    recs = {row: st[stage] for row, stage in STAGE_ROWS.items() if stage in st}
    pdirs = {row: out / "runs" / STAGE_DIRS[stage] for row, stage in STAGE_ROWS.items()}
    for row, rec in peer_recs.items():
        recs[row] = rec
        pdirs[row] = out / "peers" / row
    rows = [r for r in ROWS if r in recs]
    pending = [r for r in ROWS if r not in recs and (r in STAGE_ROWS or r in peer_recs)]
    results.mkdir(parents=True, exist_ok=True)
    (results / "predictions").mkdir(exist_ok=True)
    result = {"benchmark": "squad_accuracy", "task": args.task, "version": "2.0" if v2 else "1.1",
              "schedule": name, "complete": not pending, "pending": pending,
              "model": "all-MiniLM-L6-v2 (data/minilm)" if args.arch == "minilm" else args.arch,
              "command": shlex.join(["python", "benchmarks/squad_accuracy.py", *(argv or sys.argv[1:])]),
              "update_caps": caps, "recipe_argv": argv_recipe,
              "windows": {"max_seq_length": a.max_seq_length, "doc_stride": a.doc_stride,
                          "batch": a.per_gpu_batch_size},
              "data": {}, "fp_convergence": summary.get("fp_convergence"),
              "fp_selection_curve": st["fp"].get("selection_curve"),
              "train_seconds": {s: st[s].get("train_seconds") for s in ("fp", "ternary", "int_ternary", "ibert")
                                if s in st},
              "rows": {}, "unavailable": {}}
    files = {"train": a.train_path, "select": a.dev_path, **a.reports}
    meta = data / args.task / "meta.json"
    meta_files = json.loads(meta.read_text()).get("files", {}) if meta.is_file() else {}
    for role, path in files.items():
        result["data"][role] = {"file": f"{args.task}/{path.name}" if path.parent == (data / args.task).resolve()
                                else str(path), "sha256": sha256(path),
                                "source": meta_files.get(path.name, {}).get("source")}
    reports = list(a.reports)
    f1q = {}
    for row in rows:
        rec = recs[row]
        if rec.get("available") is False:
            result["unavailable"][row] = rec.get("error")
            continue
        r = {rep: _row(rec, rep) for rep in reports}
        r.update(r.pop("test"))
        for extra in ("route", "library", "version", "calib_windows"):
            if extra in rec:
                r[extra] = rec[extra]
        for rep in reports:
            src = pdirs[row] / f"{rep}_predictions.json"
            suffix = "" if rep == "test" else "_" + rep.removeprefix("test_")
            (results / "predictions" / f"{row}{suffix}.json").write_bytes(src.read_bytes())
        if row in ENGINE_OF:
            r["same_predictions_as_qat"] = rec["test"]["same_predictions_as_qat"]
            r["bit_exact_predictions"] = rec["test"]["same_predictions_as_qat"] == rec["test"]["questions"]
        f1q[row] = per_question_f1(a.reports["test"], pdirs[row] / "test_predictions.json", v2)
        result["rows"][row] = r
    for row in result["rows"]:
        if row == "fp32":
            continue
        gap = paired_bootstrap_scores(f1q["fp32"], f1q[row])
        result["rows"][row].update(gap_f1=round(result["rows"][row]["f1"] - result["rows"]["fp32"]["f1"], 2),
                                   gap_f1_ci95=[round(gap.low, 2), round(gap.high, 2)],
                                   gap_f1_is_noise=not gap.significant)
    result["bootstrap"] = {"resamples": DEFAULT_RESAMPLES, "seed": DEFAULT_SEED, "level": 0.95,
                           "unit": "per-question F1 (points), paired over the report questions"}
    peers_f1 = {b: max([result["rows"][p]["f1"] for p in result["rows"] if p in PEER_ROWS or p == "w8a8_ptq"
                        if BITS[p] == b] or [None], key=lambda x: -1 if x is None else x) for b in (8, 2)}
    result["targets"] = {row: {"max_gap_f1": t,
                               "met": result["rows"][row]["gap_f1"] >= -t if row in result["rows"] else None,
                               "best_post_training_peer_f1": peers_f1[BITS[row]],
                               "at_or_above_best_peer": None if peers_f1[BITS[row]] is None or row not in
                               result["rows"] else result["rows"][row]["f1"] >= peers_f1[BITS[row]]}
                         for row, t in TARGETS.items()}
    result["wall_seconds"] = round(time.time() - t0, 1)
    (results / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    head = "  HasAns F1  NoAns F1" if v2 else ""
    print(f"{'row':<20} {'EM':>6} {'F1':>6}{head}  {'gap F1 [95% CI]':>22}   ({result['data']['test']['file']}, "
          f"{result['rows']['fp32']['questions']} q)")
    for row, r in result["rows"].items():
        extra = f"  {r.get('HasAns_f1', float('nan')):9.2f} {r.get('NoAns_f1', float('nan')):9.2f}" if v2 else ""
        gap = f"{r['gap_f1']:+.2f} [{r['gap_f1_ci95'][0]:+.2f}, {r['gap_f1_ci95'][1]:+.2f}]" if "gap_f1" in r else ""
        print(f"{row:<20} {r['exact']:6.2f} {r['f1']:6.2f}{extra}  {gap:>22}")
    for row, err in result["unavailable"].items():
        print(f"{row:<20} unavailable: {err}")
    if pending:
        print(f"{'pending':<20} {', '.join(pending)} (stages not finished: a relaunch of the same command resumes)")
    print(f"[squad_accuracy] wrote {results / 'result.json'} ({'complete' if not pending else 'PARTIAL'}) and "
          f"{len(result['rows'])} predictions files", flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smoke schedule: checks the pipeline, not the accuracy")
    g.add_argument("--full", action="store_true", help="GPU schedule on the whole report set")
    ap.add_argument("--task", choices=("SQUAD1", "SQUAD2"), default="SQUAD1")
    ap.add_argument("--table", metavar="RESULT_JSON", default=None,
                    help="print the markdown table of a result.json (docs/results.md, README) and exit")
    ap.add_argument("--data-dir", default=str(REPO / "data" / "squad"), help="folder holding the task folders")
    ap.add_argument("--arch", default="minilm", help="recipe --arch (tests: tiny)")
    ap.add_argument("--output-dir", default=None, help="stage folders (default outputs/bench_squad_<task>_<schedule>)")
    ap.add_argument("--results-dir", default=None,
                    help="result JSON and predictions (default docs/results/squad/<TASK>; --quick: "
                         "<output-dir>/results)")
    ap.add_argument("--peers", default=",".join(list(PEER_ROWS) + ["w8a8_ptq"]),
                    help="post-training rows, comma-separated, or 'none'")
    ap.add_argument("--max-updates", default=None, help="override the schedule's update caps (recipe syntax)")
    ap.add_argument("--fresh", action="store_true", help="retrain every stage and rebuild every peer")
    ap.add_argument("--rescore", action="store_true", help="score the existing checkpoints again, no training")
    ap.add_argument("--engine-speed", action="store_true",
                    help="also time the engine on the report file's windows vs FP32 PyTorch and the int8 peers "
                         "(batch --engine-batches, bit-exact check), into result.json 'engine_speed'")
    ap.add_argument("--engine-batches", default="8,32", help="batch sizes of --engine-speed")
    ap.add_argument("--threads", type=int, default=2, help="threads of --engine-speed's contenders")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of --engine-speed")
    ap.add_argument("--recipe-arg", action="append", default=[],
                    help="extra recipe flag (repeatable, e.g. --recipe-arg=--tokenizer_dir=DIR)")
    args = ap.parse_args(argv)
    if args.table:
        try:
            print(markdown_table(json.loads(Path(args.table).read_text())))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --table {args.table}: not a readable squad_accuracy result ({type(e).__name__}: {e})",
                  file=sys.stderr)
            return 2
        return 0
    name = "quick" if args.quick else "full" if args.full else "cpu"
    sched = SCHEDULES[name]
    v2 = args.task == "SQUAD2"
    caps, flags = (sched[k][args.task] if isinstance(sched[k], dict) else sched[k] for k in ("caps", "flags"))
    caps = args.max_updates or caps
    peers = [] if args.peers == "none" else [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEER_ROWS and p != "w8a8_ptq"]
    if bad:
        print(f"error: --peers: unknown {', '.join(bad)}; choose from {', '.join(PEER_ROWS)}, w8a8_ptq",
              file=sys.stderr)
        return 2
    data = Path(args.data_dir)
    if not (data / args.task / "train.json").is_file():
        print(f"error: {data / args.task} has no train.json; build it with: python -m ibert_plugin.assets build "
              "--only squad --squad-dir DIR", file=sys.stderr)
        return 2
    out = Path(args.output_dir or REPO / "outputs" / f"bench_squad_{args.task}_{name}").resolve()
    results = Path(args.results_dir or (out / "results" if args.quick else REPO / "docs" / "results" / "squad" /
                                        args.task)).resolve()
    t0 = time.time()
    stages = "fp,ternary,int_ternary,int_ternary_engine,ibert,engine"
    argv_recipe = ["--task", args.task, "--arch", args.arch, "--stages", stages, "--data_dir", str(data),
                   "--output_dir", str(out / "runs"), "--pred_distill", "--intermediate_distill",
                   "--weight_bits", "2", "--input_bits", "8", "--weight_quant_method", "twn", *flags,
                   *args.recipe_arg]
    if caps:
        argv_recipe += ["--max_updates", caps]
    if v2:  # the no-answer threshold is chosen on the selection set and applied to the report files
        argv_recipe += ["--null_score_diff_threshold", "select"]
    if args.fresh:
        argv_recipe.append("--fresh")
    if args.rescore:
        argv_recipe.append("--rescore")
    try:  # before hours of training: the report file must be there
        a = recipe.parse_args([x for x in argv_recipe if x not in ("--fresh", "--rescore")])
    except recipe.RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "test" not in a.reports:
        names = ", ".join(f for pair in recipe.REPORT_FILES[args.task].values() for f in pair)
        print(f"error: {data / args.task} has no report file ({names})", file=sys.stderr)
        return 2
    # FP first, then the post-training peers of its checkpoint, then the quantized stages: the FP and peer rows
    # (result.json with "complete": false) exist after the first ~2 hours of a CPU run, not only after all four.
    first = list(argv_recipe)
    first[first.index("--stages") + 1] = "fp"
    rc = recipe.run_squad(first)
    if rc != 0:
        return rc
    peer_recs = run_peers(a, out / "runs" / "fp" / "checkpoint_best.pt", out / "peers", peers,
                          args.fresh or args.rescore)
    ctx = dict(args=args, argv=argv, a=a, out=out, results=results, data=data, caps=caps, v2=v2, name=name,
               argv_recipe=argv_recipe, peer_recs=peer_recs, t0=t0)
    write_result(**ctx)
    rest = list(argv_recipe)
    rest[rest.index("--stages") + 1] = ",".join(x for x in stages.split(",") if x != "fp")
    rc = recipe.run_squad(rest)
    if rc != 0:
        return rc
    result = write_result(**ctx)
    if args.engine_speed:
        result["engine_speed"] = engine_speed(a, out / "runs", [int(b) for b in args.engine_batches.split(",")],
                                              args.reps, args.threads)
        from integer_engine import _cpu_name

        result["engine_speed"]["cpu"] = _cpu_name()
    result["wall_seconds"] = round(time.time() - t0, 1)
    (results / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
