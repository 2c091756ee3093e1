"""The SQuAD recipe's command line: TernaryBERT flags reach fairseq-train, run.py-style stage selection, errors."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from ibert_plugin.recipes import squad as recipe
from squad_data import synthetic_squad

REPO = Path(__file__).resolve().parents[1]
TOK = ["--tokenizer_dir", str(REPO / "data" / "minilm")]


def test_stage_selection_and_errors():
    a = recipe.parse_args(["--task", "SQUAD2", "--quant-mode", "ternarybert", "--save_quantized_model",
                           "--pred_distill", *TOK])
    assert a.stage_list == ["ternary", "export"] and a.version_2_with_negative
    a = recipe.parse_args(["--task", "SQUAD1", "--quant_mode", "symmetric", "--lr", "3e-6", "--max-epochs", "2", *TOK])
    assert a.stage_list == ["ibert", "engine"] and (a.ibert_learning_rate, a.ibert_epochs) == (3e-6, 2.0)
    assert recipe.parse_args(["--task", "SQUAD1", "--pred_distill", *TOK]).stage_list == list(recipe.DEFAULT_STAGES)
    for argv, msg in ((["--task", "SQUAD3"], "unknown task 'SQUAD3'"),
                      (["--task", "SQUAD1", "--stages", "fp", "--quant-mode", "none"], "not both"),
                      (["--task", "SQUAD1", "--stages", "ternary"], "needs --pred-distill and/or"),
                      (["--task", "SQUAD1", "--stages", "fp,bogus"], "unknown stage"),
                      (["--task", "SQUAD1", "--stages", "fp", "--max_updates", "fp=x"], "expected N or fp=N"),
                      (["--task", "SQUAD1", "--weight_bits", "3"], "invalid choice"),
                      (["--task", "SQUAD1", "--stages", "fp", "--lr", "0"], "must be > 0"),
                      (["--task", "SQUAD1", "--pred_distill", "--pred_distill_weight", "-1"], "pred-distill-weight"),
                      (["--task", "SQUAD2", "--null_score_diff_threshold", "abc"], "a number or 'select'"),
                      (["--task", "SQUAD2", "--null_score_diff_threshold", "inf"], "a number or 'select'"),
                      (["--task", "SQUAD1", "--stages", "fp", "--clip_val", "0"], "clip_val must be a positive")):
        with pytest.raises(recipe.RecipeError, match=msg):
            recipe.parse_args(argv + TOK)


def test_dry_run_passes_ternarybert_flags(tmp_path, capsys):
    synthetic_squad(tmp_path / "SQUAD2" / "train.json", 2, 2, 4, seed=0, version_2=True)
    synthetic_squad(tmp_path / "SQUAD2" / "dev.json", 1, 1, 4, seed=1, version_2=True)
    fp = tmp_path / "fp.pt"
    fp.write_bytes(b"x")
    rc = recipe.run_squad(["--task", "SQUAD2", "--data_dir", str(tmp_path), "--quant-mode", "ternarybert",
                           "--restore-file", str(fp), "--weight_bits", "2", "--input_bits", "8", "--pred_distill",
                           "--intermediate_distill", "--max_seq_length", "64", "--doc_stride", "32",
                           "--max_query_length", "16", "--null_score_diff_threshold", "0.5", "--bs", "4",
                           "--max-update", "7", "--seed", "3", "--pred_distill_weight", "256", "--clip_val", "10",
                           "--ternary_linear", "row", "--dry-run", *TOK])
    assert rc == 0
    argv = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    flags = dict(zip(argv, argv[1:]))
    assert "--user-dir" in argv and Path(flags["--user-dir"]).is_absolute()
    assert flags["--task"] == "squad" and flags["--criterion"] == "squad_span_distill"
    assert flags["--quant-mode"] == "ternarybert" and flags["--weight-bits"] == "2" and flags["--input-bits"] == "8"
    assert flags["--teacher-path"] == flags["--finetune-from-model"] == str(fp)
    assert {"--pred-distill", "--intermediate-distill", "--version-2-with-negative"} <= set(argv)
    assert (flags["--max-seq-length"], flags["--doc-stride"], flags["--max-query-length"]) == ("64", "32", "16")
    assert flags["--null-score-diff-threshold"] == "0.5" and flags["--max-update"] == "7"
    assert flags["--batch-size"] == "4" and flags["--seed"] == "3"
    assert flags["--pred-distill-weight"] == "256" and flags["--clip-val"] == "10"
    assert flags["--ternary-linear"] == "row"
    assert flags["--best-checkpoint-metric"] == "f1" and "--maximize-best-checkpoint-metric" in argv
    assert not (tmp_path / "outputs").exists()


def test_ibert_stage_loss_is_ce_or_distillation_from_the_fp_model(tmp_path, capsys):
    synthetic_squad(tmp_path / "SQUAD1" / "train.json", 2, 2, 4, seed=0)
    synthetic_squad(tmp_path / "SQUAD1" / "dev.json", 1, 1, 4, seed=1)
    fp = tmp_path / "fp.pt"
    fp.write_bytes(b"x")
    base = ["--task", "SQUAD1", "--data_dir", str(tmp_path), "--quant-mode", "symmetric", "--restore-file", str(fp),
            "--max_seq_length", "64", "--doc_stride", "32", "--pred_distill_weight", "64", "--dry-run", *TOK]
    seen = {}
    for mode in ("none", "pred", "all"):
        assert recipe.run_squad(base + ["--ibert_distill", mode]) == 0
        argv = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
        flags = dict(zip(argv, argv[1:]))
        assert flags["--quant-mode"] == "symmetric" and flags["--finetune-from-model"] == str(fp)
        seen[mode] = (flags["--criterion"], flags.get("--teacher-path"), flags.get("--pred-distill-weight"),
                      "--pred-distill" in argv, "--intermediate-distill" in argv)
    assert seen["none"] == ("squad_span", None, None, False, False)
    assert seen["pred"] == ("squad_span_distill", str(fp), "64", True, False)
    assert seen["all"] == ("squad_span_distill", str(fp), "64", True, True)
    with pytest.raises(recipe.RecipeError, match="invalid choice"):
        recipe.parse_args(["--task", "SQUAD1", "--ibert_distill", "soft", *TOK])


def test_rescore_without_a_checkpoint_is_one_error(tmp_path, capsys):
    synthetic_squad(tmp_path / "SQUAD1" / "train.json", 2, 2, 4, seed=0)
    synthetic_squad(tmp_path / "SQUAD1" / "dev.json", 1, 1, 4, seed=1)
    rc = recipe.run_squad(["--task", "SQUAD1", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                           "--stages", "fp", "--rescore", "--max_seq_length", "64", "--doc_stride", "32", *TOK])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --rescore: stage fp has no ")


def test_stage_quantization_comes_from_the_presets():
    from ibert_plugin.quant.config import IBERT_W7A8, INT_TERNARY_W2, TERNARYBERT_W2A8

    q = recipe.parse_args(["--task", "SQUAD1", "--stages", "fp", "--ibert_weight_bits", "7", *TOK]).stage_quant
    assert q["ternary"] == TERNARYBERT_W2A8 and q["int_ternary"] == INT_TERNARY_W2 and q["ibert"] == IBERT_W7A8
    assert q["fp"].quant_mode == "none"
    q = recipe.parse_args(["--task", "SQUAD1", "--stages", "fp", "--weight_bits", "8", "--weight_quant_method", "lat",
                           "--clip_val", "10", *TOK]).stage_quant
    # 8-bit TernaryBERT weights are symmetric; the integer-only ternary stage keeps the ternary method
    assert (q["ternary"].weight_bits, q["ternary"].weight_method, q["ternary"].clip_val) == (8, "sym", 10.0)
    assert q["int_ternary"].weight_method == "lat"


def test_flags_are_dashed_with_the_underscore_spellings_as_hidden_aliases():
    help_text = recipe.build_parser().format_help()
    assert "--pred-distill-weight" in help_text and "--weight-quant-method" in help_text
    options = help_text.split("options:")[1].split("Flags are spelled")[0]
    assert "--pred_distill" not in options and "--weight_quant_method" not in options and "--dev_file" not in options
    assert "--select-file" in options and "--bs" in options  # the run.py spellings stay listed
    base = ["--task", "SQUAD1", "--stages", "fp", *TOK]
    dashed = recipe.parse_args(base + ["--pred-distill", "--weight-bits", "8", "--max-updates", "5", "--dev-file",
                                       "x.json", "--per-gpu-batch-size", "4", "--dry-run"])
    underscored = recipe.parse_args(base + ["--pred_distill", "--weight_bits", "8", "--max_updates", "5", "--dev_file",
                                            "x.json", "--per_gpu_batch_size", "4", "--dry_run"])
    assert vars(dashed) == vars(underscored)
    assert (dashed.pred_distill, dashed.weight_bits, dashed.caps["fp"], dashed.per_gpu_batch_size) == (True, 8, 5, 4)


def test_one_error_class_for_both_drivers():
    from ibert_plugin.recipes import RunError

    assert recipe.RecipeError is RunError
    with pytest.raises(RunError, match="unknown task"):
        recipe.parse_args(["--task", "SQUAD3", *TOK])
