"""``scripts/gpu_check.py`` on a CPU-only machine: its ``--dry-run`` plumbing (stage flags, assets, the comparison code
on a tiny integer model, CPU against CPU and the engine), the step-time parsing and ratios, and its refusals."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_helpers as mh
from ibert_plugin.engine import qat_compare

pytestmark = pytest.mark.slow  # whole pipelines / subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = _module()


def _run(*args, cuda_visible=""):
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES=cuda_visible)  # never a GPU in tests
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def _fake_assets(root: Path) -> Path:
    """The files the check looks for (only their presence matters to --dry-run)."""
    bin_dir = root / "glue-bin" / "RT-SENT-bin"
    for rel in ("minilm/model.pt", "glue/RT-SENT/test_with_labels.tsv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    for rel in ("label/dict.txt", "input0/train.bin", "input0/valid.bin", "input0/test.bin"):
        (bin_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (bin_dir / rel).write_bytes(b"x")
    return root


def _train_line(epoch, upd, ups):
    return (f"2026-12-07 12:00:00 | INFO | train_inner | epoch {epoch:03d}:{upd:7d} / 268 loss=0.693, ups={ups:.2f}, "
            f"wpb=640, bsz=32, num_updates={upd}, lr=1e-05, gnorm=1.2, train_wall=0, gb_free=70.1, wall=12")


def test_step_times_read_first_epoch_updates_after_the_warm_up():
    lines = ["2026-12-07 12:00:00 | INFO | fairseq_cli.train | begin training epoch 1"]
    lines += [_train_line(1, u, 5.0 if u > 2 else 0.5) for u in range(1, 269)]
    lines += ["2026-12-07 12:00:00 | INFO | valid | epoch 001 | valid on 'valid' subset | accuracy 80.1"]
    lines += [_train_line(2, u, 0.1) for u in range(269, 280)]  # after a validation: left out
    times = gc.step_times("\n".join(lines))
    assert len(times) == 268 - gc.WARMUP_STEPS
    assert times == pytest.approx([0.2] * len(times))
    s = gc.summary([0.1, 0.3, 0.2])
    assert (s["median"], s["min"], s["max"], s["n"]) == (0.2, 0.1, 0.3, 3)
    with pytest.raises(gc.CheckError, match="no per-update times"):
        gc.summary(gc.step_times("\n".join(lines[:5])))  # only warm-up updates


def test_ratios_are_over_the_fp32_and_fp16_medians_with_the_targets():
    steps = {"fp16": {"median": 0.01}, "fp32": {"median": 0.02}, "w8": {"median": 0.05},
             "ternary": {"median": 0.04}, "int_ternary": {"median": 0.06}}
    r = gc.ratios(steps)
    assert r["w8"]["over_fp32"] == pytest.approx(2.5) and r["w8"]["over_fp16"] == pytest.approx(5.0)
    assert r["w8"]["met"] is False and r["ternary"]["met"] is True
    assert "met" not in r["int_ternary"] and set(r) == {"w8", "ternary", "int_ternary"}


def test_dry_run_checks_its_plumbing(tmp_path):
    data = _fake_assets(tmp_path / "data")
    proc = _run("--dry-run", "--require-assets", "--data-dir", str(data), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dry_run"] is True and out["assets_missing"] is None
    keys = [s["key"] for s in out["stages"]]
    assert keys == ["fp16", "fp32", "w8", "ternary", "int_ternary"]
    cmds = {s["key"]: s["command"] for s in out["stages"]}
    assert "--fp16" in cmds["fp16"] and all("--fp16" not in cmds[k] for k in keys[1:])  # FP stage only
    assert "--log-interval 1" in cmds["w8"] and str(data / "minilm" / "model.pt") in cmds["fp32"]
    cmp = out["compare"]
    assert cmp["outputs_compared"] > 0 and cmp["integers_equal_device_cpu"] and cmp["integers_equal_engine_cpu"]
    assert cmp["logits_equal_engine_cpu"] and cmp["logits_max_abs_diff_device_cpu"] == 0.0


def test_refusals_are_one_error_line(tmp_path):
    proc = _run("--data-dir", str(_fake_assets(tmp_path / "data")))  # no CUDA visible, no --dry-run
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: CUDA is not available")
    assert "Traceback" not in proc.stderr
    proc = _run("--dry-run", "--require-assets", "--data-dir", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: missing pretrained asset")
    proc = _run("--dry-run", "--qat-updates", "5")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --qat-updates must exceed")


def test_device_comparison_reports_a_differing_module():
    """The comparison is not vacuous: a QuantAct range changed on one side shows up as differing integers."""
    d = mh.make_dictionary()
    model = mh.calibrate(mh.build_model("ibert_roberta_tiny", d, extra=["--quant-mode", "symmetric"]),
                         [mh.random_batch(d, seed=1)])
    other = copy.deepcopy(model)
    tokens = mh.random_batch(d, seed=2)
    bad, n, la, lb = qat_compare.compare_devices(model, other, tokens)
    assert not bad and n == 2 + 2 * len(qat_compare.HOOKED) and torch.equal(la, lb)
    with torch.no_grad():
        other.encoder.sentence_encoder.layers[1].fc1_act.x_max.mul_(1.5)
    bad, _, la, lb = qat_compare.compare_devices(model, other, tokens)
    assert "layers.1.fc1_act" in bad and "layers.0.fc1_act" not in bad and not torch.equal(la, lb)
