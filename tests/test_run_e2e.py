"""End-to-end: run.py -> fairseq-train --user-dir ibert_plugin on the tiny dataset (arch ``tiny``, a few updates).

FP stage from scratch, I-BERT QAT restore + interrupt + resume, 2-worker CPU (gloo) distributed training, one hydra
config through scripts/hydra_train.py, and (when the criterion and exporter exist) a TernaryBERT stage with export.
``IBERT_USER_DIR`` points run.py at another plugin checkout if set.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run

pytestmark = pytest.mark.slow  # end-to-end training through run.py: left out by `make test-fast`

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--", "--num-workers", "0", "--log-interval", "5"]


def run_py(args, env, timeout=240, **kw):
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, **kw)


def common(tiny_glue, out):
    return ["--arch", "tiny", "--data-dir", str(tiny_glue), "--output-dir", str(out), "--cpu"]


@pytest.fixture(scope="module")
def fp_run(tiny_glue, tmp_path_factory):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = tmp_path_factory.mktemp("e2e_out")
    p = run_py(["--task", "MRPC", "--quant-mode", "none", "--max-epochs", "2", "--lr", "1e-3",
                *common(tiny_glue, out), *QUIET], env)
    return p, out, env


def test_fp_stage(fp_run):
    p, out, _ = fp_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = p.stdout.strip().splitlines()[-1]
    assert summary.startswith("summary: MRPC [none] best dev acc_and_f1 = "), summary
    assert "n/a" not in summary and "wall time" in summary
    cfg_dir = out / "none" / "MRPC-tiny" / "wd0.1_ad0.1_d0.1_lr0.001"
    (log,) = cfg_dir.glob("*.log")
    ckpt = cfg_dir / f"{log.stem}_ckpt" / "checkpoint_best.pt"
    assert ckpt.is_file() and str(ckpt) in summary
    text = log.read_text()
    assert "best_acc_and_f1" in text and "done training" in text
    assert "\r" not in text
    from ibert_plugin.recipes.allocator import allocator_env, describe

    assert f"[run.py] memory allocator: {describe(allocator_env())}" in text   # the env the child ran with
    assert json.loads((cfg_dir / f"{log.stem}.json").read_text())["status"] == "finished"


def test_qat_restore_interrupt_resume(fp_run, tiny_glue, tmp_path):
    """SIGTERM once the first mid-run checkpoint is saved (the run has updates left), then resume from it."""
    p, fp_out, env = fp_run
    assert p.returncode == 0
    (fp_ckpt,) = fp_out.glob("none/MRPC-tiny/*/*_ckpt/checkpoint_best.pt")
    out = tmp_path / "out"
    total = 40  # long enough that the signal always lands mid-run (it is sent at the first save, update 4)
    own = ["--task", "MRPC", "--restore-file", str(fp_ckpt), "--lr", "1e-4", "--max-update", str(total),
           *common(tiny_glue, out)]
    passthrough = ["--", "--num-workers", "0", "--log-interval", "4", "--save-interval-updates", "4"]
    args = own + passthrough
    cfg_dir = out / "symmetric" / "MRPC-tiny" / "wd0.1_ad0.1_d0.1_lr0.0001"

    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    saved = None
    while time.time() < deadline and proc.poll() is None and saved is None:
        for log in cfg_dir.glob("*.log"):
            m = re.search(r"Saved checkpoint \S*checkpoint_last\.pt \(epoch \d+ @ (\d+) updates", log.read_text())
            saved = int(m.group(1)) if m else None
        time.sleep(0.05)
    assert saved is not None and proc.poll() is None, "no mid-run checkpoint before the run ended"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "error: interrupted; relaunch the same command to resume"
    (rec_path,) = cfg_dir.glob("*.json")
    assert json.loads(rec_path.read_text())["status"] == "interrupted"
    first_log = (cfg_dir / f"{rec_path.stem}.log").read_text()
    assert "loading pretrained model from " + str(fp_ckpt) in first_log  # FP weights into the quantized arch
    assert f"num_updates {total}" not in first_log and "done training" not in first_log

    # a dry run now resumes that run; --fresh would not
    assert run.main(own + ["--dry-run"] + passthrough).resumed
    assert not run.main(own + ["--dry-run", "--fresh"] + passthrough).resumed

    # relaunch with the same arguments: continues from checkpoint_last.pt of the same run directory
    p2 = run_py(args, env)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    assert len(list(cfg_dir.glob("*.log"))) == 1
    log = (cfg_dir / f"{rec_path.stem}.log").read_text()
    resumed = log.split("[run.py] resume", 1)[1]
    last = cfg_dir / f"{rec_path.stem}_ckpt" / "checkpoint_last.pt"
    m = re.search(rf"Loaded checkpoint {re.escape(str(last))} \(epoch \d+ @ (\d+) updates\)", resumed)
    assert m and int(m.group(1)) >= saved > 0, resumed[:3000]  # not from scratch: from the interrupted run's save
    assert "loading pretrained model" not in resumed
    assert f"num_updates {total}" in resumed
    assert json.loads(rec_path.read_text())["status"] == "finished"
    assert p2.stdout.strip().splitlines()[-1].startswith("summary: MRPC [symmetric]")


def test_cpu_distributed_two_workers(tiny_glue, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = run_py(["--task", "RTE", "--quant-mode", "none", "--max-update", "6", "--distributed-world-size", "2",
                *common(tiny_glue, tmp_path), *QUIET], env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (log,) = [p for p in tmp_path.glob("none/RTE-tiny/*/*.log") if ".rank" not in p.name]
    text = log.read_text()
    assert "distributed init (rank 0)" in text
    assert "num_updates 6" in text
    assert list(log.parent.glob("*.rank1.log"))
    assert (log.parent / f"{log.stem}_ckpt" / "checkpoint_best.pt").is_file()


def test_hydra_config_tiny(tiny_glue, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "scripts" / "hydra_train.py"), "--config-name", "rte",
           f"task.data={tiny_glue / 'RTE-bin'}", "model._name=ibert_roberta_tiny", "common.cpu=true",
           "optimization.max_update=2", f"checkpoint.save_dir={tmp_path / 'ck'}", "dataset.num_workers=0"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "ck" / "checkpoint_best.pt").is_file()
    assert not (tmp_path / "outputs").exists()  # hydra.run.dir: . (no hydra output folders)


def test_ternary_stage_with_export(fp_run, tiny_glue, tmp_path):
    p, fp_out, env = fp_run
    assert p.returncode == 0
    (fp_ckpt,) = fp_out.glob("none/MRPC-tiny/*/*_ckpt/checkpoint_best.pt")
    p = run_py(["--task", "MRPC", "--quant-mode", "ternarybert", "--restore-file", str(fp_ckpt), "--max-update", "2",
                "--pred-distill", "--intermediate-distill", "--save-quantized-model",
                *common(tiny_glue, tmp_path), *QUIET], env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (ck,) = tmp_path.glob("ternary_w2_twn/MRPC-tiny/*/*_ckpt")
    assert (ck / "model_packed.pt").is_file()
    assert not list(ck.glob("checkpoint*.pt"))  # float checkpoints removed without --save-fp-model
    assert str(ck / "model_packed.pt") in p.stdout.strip().splitlines()[-1]
    packed = torch.load(ck / "model_packed.pt", map_location="cpu", weights_only=True)
    # sentence classification never uses the masked-LM head: run.py leaves it out of the packed file
    assert packed["omitted"] and all(k.startswith("encoder.lm_head.") for k in packed["omitted"])
