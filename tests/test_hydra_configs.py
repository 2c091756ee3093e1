"""configs/*.yaml are generated from the one task table (ibert_plugin/catalog.py) and match it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ibert_plugin.catalog import GLUE_TASKS as TASKS
from ibert_plugin.recipes.hydra_configs import CONFIG_DIR, config_name, generate

REPO = Path(__file__).resolve().parents[1]


def test_checked_in_configs_are_the_generated_ones():
    files = generate()
    assert sorted(files) == sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    for name, text in files.items():
        assert (CONFIG_DIR / name).read_text() == text, f"{name} is stale: python -m ibert_plugin.recipes.hydra_configs"


def test_generated_configs_carry_the_table():
    for task, spec in TASKS.items():
        cfg = yaml.safe_load(generate()[f"{config_name(task)}.yaml"])
        assert cfg["task"]["num_classes"] == spec.num_classes
        assert [float(v) for v in cfg["optimization"]["lr"]] == [spec.lr]
        assert cfg["optimization"]["max_epoch"] == spec.max_epoch
        assert cfg["dataset"]["batch_size"] == spec.bs and cfg["dataset"]["valid_subset"] == spec.valid_subset
        assert cfg["lr_scheduler"]["total_num_update"] == spec.total_updates
        assert cfg["lr_scheduler"]["warmup_updates"] == spec.warmup
        assert cfg["checkpoint"]["best_checkpoint_metric"] == spec.metric
        assert cfg["criterion"].get("regression_target", False) == spec.regression
        assert cfg["dataset"].get("validate_interval_updates") == spec.validate_interval_updates(spec.bs)


@pytest.mark.slow
def test_check_mode_reports_a_stale_file(tmp_path):
    cmd = [sys.executable, "-m", "ibert_plugin.recipes.hydra_configs", "--out", str(tmp_path)]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    assert subprocess.run(cmd + ["--check"], cwd=REPO, capture_output=True).returncode == 0
    (tmp_path / "rte.yaml").write_text((tmp_path / "rte.yaml").read_text().replace("lr: [2e-05]", "lr: [3e-05]"))
    p = subprocess.run(cmd + ["--check"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip() == ("error: configs out of date: rte.yaml (run python -m "
                                                      "ibert_plugin.recipes.hydra_configs)")
