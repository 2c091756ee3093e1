"""SQuAD recipe: task-folder report files, the half-epoch selection curve and FP convergence verdict, stages that
resume from checkpoint_last.pt, and the integer-only ternary stage with its engine (tiny arch)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ibert_plugin.recipes import squad as recipe
from squad_data import synthetic_squad

pytestmark = pytest.mark.slow  # whole pipelines / subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[1]
TOK = ["--tokenizer_dir", str(REPO / "data" / "minilm")]
TINY = ["--arch", "tiny", *TOK, "--eval_step", "2", "--max_seq_length", "48", "--doc_stride", "16",
        "--per_gpu_batch_size", "8", "--learning_rate", "1e-3", "--cpu"]


def _task_folder(root: Path, task: str = "SQUAD1") -> Path:
    v2 = task == "SQUAD2"
    synthetic_squad(root / task / "train.json", 6, 3, 4, seed=0, version_2=v2)
    synthetic_squad(root / task / "dev.json", 1, 2, 4, seed=1, version_2=v2)
    synthetic_squad(root / task / "test.json", 2, 2, 4, seed=2, version_2=v2)
    if v2:
        synthetic_squad(root / task / "test_disfluent.json", 2, 2, 4, seed=3, version_2=v2)
    else:
        synthetic_squad(root / task / "test_subset.json", 1, 2, 4, seed=2)
    return root


def _recipe(args, timeout=400):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "ibert_plugin.squad", *args], capture_output=True, text=True,
                       env=env, cwd=str(REPO), timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


def test_report_files_default_to_the_task_folder(tmp_path):
    _task_folder(tmp_path, "SQUAD1")
    _task_folder(tmp_path, "SQUAD2")
    a = recipe.parse_args(["--task", "SQUAD1", "--data_dir", str(tmp_path), "--stages", "fp", *TOK])
    assert a.reports == {"test": (tmp_path / "SQUAD1" / "test_subset.json").resolve()}
    a = recipe.parse_args(["--task", "SQUAD1", "--data-dir", str(tmp_path), "--stages", "fp", "--full", *TOK])
    assert a.reports == {"test": (tmp_path / "SQUAD1" / "test.json").resolve()}
    a = recipe.parse_args(["--task", "SQUAD2", "--data_dir", str(tmp_path), "--stages", "fp", *TOK])
    assert a.reports == {"test": (tmp_path / "SQUAD2" / "test.json").resolve(),
                         "test_disfluent": (tmp_path / "SQUAD2" / "test_disfluent.json").resolve()}
    a = recipe.parse_args(["--task", "SQUAD2", "--data_dir", str(tmp_path), "--stages", "fp", "--no-test", *TOK])
    assert a.reports == {} and a.dev_path == (tmp_path / "SQUAD2" / "dev.json").resolve()
    other = synthetic_squad(tmp_path / "other.json", 1, 1, 2)
    a = recipe.parse_args(["--task", "SQUAD1", "--data_dir", str(tmp_path), "--stages", "fp", "--test-file",
                           str(other), *TOK])
    assert a.reports == {"test": other.resolve()}


def _dry_flags(capsys, argv):
    assert recipe.run_squad(argv) == 0
    argv_out = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    return dict(zip(argv_out, argv_out[1:]))


def test_validate_interval_is_half_an_epoch(tmp_path, capsys):
    _task_folder(tmp_path)
    n_questions = sum(len(p["qas"]) for art in json.loads((tmp_path / "SQUAD1" / "train.json").read_text())["data"]
                      for p in art["paragraphs"])
    base = ["--task", "SQUAD1", "--data_dir", str(tmp_path), "--stages", "fp", "--arch", "tiny", "--bs", "4",
            "--dry-run", *TOK]
    # windows of 384 tokens hold every synthetic context whole: one window per question
    flags = _dry_flags(capsys, base)
    assert flags["--validate-interval-updates"] == flags["--save-interval-updates"] == str(round(n_questions / 8))
    flags = _dry_flags(capsys, base + ["--validate-every-epochs", "0.25"])
    assert flags["--validate-interval-updates"] == str(round(n_questions / 16))
    assert _dry_flags(capsys, base + ["--eval_step", "3"])["--validate-interval-updates"] == "3"
    with pytest.raises(recipe.RecipeError, match="validate-every-epochs"):
        recipe.parse_args(base + ["--validate-every-epochs", "0"])


LOG = """\
2026-12-07 | INFO | train | epoch 001 | loss 5.1 | num_updates 10
2026-12-07 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 4.2 | exact 20.5 | f1 30.25 | wps 1 | wpb 2 | \
bsz 3 | num_updates 10
2026-12-07 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 3.2 | exact 40 | f1 50.5 | num_updates 20 | \
best_f1 50.5
2026-12-07 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 3.1 | exact 41 | f1 50.75 | num_updates 30
2026-12-07 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 3.1 | exact 42 | f1 50.9 | num_updates 30
"""


def test_curve_and_convergence_verdict():
    curve = recipe.parse_curve(LOG)
    assert [(c["update"], c["epoch"], c["f1"], c["exact"]) for c in curve] == [
        (10, 1, 30.25, 20.5), (20, 1, 50.5, 40.0), (30, 2, 50.9, 42.0)]  # a repeated update keeps its last line
    v = recipe.convergence(curve, 10)
    assert v["converged"] is True and v["last_half_epoch_gain_f1"] == pytest.approx(0.4) and v["from_update"] == 20
    v = recipe.convergence(curve[:2], 10)
    assert v["converged"] is False and v["last_half_epoch_gain_f1"] == pytest.approx(20.25)
    assert recipe.convergence(curve[:1], 10)["converged"] is None
    assert recipe.convergence([], 10)["converged"] is None


def _loaded_updates(text: str):
    return [int(m) for m in re.findall(r"Loaded checkpoint .*?\(epoch \d+ @ (\d+) updates\)", text)]


def test_stage_resumes_from_checkpoint_last_and_finished_stages_are_reused(tmp_path):
    _task_folder(tmp_path)
    out = tmp_path / "out"
    base = ["--task", "SQUAD1", "--data_dir", str(tmp_path), "--output_dir", str(out), "--stages", "fp", *TINY]
    _recipe(base + ["--max_updates", "4"])
    fp = out / "fp"
    ev = json.loads((fp / "eval.json").read_text())
    assert [c["update"] for c in ev["selection_curve"]] == [2, 4]
    assert json.loads((fp / "curve.json").read_text()) == ev["selection_curve"]
    assert ev["test"]["file"] == str((tmp_path / "SQUAD1" / "test_subset.json").resolve())
    assert (fp / "test_predictions.json").is_file() and ev["convergence"]["from_update"] == 2
    assert json.loads((out / "summary.json").read_text())["fp_convergence"] == ev["convergence"]
    # an interrupted sitting: the stage's training did not finish (no train_done.json, no eval.json) and the
    # relaunch asks for 8 updates; fairseq-train must continue from update 4, not restart from the pretrained model
    (fp / "eval.json").unlink()
    (fp / "train_done.json").unlink()
    p = _recipe(base + ["--max_updates", "8"])
    assert "resuming from" in p.stdout and _loaded_updates(p.stdout) == [4]
    assert [c["update"] for c in recipe.parse_curve(p.stdout)] == [6, 8]  # updates 1-4 did not run again
    ev = json.loads((fp / "eval.json").read_text())
    assert [c["update"] for c in ev["selection_curve"]] == [2, 4, 6, 8]  # both sittings, from the appended log
    assert len(json.loads((fp / "train_runs.json").read_text())) == 2
    # a finished stage is reused without starting fairseq-train
    p = _recipe(base + ["--max_updates", "8"])
    assert "fp: done before" in p.stdout and "valid on" not in p.stdout and not _loaded_updates(p.stdout)
    # scoring failed after training: no retraining
    (fp / "eval.json").unlink()
    p = _recipe(base + ["--max_updates", "8"])
    assert "training finished before" in p.stdout and not _loaded_updates(p.stdout)


def test_integer_only_ternary_stage_and_its_engine(tmp_path):
    _task_folder(tmp_path)
    out = tmp_path / "out"
    _recipe(["--task", "SQUAD1", "--data_dir", str(tmp_path), "--output_dir", str(out), *TINY, "--max_updates", "2",
             "--stages", "int_ternary_engine,fp,int_ternary,ternary", "--pred_distill", "--intermediate_distill"])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["fp", "ternary", "int_ternary", "int_ternary_engine"]
    log = (out / "int_ternary_w2_twn" / "train.log").read_text()
    assert "--quant-mode symmetric --weight-bits 2 --weight-quant-method twn" in log
    assert f"--finetune-from-model {out / 'ternary_w2a8_twn' / 'checkpoint_best.pt'}" in log
    eng = summary["stages"]["int_ternary_engine"]
    assert eng["test"]["same_predictions_as_qat"] == eng["test"]["questions"] == eng["test"]["total"]
