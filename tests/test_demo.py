"""The demo's plan (stages, schedules, time budget), its log parsing and its refusal of bad flags before any work."""
import subprocess
import sys

import pytest

from ibert_plugin import demo


def _args(*argv):
    a = demo._parser().parse_args(list(argv))
    demo._defaults(a)
    return a


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_default_plan_has_every_row_and_fits_the_hour():
    a = _args()
    stages = {s.key: s for s in demo.plan(a, [])}
    assert list(stages) == ["fp", "w8", "w7", "tern_twn", "int_tern"]
    fp = stages["fp"].argv
    assert _flag(fp, "--max-update") == "536" and _flag(fp, "--validate-interval-updates") == "134"
    assert _flag(fp, "--save-interval-updates") == "134"  # best-on-dev can come from mid-epoch
    assert stages["fp"].validations == 4
    assert _flag(stages["w7"].argv, "--weight-bits") == "7" and _flag(stages["w7"].argv, "--restore-file") == "<fp>"
    tern, itern = stages["tern_twn"].argv, stages["int_tern"].argv
    assert _flag(tern, "--quant-mode") == "ternarybert" and "--intermediate-distill" in tern
    # integer-only ternary: a short symmetric-mode QAT stage that starts from the TernaryBERT checkpoint
    assert _flag(itern, "--quant-mode") == "symmetric" and _flag(itern, "--weight-bits") == "2"
    assert _flag(itern, "--restore-file") == "<ternary>" and stages["int_tern"].updates == 134
    assert demo.estimate_seconds(a) <= 55 * 60


def test_quick_plan_is_a_short_smoke_run():
    a = _args("--quick")
    stages = demo.plan(a, [])
    assert len(stages) == 5 and all(s.updates <= 40 and s.validations == 1 for s in stages)
    assert all("--validate-interval-updates" not in s.argv for s in stages)
    assert a.batch_sizes == [8] and a.output_dir.endswith("demo_quick")
    assert demo.estimate_seconds(a) <= 11 * 60


def test_skips_and_methods_shape_the_plan():
    keys = [s.key for s in demo.plan(_args("--ternary-methods", "lat,twn", "--skip-w7"), [])]
    assert keys == ["fp", "w8", "tern_lat", "tern_twn", "int_tern"]
    itern = demo.plan(_args("--ternary-methods", "lat,twn"), [])[-1].argv
    assert _flag(itern, "--weight-quant-method") == "lat"
    assert [s.key for s in demo.plan(_args("--skip-ternary"), [])] == ["fp", "w8", "w7"]


@pytest.mark.parametrize("argv, needle", [
    (["--ternary-methods", "abc"], "unknown ternary method 'abc'"),
    (["--ternary-methods", ","], "--ternary-methods is empty"),
    (["--fp-updates", "0"], "--fp-updates must be at least 1"),
    (["--engine-batch-sizes", "8,x"], "--engine-batch-sizes must be comma-separated integers"),
    (["--engine-batch-sizes", "0"], "--engine-batch-sizes must be positive"),
])
def test_bad_flags_are_refused_before_any_work(argv, needle):
    with pytest.raises(demo.DemoError, match=needle):
        _args(*argv)


def test_cli_prints_one_error_line():
    p = subprocess.run([sys.executable, "-m", "ibert_plugin.demo", "--ternary-methods", "xyz"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip() == "error: unknown ternary method 'xyz' (choose twn, lat)"


def test_log_parsing():
    log = "\n".join([
        "epoch 001:     10 / 268 loss=1.0, accuracy=45.9, num_updates=10, lr=9e-05",
        "epoch 001 | valid on 'valid' subset | loss 0.5 | accuracy 80.1 | wps 0 | num_updates 134 | best_accuracy 80.1",
        "epoch 001 | valid on 'valid' subset | loss 0.4 | accuracy 81.9 | wps 0 | num_updates 268 | best_accuracy 81.9",
        "epoch 002:     20 / 268 loss=0.9, num_updates=288, lr=8e-05",
    ])
    assert demo.dev_curve(log) == [(134, 80.1), (268, 81.9)]
    assert demo.Progress.updates_in(log) == 288
    assert demo.Progress.updates_in("no updates yet") is None
