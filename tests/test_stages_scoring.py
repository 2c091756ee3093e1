"""The stage runner and the scoring of ``ibert_plugin.recipes`` (what the demo and the benchmarks share): schedule
arithmetic, reuse of finished stages, the label reader, the dev curve and the score cache. No training runs here."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from ibert_plugin.recipes import execute, options, scoring, stages


def _flag(argv, name):
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------------------------------------- schedule arithmetic
def test_schedule_flags_fit_the_lr_schedule_and_validate_mid_run():
    flags = stages.schedule_flags(536, 0.1, 134)
    assert flags == ["--max-update", "536", "--", "--total-num-update", "536", "--warmup-updates", "53",
                     "--log-interval", "10", "--validate-interval-updates", "134", "--save-interval-updates", "134",
                     "--keep-interval-updates", "1"]
    # run.py's own flags come before "--", fairseq's after it
    assert flags.index("--max-update") < flags.index("--") < flags.index("--total-num-update")


@pytest.mark.parametrize("updates, validate_every, log_interval", [(8, None, 1), (30, 134, 6), (134, 134, 10)])
def test_schedule_flags_without_mid_run_validation(updates, validate_every, log_interval):
    flags = stages.schedule_flags(updates, 0.0, validate_every)
    assert "--validate-interval-updates" not in flags and "--save-interval-updates" not in flags
    assert _flag(flags, "--warmup-updates") == "0" and _flag(flags, "--log-interval") == str(log_interval)


@pytest.mark.parametrize("updates, validate_every, per_epoch, expected", [
    (536, 134, 268, 4),   # 134, 268 (also an epoch end), 402, 536 (also the last update): each counted once
    (600, 250, 268, 5),   # 250, 268, 500, 536, 600
    (134, 134, 268, 1),   # validate_every not below updates: only the last update
    (40, None, 268, 1),
    (300, None, 100, 3),  # epoch ends 100, 200, 300 of another task
    (300, 75, 100, 6),    # 75, 100, 150, 200, 225, 300
])
def test_validation_count(updates, validate_every, per_epoch, expected):
    assert stages.validation_count(updates, validate_every, per_epoch) == expected


def test_stage_estimate_is_the_cost_model():
    fixed, per_update, per_val = stages.COST["ternary"]
    st = stages.Stage("t", "ternary", "ternary", 100, 3)
    assert st.estimate() == pytest.approx(fixed + 100 * per_update + 3 * per_val + stages.SCORE_S["ternary"])
    assert st.argv == []  # a list of its own per stage
    assert stages.Stage("u", "u", "fp", 1, 1).argv is not st.argv


# ----------------------------------------------------------------------------------------------- the stage runner
def _fake_run_main(tmp_path, calls, returncode=0):
    def main(argv):
        calls.append(list(argv))
        ckpt = tmp_path / f"ckpt{len(calls)}.pt"
        ckpt.write_bytes(b"x")
        return SimpleNamespace(returncode=returncode, checkpoint=str(ckpt), packed_model=None, best=81.5,
                               metric="accuracy", log_path=str(tmp_path / "run.log"),
                               summary=lambda: f"best {ckpt}")
    return main


def test_run_stage_records_a_finished_stage_and_reuses_it(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(execute, "main", _fake_run_main(tmp_path, calls))
    st = stages.Stage("fp", "FP fine-tuning", "fp", 10, 1, ["--task", "RT-SENT", "--max-update", "10"])
    state = tmp_path / "state" / "demo_state.json"
    progress = stages.Progress(tmp_path, interval=3600)
    first = stages.run_stage(st, state, False, progress, 0.0)
    assert calls == [st.argv] and first.stage_seconds >= 0
    record = json.loads(state.read_text())["--task RT-SENT --max-update 10"]
    assert record["checkpoint"] == first.checkpoint and record["best"] == 81.5 and record["packed_model"] is None
    again = stages.run_stage(st, state, False, progress, 0.0)
    assert len(calls) == 1 and isinstance(again, stages.Done)
    assert (again.checkpoint, again.best, again.metric) == (first.checkpoint, 81.5, "accuracy")
    assert again.summary() == f"reusing {first.checkpoint} (best dev accuracy = 81.5)"
    assert f"[demo] FP fine-tuning: reusing {first.checkpoint}" in capsys.readouterr().out
    stages.run_stage(st, state, True, progress, 0.0)  # fresh: trained again
    assert len(calls) == 2
    Path(json.loads(state.read_text())[" ".join(st.argv)]["checkpoint"]).unlink()  # its checkpoint is gone
    assert not isinstance(stages.run_stage(st, state, False, progress, 0.0), stages.Done) and len(calls) == 3
    other = stages.Stage("fp", "FP fine-tuning", "fp", 10, 1, [*st.argv, "--lr", "1e-4"])  # other argv: trained
    stages.run_stage(other, state, False, progress, 0.0)
    assert len(calls) == 4 and len(json.loads(state.read_text())) == 2


def test_run_stage_errors_name_the_stage(tmp_path, monkeypatch):
    st = stages.Stage("w8", "I-BERT W8A8 QAT", "qat", 5, 1, ["--x"])
    progress = stages.Progress(tmp_path, interval=3600)
    monkeypatch.setattr(execute, "main", _fake_run_main(tmp_path, [], returncode=1))
    with pytest.raises(stages.StageError, match=r"I-BERT W8A8 QAT failed \(exit 1\); see .*run.log"):
        stages.run_stage(st, tmp_path / "state.json", False, progress, 0.0)

    def refuse(argv):
        raise options.RunError("--restore-file x: not found")

    monkeypatch.setattr(execute, "main", refuse)
    with pytest.raises(stages.StageError, match="^I-BERT W8A8 QAT: --restore-file x: not found$"):
        stages.run_stage(st, tmp_path / "state.json", False, progress, 0.0)
    assert not (tmp_path / "state.json").exists()  # nothing recorded for a failed stage


# ------------------------------------------------------------------------------------------------------- scoring
class _LabelDict:
    """The three things test_labels asks of a fairseq label dictionary."""

    nspecial = 4
    symbols = ["<s>", "<pad>", "</s>", "<unk>", "0", "1"]

    def index(self, sym):
        return self.symbols.index(sym) if sym in self.symbols else self.unk()

    def unk(self):
        return 3


def test_test_labels_are_class_indices_in_file_order(tmp_path):
    task = tmp_path / "RT-SENT"
    task.mkdir()
    (task / "test_with_labels.tsv").write_text("sentence\tlabel\na fine film\t1\na dull one\t0\nmore of it\t1\n")
    assert scoring.test_labels(tmp_path, "RT-SENT", _LabelDict()) == [1, 0, 1]
    only_zero = _LabelDict()
    only_zero.symbols = only_zero.symbols[:5]  # a label dictionary of another data set, without "1"
    with pytest.raises(stages.StageError, match=r"test_with_labels.tsv: label '1' \(row 1\) is not in the label"):
        scoring.test_labels(tmp_path, "RT-SENT", only_zero)


def test_dev_curve_reads_only_the_valid_subset_lines_with_accuracy_and_updates():
    log = "\n".join([
        "epoch 001:     10 / 268 loss=1.0, accuracy=45.9, num_updates=10, lr=9e-05",  # a training line
        "epoch 001 | valid on 'valid' subset | loss 0.5 | accuracy 80.1 | wps 0 | num_updates 134",
        "epoch 001 | valid on 'test' subset | loss 0.5 | accuracy 99.0 | wps 0 | num_updates 134",
        "epoch 001 | valid on 'valid' subset | loss 0.5 | mcc 40.2 | wps 0 | num_updates 200",  # no accuracy
        "epoch 002 | valid on 'valid' subset | loss 0.4 | accuracy 79.25 | num_updates 268 | best_accuracy 80.1",
    ])
    assert scoring.dev_curve(log) == [(134, 80.1), (268, 79.25)]
    assert scoring.dev_curve("") == []


def test_cached_scores_are_keyed_by_checkpoint_path_and_mtime(tmp_path, monkeypatch):
    calls = []

    def fake_score(checkpoint, data_bin, glue_dir, task):
        calls.append((checkpoint, data_bin, glue_dir, task))
        return {"test": [1, 0, len(calls) % 2]}

    monkeypatch.setattr(scoring, "score_checkpoint", fake_score)
    ckpt, cache = tmp_path / "checkpoint_best.pt", tmp_path / "scores.json"
    ckpt.write_bytes(b"weights")
    os.utime(ckpt, ns=(1_000_000_000, 1_000_000_000))
    first = scoring.cached_scores(ckpt, tmp_path / "bin", tmp_path / "glue", "RT-SENT", cache)
    assert first == {"test": [1, 0, 1]} and calls == [(ckpt, tmp_path / "bin", tmp_path / "glue", "RT-SENT")]
    assert json.loads(cache.read_text()) == {f"{ckpt}:1000000000": {"test": [1, 0, 1]}}
    assert scoring.cached_scores(ckpt, tmp_path / "bin", tmp_path / "glue", "RT-SENT", cache) == first
    assert len(calls) == 1  # same path, same mtime: read from the cache file
    os.utime(ckpt, ns=(2_000_000_000, 2_000_000_000))  # rewritten in place: scored again, both entries kept
    assert scoring.cached_scores(ckpt, tmp_path / "bin", tmp_path / "glue", "RT-SENT", cache) == {"test": [1, 0, 0]}
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2
    other = tmp_path / "other.pt"
    other.write_bytes(b"w")
    os.utime(other, ns=(2_000_000_000, 2_000_000_000))
    scoring.cached_scores(other, tmp_path / "bin", tmp_path / "glue", "RT-SENT", cache)
    assert len(calls) == 3  # another path with the same mtime is another model


def test_shipped_files_are_rewritten_only_when_older_than_the_checkpoint(tmp_path, monkeypatch):
    runs = []

    def fake_run(cmd, what):  # stands for python -m ibert_plugin.export
        runs.append(cmd)
        Path(cmd[cmd.index("--output") + 1]).write_bytes(b"p" * 2500)

    monkeypatch.setattr(scoring, "run_command", fake_run)
    ckpt, packed = tmp_path / "checkpoint_best.pt", tmp_path / "model_packed.pt"
    ckpt.write_bytes(b"c")
    assert scoring.export_packed(ckpt, packed) == packed and len(runs) == 1
    assert runs[0][1:] == ["-m", "ibert_plugin.export", "--checkpoint", str(ckpt), "--output", str(packed),
                           "--omit-lm-head"]
    assert scoring.size_mb(packed) == 0.0025
    scoring.export_packed(ckpt, packed)
    assert len(runs) == 1  # newer than the checkpoint: reused
    os.utime(ckpt, (packed.stat().st_mtime + 10,) * 2)
    scoring.export_packed(ckpt, packed)
    assert len(runs) == 2
