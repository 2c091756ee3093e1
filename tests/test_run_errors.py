"""run.py error paths: one ``error: ...`` line on stderr, non-zero exit, no traceback."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import run

REPO = Path(__file__).resolve().parents[1]


class Captured:
    """The parts of a finished process the assertions read, for in-process ``run.cli`` calls."""

    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def run_py(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def assert_one_error_line(p, code, *needles):
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("case", [
    (["--task", "rte"], ["unknown task 'rte'", "RTE, SST-2, MNLI, QNLI, CoLA, QQP, MRPC, STS-B, RT-SENT, BOOLQ"]),
    (["--task", "SST"], ["unknown task 'SST'"]),
    (["--task", "RTE", "--arch", "bert"], ["unknown arch 'bert'"]),
    (["--task", "RTE", "--bs", "16.0"], ["--bs"]),
    (["--task", "RTE", "--quant-mode", "asymmetric"], ["--quant-mode"]),
    (["--task", "RTE", "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_usage_errors(case, tmp_path):
    args, needles = case
    assert_one_error_line(run_py(*args, "--dry-run", cwd=tmp_path), 2, *needles)


def test_bad_allocator_choice_is_one_error(tiny_glue, tmp_path):
    env = dict(os.environ, IBERT_CPU_ALLOCATOR="tcmalloc")
    p = run_py("--task", "RTE", "--arch", "tiny", "--data-dir", str(tiny_glue), "--quant-mode", "none",
               "--output-dir", str(tmp_path), "--dry-run", env=env)
    assert_one_error_line(p, 2, "IBERT_CPU_ALLOCATOR='tcmalloc': choose one of auto, jemalloc, system")


@pytest.mark.slow
def test_missing_data_and_restore(tiny_glue, tmp_path):
    base = ["--arch", "tiny", "--output-dir", str(tmp_path), "--dry-run"]
    p = run_py("--task", "RTE", "--data-dir", str(tmp_path / "nowhere"), "--quant-mode", "none", *base)
    assert_one_error_line(p, 2, "data folder not found", "RTE-bin")
    p = run_py("--task", "RTE", "--data-dir", str(tiny_glue), "--restore-file", str(tmp_path / "x.pt"), *base)
    assert_one_error_line(p, 2, "restore file not found")
    p = run_py("--task", "RTE", "--data-dir", str(tiny_glue), *base)  # QAT (default mode) without a restore file
    assert_one_error_line(p, 2, "--restore-file")
    p = run_py("--task", "RTE", "--data-dir", str(tiny_glue), "--arch", "roberta_base", "--quant-mode", "none",
               "--model-dir", str(tmp_path), "--output-dir", str(tmp_path), "--dry-run")
    assert_one_error_line(p, 2, "pretrained model not found")


@pytest.mark.slow
def test_bits_and_stage_flags(tiny_glue, tmp_path):
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"x")
    base = ["--task", "RTE", "--arch", "tiny", "--data-dir", str(tiny_glue), "--restore-file", str(ck),
            "--output-dir", str(tmp_path), "--dry-run"]
    assert_one_error_line(run_py(*base, "--weight-bits", "9"), 2, "--weight-bits 9 out of range")
    assert_one_error_line(run_py(*base, "--weight-bits", "1"), 2, "out of range")
    assert_one_error_line(run_py(*base, "--quant-mode", "ternarybert", "--weight-bits", "4"), 2, "2 or 8")
    assert_one_error_line(run_py(*base, "--quant-mode", "ternarybert", "--input-bits", "16"), 2, "--input-bits")
    assert_one_error_line(run_py(*base, "--pred-distill"), 2, "needs --quant-mode ternarybert")


@pytest.mark.parametrize("flags,needle", [
    (["--weight-bits", "8", "--weight-quant-method", "twn"], "--weight-quant-method twn ternarizes weights"),
    (["--quant-mode", "ternarybert", "--weight-bits", "8", "--weight-quant-method", "lat"], "needs --weight-bits 2"),
    (["--quant-mode", "ternarybert", "--weight-quant-method", "twn", "--clip-val", "-3"], "--clip-val must be > 0"),
    (["--clip-val", "0"], "--clip-val must be > 0"),
    (["--quant-mode", "none", "--weight-bits", "4"], "--weight-bits has no effect with --quant-mode none"),
    (["--quant-mode", "none", "--force-dequant", "gelu"], "--force-dequant has no effect"),
    (["--quant-mode", "ternarybert", "--force-dequant", "softmax"], "--force-dequant only applies"),
    (["--act-range", "minmax"], "--act-range selects TernaryBERT's float activation quantizer"),
    (["--quant-mode", "ternarybert", "--integer-only", "--act-range", "minmax"], "--act-range"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--quant-mode", "ternarybert", "--weight-bits", "8", "--ternary-linear", "row"], "--ternary-linear sets"),
    (["--ternary-linear", "row"], "needs --weight-bits 2"),
])
def test_impossible_flag_combinations(flags, needle, tiny_glue, tmp_path, capsys):
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"flags are checked before the restore file")
    rc = run.cli(["--task", "RTE", "--arch", "tiny", "--data-dir", str(tiny_glue), "--restore-file", str(ck),
                  "--output-dir", str(tmp_path), "--dry-run", *flags])
    assert_one_error_line(Captured(rc, capsys.readouterr().err), 2, needle)


def _bad_restore_files(tmp_path):
    import torch

    files = {}
    files["corrupt"] = tmp_path / "corrupt.pt"
    files["corrupt"].write_bytes(b"PK\x03\x04" + b"\0" * 64)  # a zip header and nothing else
    files["state dict"] = tmp_path / "state_dict.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, files["state dict"])  # a torch file, not a fairseq checkpoint
    files["foreign object"] = tmp_path / "object.pt"
    torch.save({"model": {}, "args": Path("x")}, files["foreign object"])
    files["packed"] = tmp_path / "model_packed.pt"
    torch.save({"format": "ibert_plugin.packed", "version": 1, "quantized": {}}, files["packed"])
    return files


@pytest.mark.parametrize("mode", ["symmetric", "ternarybert", "none"])
def test_restore_file_that_does_not_load(mode, tiny_glue, tmp_path, capsys):
    """Checked before fairseq-train starts: one line, no log or run folder written (no --dry-run)."""
    out = tmp_path / "out"
    for kind, bad in _bad_restore_files(tmp_path).items():
        rc = run.cli(["--task", "RTE", "--arch", "tiny", "--data-dir", str(tiny_glue), "--output-dir", str(out),
                      "--cpu", "--quant-mode", mode, "--restore-file", str(bad)])
        err = capsys.readouterr().err
        needle = "is a packed model" if kind == "packed" else "is not a valid checkpoint"
        assert_one_error_line(Captured(rc, err), 2, f"--restore-file: {bad} {needle}")
        assert "weights_only" not in err, kind
    assert not out.exists()


def test_corrupt_restore_file_from_the_shell(tiny_glue, tmp_path, run_env):
    bad = _bad_restore_files(tmp_path)["corrupt"]
    p = run_py("--task", "RTE", "--arch", "tiny", "--data-dir", str(tiny_glue), "--output-dir", str(tmp_path / "o"),
               "--cpu", "--restore-file", str(bad), env=run_env)
    assert_one_error_line(p, 2, f"--restore-file: {bad} is not a valid checkpoint (a truncated or corrupt zip "
                                "archive; a torch checkpoint is a zip archive written by torch.save)")


@pytest.mark.parametrize("content,what", [
    (b"hello, this is text\n", "a text file starting 'hello, this is text'"),
    (bytes(range(1, 200)), "a binary file starting with bytes 01 02 03 04 05 06 07 08, not a zip archive"),
    (b"", "an empty file"),
    (b"\x80\x04K\x01.", "a Python pickle (not a torch.save zip archive) that torch.load cannot read: "),
])
def test_wrong_restore_file_is_explained(content, what, tiny_glue, tmp_path, capsys):
    """Not "torch.load: 101" or "Unsupported operand 232": what the file is and what a checkpoint is."""
    bad = tmp_path / "wrong.pt"
    bad.write_bytes(content)
    rc = run.cli(["--task", "RTE", "--arch", "tiny", "--data-dir", str(tiny_glue), "--output-dir",
                  str(tmp_path / "o"), "--cpu", "--restore-file", str(bad), "--dry-run"])
    err = capsys.readouterr().err
    assert_one_error_line(Captured(rc, err), 2, f"--restore-file: {bad} is not a valid checkpoint ({what}")
    assert "UserWarning" not in err


def test_data_folder_without_valid_split_fails_at_dry_run(tiny_glue, tmp_path, capsys):
    import shutil

    data = tmp_path / "glue-bin"
    shutil.copytree(tiny_glue / "RTE-bin", data / "RTE-bin")
    for ext in ("bin", "idx"):
        (data / "RTE-bin" / "input0" / f"valid.{ext}").unlink()
    rc = run.cli(["--task", "RTE", "--arch", "tiny", "--quant-mode", "none", "--data-dir", str(data), "--output-dir",
                  str(tmp_path / "o"), "--cpu", "--dry-run"])
    err = capsys.readouterr().err
    assert_one_error_line(Captured(rc, err), 2, f"data folder {data / 'RTE-bin'} has no input0/valid.bin, "
                                                "input0/valid.idx")


def test_squad_tasks_go_to_their_recipe(tmp_path, capsys):
    rc = run.cli(["--task", "SQUAD1", "--data_dir", str(tmp_path / "nowhere"), "--pred_distill", "--dry-run"])
    assert_one_error_line(Captured(rc, capsys.readouterr().err), 2, f"{tmp_path / 'nowhere'}/SQUAD1/train.json")


@pytest.mark.slow
def test_fairseq_failure_points_at_log(tiny_glue, tmp_path, run_env):
    p = run_py("--task", "RTE", "--arch", "tiny", "--quant-mode", "none", "--data-dir", str(tiny_glue),
               "--output-dir", str(tmp_path), "--cpu", "--", "--no-such-fairseq-flag", env=run_env)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: fairseq-train failed with exit code 2; see ") and last.endswith(".log")
    log = Path(last.rsplit("see ", 1)[1])
    assert "unrecognized arguments: --no-such-fairseq-flag" in log.read_text()


def _fairseq_train_argv(tiny_glue, tmp_path, capsys, *run_args):
    """The fairseq-train argv run.py would launch (its --dry-run output)."""
    assert run.main(["--task", "RTE", "--arch", "tiny", "--data-dir", str(tiny_glue), "--output-dir",
                     str(tmp_path), "--dry-run", "--max-update", "1", *run_args]) is not None
    return shlex.split(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("bad, needles", [
    (["--ln-var-bits", "60"], ["ln_var_bits must be between 16 and 52, got 60"]),
    (["--weight-quant-method", "twn"], ["'twn' is a ternary method and needs weight_bits=2"]),
    (["--criterion", "ternary_distill", "--teacher-path", "x.pt", "--pred-distill", "--pred-distill-weight", "-1"],
     ["--pred-distill-weight must be a finite number >= 0, got -1"]),
])
@pytest.mark.slow
def test_bad_plugin_flags_given_straight_to_fairseq_train(tiny_glue, tmp_path, capsys, bad, needles):
    """fairseq-train itself (not run.py) reports a bad plugin flag, found when it builds the model or the criterion,
    as one error line."""
    argv = _fairseq_train_argv(tiny_glue, tmp_path, capsys, "--quant-mode", "none")
    p = subprocess.run(argv + bad, capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last
    assert not list(tmp_path.glob("**/checkpoint*.pt"))


@pytest.mark.slow
def test_other_fairseq_train_failures_keep_their_traceback(tiny_glue, tmp_path, capsys):
    argv = _fairseq_train_argv(tiny_glue, tmp_path, capsys, "--quant-mode", "none")
    p = subprocess.run(argv + ["--restore-file", str(tmp_path / "missing.pt"), "--finetune-from-model", "x"],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr
