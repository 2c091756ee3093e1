"""SQuAD v1.1 accuracy: MiniLM FP vs TernaryBERT W2A8 (TWN) vs I-BERT INT8 (QAT and integer engine), one run.

Data (``python -m ibert_plugin.assets build --only squad``): training on ``SQUAD1/train.json`` (SQuADShifts
new_wiki + nyt) minus its last articles, which form the checkpoint-selection set (``--select-questions``, whole
NYT articles from the end of the file); the reported numbers are on the **official SQuAD v1.1 dev set**, a fixed
subset of its articles by index in file order (``--dev-articles``, default ``1,2`` = Warsaw + Normans, 359
questions; ``all`` = the whole dev set, 10,565 questions). Model: all-MiniLM-L6-v2 imported to fairseq
(``data/minilm``), windows of 384 tokens, stride 128, query 64, n-best 20, answers up to 30 tokens. Stages run through
``python -m ibert_plugin.squad`` (finished stages are reused; ``--fresh`` redoes them).

CPU schedule (default, about an hour on 2 cores; the update caps are the budget): FP finetuning 120 updates x 16
windows (lr 1e-4; ~10 % of an epoch), TernaryBERT TWN W2A8 with prediction + intermediate distillation 60 updates
(lr 5e-5), I-BERT QAT 16 updates (lr 1e-6), then the integer engine on the INT8 checkpoint. Cost per training window
measured on the loaded 2-core host in the ``--quick`` run: FP 1.8 s, W2A8 4.5 s, I-BERT QAT 6 s (load ~9; a quiet
host is ~4x faster), which sets these caps. ``--quick`` is a smoke run (tiny schedule,
1 dev article: 21 min on the host at load ~10, a few minutes on a quiet one) that checks the pipeline, not the
accuracy.

Full schedule on a GPU (whole train set, whole official dev set, TernaryBERT's epochs)::

    python benchmarks/squad_accuracy.py --full

Prints progress, then ONE JSON object as the last line: EM/F1 per precision, F1 gaps to FP with a paired bootstrap
95 % interval over questions, and whether the targets (W2A8 within 2.0 F1, INT8 within 1.0 F1) are met.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ibert_plugin.squad import recipe  # noqa: E402
from ibert_plugin.squad.metrics import f1_v1  # noqa: E402

TARGETS = {"w2a8": 2.0, "int8": 1.0}
SCHEDULES = {
    # name: (fp, ternary, ibert) update caps, batch, eval batch, extra recipe flags
    "cpu": dict(caps="fp=120,ternary=60,ibert=16", bs=16, flags=["--learning_rate", "1e-4",
                                                                  "--ternary_learning_rate", "5e-5"]),
    "quick": dict(caps="fp=6,ternary=3,ibert=2", bs=8, flags=["--learning_rate", "1e-4"]),
    "full": dict(caps=None, bs=32, flags=["--num_train_epochs", "2", "--ternary_epochs", "3", "--ibert_epochs", "1",
                                          "--eval_step", "1000"]),
}


def write_subsets(data: Path, out: Path, dev_articles: str, select_questions: int):
    """``train.json`` / ``select.json`` (SQuADShifts, disjoint articles) and ``test.json`` (official dev subset)."""
    train = json.loads((data / "SQUAD1" / "train.json").read_text())
    dev = json.loads((data / "SQUAD1" / "dev.json").read_text())
    arts, n_sel = train["data"], 0
    k = len(arts)
    while n_sel < select_questions and k > 1:
        k -= 1
        n_sel += sum(len(p["qas"]) for p in arts[k]["paragraphs"])
    if dev_articles == "all":
        idx = list(range(len(dev["data"])))
    else:
        try:
            idx = [int(i) for i in dev_articles.split(",")]
        except ValueError:
            raise SystemExit(f"error: --dev-articles {dev_articles!r}: expected 'all' or indices like 1,2") from None
        if any(not 0 <= i < len(dev["data"]) for i in idx):
            raise SystemExit(f"error: --dev-articles: indices must be in 0..{len(dev['data']) - 1}")
    out.mkdir(parents=True, exist_ok=True)
    files = {"train.json": arts[:k], "select.json": arts[k:], "test.json": [dev["data"][i] for i in idx]}
    info = {}
    for name, articles in files.items():
        doc = {"version": "1.1", "canary": train.get("canary", ""), "data": articles}
        (out / name).write_text(json.dumps(doc, ensure_ascii=False))
        info[name] = {"articles": len(articles), "questions": sum(len(p["qas"]) for a in articles
                                                                  for p in a["paragraphs"])}
    info["test.json"]["source"] = "official SQuAD v1.1 dev, articles " + (
        "all" if dev_articles == "all" else ", ".join(f"{i} ({dev['data'][i]['title']})" for i in idx))
    return info


def per_question_f1(test_file: Path, predictions: Path):
    gold = {q["id"]: [a["text"] for a in q["answers"]] for a in json.loads(test_file.read_text())["data"]
            for p in a["paragraphs"] for q in p["qas"]}
    pred = json.loads(predictions.read_text())
    return [100.0 * max(f1_v1(pred.get(qid, ""), g) for g in golds) for qid, golds in gold.items()]


def paired_bootstrap(a, b, reps: int = 2000, seed: int = 0):
    """95 % interval of mean(b - a) over questions resampled with replacement."""
    rng = random.Random(seed)
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    return [round(means[int(0.025 * reps)], 2), round(means[int(0.975 * reps) - 1], 2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smoke schedule (a few minutes), 1 dev article")
    g.add_argument("--full", action="store_true", help="full schedule on the whole dev set (for a GPU)")
    ap.add_argument("--dev-articles", default=None,
                    help="official dev article indices (default 1,2; quick 2; full all)")
    ap.add_argument("--select-questions", type=int, default=None, help="selection-set size (default 100; quick 40)")
    ap.add_argument("--data-dir", default=str(REPO / "data" / "squad"))
    ap.add_argument("--output-dir", default=None, help="default outputs/bench_squad_<schedule>")
    ap.add_argument("--fresh", action="store_true", help="retrain every stage")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "full" if args.full else "cpu"
    sched = SCHEDULES[name]
    dev_articles = args.dev_articles or {"quick": "2", "full": "all"}.get(name, "1,2")
    select_q = args.select_questions or (40 if args.quick else 100)
    out = Path(args.output_dir or REPO / "outputs" / f"bench_squad_{name}").resolve()
    data = Path(args.data_dir)
    if not (data / "SQUAD1" / "dev.json").is_file():
        print(f"error: {data}/SQUAD1 not found; build it with: python -m ibert_plugin.assets build --only squad",
              file=sys.stderr)
        return 2
    t0 = time.time()
    info = write_subsets(data, out / "data", dev_articles, select_q)
    argv_recipe = ["--task", "SQUAD1", "--arch", "minilm", "--stages", "fp,ternary,ibert,engine",
                   "--train_file", str(out / "data" / "train.json"), "--dev_file", str(out / "data" / "select.json"),
                   "--test_file", str(out / "data" / "test.json"), "--output_dir", str(out / "runs"),
                   "--per_gpu_batch_size", str(sched["bs"]), "--pred_distill", "--intermediate_distill",
                   "--weight_bits", "2", "--input_bits", "8", "--weight_quant_method", "twn", *sched["flags"]]
    if sched["caps"]:
        argv_recipe += ["--max_updates", sched["caps"]]
    if args.fresh:
        argv_recipe.append("--fresh")
    rc = recipe.run_squad(argv_recipe)
    if rc != 0:
        return rc
    summary = json.loads((out / "runs" / "summary.json").read_text())
    st = summary["stages"]
    test = out / "data" / "test.json"
    rows = {"fp": st["fp"], "w2a8_twn": st["ternary"], "int8": st["ibert"], "int8_engine": st["engine"]}
    dirs = {"fp": "fp", "w2a8_twn": "ternary_w2a8_twn", "int8": "ibert_w8", "int8_engine": "engine"}
    f1q = {k: per_question_f1(test, out / "runs" / d / "test_predictions.json") for k, d in dirs.items()}
    result = {"benchmark": "squad_accuracy", "schedule": name, "model": "all-MiniLM-L6-v2 (data/minilm)",
              "train": info["train.json"], "select": info["select.json"], "test": info["test.json"],
              "update_caps": sched["caps"], "batch": sched["bs"]}
    for k, rec in rows.items():
        result[k] = {"exact": round(rec["test"]["exact"], 2), "f1": round(rec["test"]["f1"], 2),
                     "select_f1": round(rec["f1"], 2)}
    result["int8_engine"]["same_predictions_as_qat"] = st["engine"]["test"]["same_predictions_as_qat"]
    gaps = {"w2a8": result["w2a8_twn"]["f1"] - result["fp"]["f1"], "int8": result["int8"]["f1"] - result["fp"]["f1"]}
    result["gap_f1"] = {k: round(v, 2) for k, v in gaps.items()}
    result["gap_f1_ci95"] = {"w2a8": paired_bootstrap(f1q["fp"], f1q["w2a8_twn"]),
                             "int8": paired_bootstrap(f1q["fp"], f1q["int8"])}
    result["targets_f1_gap"] = TARGETS
    result["met"] = {k: gaps[k] >= -TARGETS[k] for k in TARGETS}
    result["wall_seconds"] = round(time.time() - t0, 1)
    print(f"{'precision':<12} {'EM':>6} {'F1':>6}   ({result['test']['source']}, {result['test']['questions']} q)")
    for k in rows:
        print(f"{k:<12} {result[k]['exact']:6.2f} {result[k]['f1']:6.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
