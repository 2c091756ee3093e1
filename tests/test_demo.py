"""The demo's plan (stages, schedules, time budget), its log parsing and its refusal of bad flags before any work."""
import io
import subprocess
import sys

import pytest

from ibert_plugin import demo
from ibert_plugin.recipes import scoring, stages

pytestmark = pytest.mark.slow  # whole pipelines / subprocesses: `make test-fast` leaves them out


def _args(*argv):
    a = demo.build_parser().parse_args(list(argv))
    demo.set_defaults(a)
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
    assert scoring.dev_curve(log) == [(134, 80.1), (268, 81.9)]
    assert stages.Progress.updates_in(log) == 288
    assert stages.Progress.updates_in("no updates yet") is None


def test_progress_bar_shows_fraction_and_unknown():
    assert demo.bar(0.35, width=20) == "[#######.............]  35%"
    assert demo.bar(1.5, width=4) == "[####] 100%"  # clamped
    assert demo.bar(None, width=4) == "[....]   ?%"


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_console_on_a_pipe_prints_a_line_when_the_bar_moves_and_every_final_one():
    s = _Stream(tty=False)
    con = demo.Console(s, interval=3600)
    con.progress("[1/2] fp", 0.1, "1/10 updates, ~5 min left")
    con.progress("[1/2] fp", 0.1, "1/10 updates, ~4 min left")  # same bar, within the interval: not printed
    con.progress("[1/2] fp", 0.5, "5/10 updates")
    con.done("[1/2] fp", "10/10 updates   log: x.log")
    lines = s.getvalue().splitlines()
    assert lines == ["[1/2] fp [##..................]  10% 1/10 updates, ~5 min left",
                     "[1/2] fp [##########..........]  50% 5/10 updates",
                     "[1/2] fp [####################] 100% 10/10 updates   log: x.log"]
    assert "\r" not in s.getvalue()
    quiet = _Stream(tty=False)
    con = demo.Console(quiet, interval=0)  # after `interval` seconds an unchanged bar is printed again
    con.progress("[1/2] fp", 0.1, "a")
    con.progress("[1/2] fp", 0.1, "b")
    assert quiet.getvalue().splitlines()[-1].endswith(" b")


def test_console_on_a_terminal_redraws_one_line_per_stage():
    s = _Stream(tty=True)
    con = demo.Console(s, interval=3600)
    con.progress("[1/2] fp", 0.1, "a")
    con.progress("[1/2] fp", 0.5, "b")
    con.done("[1/2] fp", "c")
    con.line("table")
    text = s.getvalue()
    assert text.count("\n") == 2 and text.count("\r") == 3  # redraws in place; one newline per finished stage
    assert text.endswith("c\ntable\n")


@pytest.mark.parametrize("verbose", [False, True])
def test_stage_output_goes_to_the_log_and_with_verbose_also_to_the_terminal(tmp_path, verbose):
    term = io.StringIO()
    log = tmp_path / "logs" / "stage.log"
    with stages.stage_output(log, verbose, term):
        print("python line")
        print("python warning", file=sys.stderr)
        sys.stdout.buffer.write(b"raw fairseq bytes\n")  # how run.py tees fairseq's output
        stages.run_command([sys.executable, "-c",
                            "import sys; print('child out'); print('child err', file=sys.stderr)"], "child")
    text = log.read_text()
    for needle in ("python line", "python warning", "raw fairseq bytes", "child out", "child err"):
        assert needle in text
        assert (needle in term.getvalue()) == verbose


def test_a_logging_handler_made_inside_a_stage_outlives_its_log_file(tmp_path, capsys):
    """fairseq configures logging on its first import, which may happen inside a stage (in-process scoring): its
    handler then holds the stage's sink. After the stage it writes to the outer standard error, not to the closed log
    file ("--- Logging error ---" on every record)."""
    import logging

    lg = logging.getLogger("test_stage_handler")
    lg.propagate = False
    with stages.stage_output(tmp_path / "s.log", False, io.StringIO()):
        h = logging.StreamHandler(sys.stdout)
        lg.addHandler(h)
        lg.warning("inside the stage")
    try:
        lg.warning("after the stage")
    finally:
        lg.removeHandler(h)
    err = capsys.readouterr().err
    assert "after the stage" in err and "Logging error" not in err
    assert "inside the stage" in (tmp_path / "s.log").read_text()


def test_a_failing_child_is_a_demo_error(tmp_path):
    with stages.stage_output(tmp_path / "x.log", False, io.StringIO()):
        with pytest.raises(demo.DemoError, match="child failed with exit code 3"):
            stages.run_command([sys.executable, "-c", "raise SystemExit(3)"], "child")


def test_table_goes_to_the_given_stream():
    s = io.StringIO()
    rows = [dict(precision="FP32", dev_acc=85.2, test_acc=84.7, size_mb=91.6, wall_s=10.0),
            dict(precision="W7A8", dev_acc=84.6, test_acc=84.4, size_mb=23.4, wall_s=5.0,
                 gap=dict(gap=-0.3, low=-1.6, high=1.0, significant=False),
                 engine={"8": dict(dev_acc=84.6, speedup=1.97)})]
    demo.print_table(rows, 60.0, False, [(134, 82.4)], stream=s)
    text = s.getvalue()
    assert "-0.30 [-1.60, +1.00] noise" in text and "b8: 84.60 = QAT, 1.97x" in text
    assert "FP dev accuracy by update: 134: 82.40" in text and "total wall time 1.0 min" in text
