"""End-to-end SQuAD stages through ``fairseq-train --user-dir ibert_plugin --task squad`` (tiny arch, 4 updates):
FP finetuning, TernaryBERT W2A8 distillation with packed export, I-BERT QAT, the integer engine (WordPiece), and
v2.0 with GPT-2 BPE."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from squad_data import synthetic_squad

pytestmark = pytest.mark.slow  # end-to-end SQuAD training stages: left out by `make test-fast`

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "tiny", "--tokenizer_dir", str(REPO / "data" / "minilm"), "--max_updates", "4", "--eval_step", "2",
        "--max_seq_length", "48", "--doc_stride", "16", "--per_gpu_batch_size", "8", "--learning_rate", "1e-3",
        "--cpu"]


def _recipe(args, timeout=400):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ibert_plugin.squad", *args], capture_output=True, text=True,
                          env=env, cwd=str(REPO), timeout=timeout)


def _valid_f1s(log: str):
    return [float(m) for m in re.findall(r"valid on 'valid' subset .*?\| f1 ([0-9.]+)", log)]


@pytest.fixture(scope="module")
def squad1(tmp_path_factory):
    root = tmp_path_factory.mktemp("squad")
    synthetic_squad(root / "SQUAD1" / "train.json", 6, 3, 4, seed=0)
    synthetic_squad(root / "SQUAD1" / "dev.json", 2, 2, 4, seed=1)
    out = root / "out"
    p = _recipe(["--task", "SQUAD1", "--data_dir", str(root), "--output_dir", str(out), *TINY,
                 "--pred_distill", "--intermediate_distill", "--save_quantized_model"])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return root, out, p


def test_every_stage_scores_the_whole_dev_set(squad1):
    root, out, p = squad1
    dev_ids = {q["id"] for a in json.loads((root / "SQUAD1" / "dev.json").read_text())["data"]
               for para in a["paragraphs"] for q in para["qas"]}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"fp", "ternary", "ibert", "export", "engine"}
    for stage, rec in summary["stages"].items():
        d = Path(rec.get("checkpoint") or rec.get("packed_model")).parent
        preds = json.loads((d / "predictions.json").read_text())
        assert set(preds) == dev_ids and all(isinstance(v, str) for v in preds.values()), stage
        assert rec["total"] == len(dev_ids) and 0.0 <= rec["f1"] <= 100.0
    assert json.loads(p.stdout.strip().splitlines()[-1]).keys() == summary["stages"].keys()


def test_validation_selects_on_whole_dev_f1(squad1):
    _, out, _ = squad1
    log = (out / "fp" / "train.log").read_text()
    f1s = _valid_f1s(log)
    assert len(f1s) >= 2 and "best_f1" in log and "--task squad" in log and "--user-dir" in log
    assert "[squad] memory allocator: " in log
    # the task's in-training metric and the offline evaluation of checkpoint_best.pt agree
    assert json.loads((out / "fp" / "eval.json").read_text())["f1"] == pytest.approx(max(f1s), abs=0.006)


def test_ternary_distillation_and_packed_export(squad1):
    _, out, _ = squad1
    tdir = out / "ternary_w2a8_twn"
    log = (tdir / "train.log").read_text()
    assert "--criterion squad_span_distill" in log and "--quant-mode ternarybert" in log
    for key in ("pred_loss", "att_loss", "rep_loss"):
        assert re.search(rf"\| {key} [0-9.]+", log), key
    assert not list(tdir.glob("checkpoint*.pt"))         # --save_quantized_model without --save_fp_model
    packed = out / "export" / "model_packed.pt"
    assert packed.is_file()
    exp = json.loads((out / "export" / "eval.json").read_text())
    assert exp["packed_bytes"] < exp["checkpoint_bytes"] / 10
    # the packed file answers exactly like the trained ternary checkpoint
    assert (out / "export" / "predictions.json").read_text() == (tdir / "predictions.json").read_text()


def test_engine_logits_equal_qat_logits(squad1):
    root, out, _ = squad1
    rec = json.loads((out / "engine" / "eval.json").read_text())
    assert rec["same_predictions_as_qat"] == rec["questions"]
    ib = json.loads((out / "ibert_w8" / "eval.json").read_text())
    assert (rec["exact"], rec["f1"]) == (ib["exact"], ib["f1"])
    from ibert_plugin.squad.evaluate import build_engine, engine_logits, model_logits
    from ibert_plugin.wiring.checkpoint import load_checkpoint_model

    model, _ = load_checkpoint_model(str(out / "ibert_w8" / "checkpoint_best.pt"))
    assert model.quant_config.quant_mode == "symmetric"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 200, (3, 40), generator=g)
    tokens[:, 0], tokens[:, -1], tokens[2, 30:] = 0, 2, 1  # <s> ... </s>, last row padded
    qs, qe = model_logits(model, 1)(tokens)
    es, ee = engine_logits(build_engine(model, threads=1), 1)(tokens)
    assert torch.equal(qs, es) and torch.equal(qe, ee)


def test_ibert_qat_distilled_from_the_fp_model(squad1, tmp_path):
    root, out, _ = squad1
    p = _recipe(["--task", "SQUAD1", "--data_dir", str(root), "--output_dir", str(tmp_path), *TINY,
                 "--quant_mode", "symmetric", "--restore_file", str(out / "fp" / "checkpoint_best.pt"),
                 "--ibert_distill", "all", "--pred_distill_weight", "16"])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    log = (tmp_path / "ibert_w8" / "train.log").read_text()
    assert "--criterion squad_span_distill" in log and "--quant-mode symmetric" in log
    for key in ("pred_loss", "att_loss", "rep_loss"):   # the integer model's states and scores are distilled too
        assert re.search(rf"\| {key} [0-9.]+", log), key
    rec = json.loads((tmp_path / "engine" / "eval.json").read_text())
    assert rec["same_predictions_as_qat"] == rec["questions"] > 0


def test_squad2_reports_hasans_noans(tmp_path):
    synthetic_squad(tmp_path / "SQUAD2" / "train.json", 4, 3, 4, seed=0, version_2=True)
    synthetic_squad(tmp_path / "SQUAD2" / "dev.json", 2, 2, 4, seed=1, version_2=True)
    # GPT-2 BPE (a RoBERTa dictionary) here, WordPiece in the v1.1 run
    p = _recipe(["--task", "SQUAD2", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                 "--stages", "fp", *TINY, "--tokenizer_dir", str(REPO / "data" / "gpt2_bpe")])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rec = json.loads((tmp_path / "out" / "fp" / "eval.json").read_text())
    assert rec["HasAns_total"] > 0 and rec["NoAns_total"] > 0
    assert rec["HasAns_total"] + rec["NoAns_total"] == rec["total"]
    assert {"HasAns_f1", "NoAns_f1", "HasAns_exact", "NoAns_exact"} <= set(rec)
    log = (tmp_path / "out" / "fp" / "train.log").read_text()
    assert "--version-2-with-negative" in log and "| NoAns_f1 " in log and "data/gpt2_bpe" in log
    assert (tmp_path / "out" / "fp" / "null_odds.json").is_file()
    # --rescore: the same checkpoint scored again, no training; "select" takes the dev file's F1-best threshold
    # (never worse on dev than the fixed 0, which is one of the partitions it sweeps) and applies it to the test file
    log_size = (tmp_path / "out" / "fp" / "train.log").stat().st_size
    p = _recipe(["--task", "SQUAD2", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                 "--stages", "fp", *TINY, "--tokenizer_dir", str(REPO / "data" / "gpt2_bpe"), "--rescore",
                 "--null_score_diff_threshold", "select", "--test_file", str(tmp_path / "SQUAD2" / "train.json")])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert (tmp_path / "out" / "fp" / "train.log").stat().st_size == log_size
    new = json.loads((tmp_path / "out" / "fp" / "eval.json").read_text())
    assert new["f1"] >= rec["f1"] and rec["null_score_diff_threshold"] == 0.0
    thr = new["null_score_diff_threshold"]
    assert new["test"]["null_score_diff_threshold"] == thr and new["train_seconds"] == rec["train_seconds"]
    preds = json.loads((tmp_path / "out" / "fp" / "test_predictions.json").read_text())
    odds = json.loads((tmp_path / "out" / "fp" / "test_null_odds.json").read_text())
    assert set(preds) == set(odds) and all(preds[q] == "" for q in preds if odds[q] > thr)
