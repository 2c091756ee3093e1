"""The one task table and the one architecture table (ibert_plugin/catalog.py) and the views its users take of it."""
from __future__ import annotations

from pathlib import Path

from ibert_plugin.assets import glue
from ibert_plugin.catalog import ARCHS, GLUE_TASKS, REPO, SQUAD_TASKS, TASKS
from ibert_plugin.recipes import squad as recipe


def test_glue_and_squad_tasks_split_the_table():
    assert list(GLUE_TASKS) + list(SQUAD_TASKS) == list(TASKS)
    assert set(SQUAD_TASKS) == {"SQUAD1", "SQUAD2"} and all(t.fairseq_task == "squad" for t in SQUAD_TASKS.values())
    assert all(t.fairseq_task == "sentence_prediction" for t in GLUE_TASKS.values())
    assert [n for n, t in SQUAD_TASKS.items() if t.version_2_with_negative] == ["SQUAD2"]


def test_heads_follow_the_label_sets():
    classes = {n: t.num_classes for n, t in GLUE_TASKS.items()}
    assert classes == {"RTE": 2, "SST-2": 2, "MNLI": 3, "QNLI": 2, "CoLA": 2, "QQP": 2, "MRPC": 2, "STS-B": 1,
                       "RT-SENT": 2, "BOOLQ": 2}
    assert [n for n, t in TASKS.items() if t.regression] == ["STS-B"]


def test_preprocessing_covers_every_glue_task_and_no_squad_task():
    assert sorted(glue.ALL_ORDER) == sorted(GLUE_TASKS) and glue.TASKS is GLUE_TASKS
    assert not set(SQUAD_TASKS) & set(glue.TASKS)


def test_squad_report_files_come_from_the_table():
    assert recipe.REPORT_FILES == {"SQUAD1": {"test": ("test_subset.json", "test.json")},
                                   "SQUAD2": {"test": ("test.json", "test.json"),
                                              "test_disfluent": ("test_disfluent.json", "test_disfluent.json")}}


def test_arch_paths_resolve_against_the_repository_or_the_model_dir(tmp_path):
    minilm = ARCHS["minilm"]
    assert minilm.tokenizer_path() == REPO / "data" / "minilm"
    assert minilm.pretrained_paths(tmp_path) == [REPO / "data" / "minilm" / "model.pt",
                                                 tmp_path / "minilm" / "model.pt"]
    assert ARCHS["roberta_base"].pretrained_paths(Path("m")) == [Path("m") / "roberta.base" / "model.pt"]
    assert ARCHS["tiny"].pretrained_paths(tmp_path) == []
    assert {a.size for a in ARCHS.values()} == {"base", "large", "minilm", "tiny"}


def test_every_arch_is_registered_with_fairseq():
    from fairseq.models import ARCH_MODEL_REGISTRY

    import ibert_plugin.models  # noqa: F401  (registers the architectures)

    assert all(a.fairseq_arch in ARCH_MODEL_REGISTRY for a in ARCHS.values())
