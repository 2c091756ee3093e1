"""run.py --dry-run: the generated fairseq-train argv per task and stage (no training)."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

import run

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
    p = tmp_path / "fp" / "checkpoint_best.pt"
    p.parent.mkdir()
    p.write_bytes(b"not a real checkpoint; dry runs only check existence")
    return p


EXPECTED = {  # task: (classes, lr, bs, total, warmup, epochs, metric, metric flag, validate-interval-updates)
    "RTE": (2, "2e-05", 16, 2036, 122, 12, "accuracy", None, None),
    "SST-2": (2, "1e-05", 32, 20935, 1256, 12, "accuracy", None, None),
    "MNLI": (3, "1e-05", 32, 123873, 7432, 6, "accuracy", None, 3125),
    "QNLI": (2, "1e-05", 32, 33112, 1986, 12, "accuracy", None, 1718),
    "CoLA": (2, "1e-05", 16, 5336, 320, 12, "mcc", "--report-mcc", None),
    "QQP": (2, "1e-05", 32, 113272, 28318, 6, "acc_and_f1", "--report-acc-and-f1", 29687),
    "MRPC": (2, "1e-05", 16, 2296, 137, 12, "acc_and_f1", "--report-acc-and-f1", None),
    "STS-B": (1, "2e-05", 16, 3598, 214, 12, "pearson_and_spearman", "--report-pearson-and-spearman", None),
    "RT-SENT": (2, "1e-05", 32, 2670, 160, 10, "accuracy", None, None),
    "BOOLQ": (2, "2e-05", 16, 5900, 354, 10, "accuracy", None, None),
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_task_table_fp(task, tiny_glue, tmp_path):
    k, lr, bs, total, warmup, epochs, metric, mflag, vint = EXPECTED[task]
    res = dry(tiny_glue, tmp_path, "--task", task, "--quant-mode", "none")
    (argv,) = res.argv
    assert argv[argv.index("--user-dir") + 1] == str(run.USER_DIR)  # absolute (IBERT_USER_DIR or <repo>/ibert_plugin)
    assert flag(argv, "--arch") == "ibert_roberta_tiny"
    assert argv[len(run._fairseq_train_cmd())] == str(tiny_glue / f"{task}-bin")
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
