"""Shared test fixtures: a tiny GLUE-like sentence-pair dataset binarised with fairseq-preprocess.

``tiny_glue`` (session scope) returns a folder laid out like ``data/glue-bin``: ``RTE-bin`` is a real binarised
dataset (whitespace tokens ``w0..w99``, ``--srcdict``, integer labels ``0``/``1`` so fairseq's GLUE metrics work);
every other task name (``MRPC-bin``, ``STS-B-bin``, ...) is a symlink to it, enough for dry runs. The label depends on
the first token of ``input0`` so a tiny model can learn it.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TASK_NAMES = ("RTE", "SST-2", "MNLI", "QNLI", "CoLA", "QQP", "MRPC", "STS-B", "RT-SENT", "BOOLQ")
VOCAB = [f"w{i}" for i in range(100)]


def _write_split(raw: Path, split: str, n: int, rng: random.Random) -> None:
    with open(raw / f"{split}.input0", "w") as a, open(raw / f"{split}.input1", "w") as b, \
            open(raw / f"{split}.label", "w") as y:
        for _ in range(n):
            first = rng.randrange(100)
            s0 = [f"w{first}"] + rng.choices(VOCAB, k=rng.randint(3, 10))
            s1 = rng.choices(VOCAB, k=rng.randint(3, 10))
            a.write(" ".join(s0) + "\n")
            b.write(" ".join(s1) + "\n")
            y.write(("1" if first < 50 else "0") + "\n")


def binarise_tiny_glue(root: Path, n_train: int = 256, n_valid: int = 48, seed: int = 0) -> Path:
    """Create ``root/RTE-bin`` (plus raw text under ``root/raw``) and return ``root/RTE-bin``."""
    from fairseq import options
    from fairseq_cli import preprocess

    rng = random.Random(seed)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    _write_split(raw, "train", n_train, rng)
    _write_split(raw, "valid", n_valid, rng)
    _write_split(raw, "test", n_valid, rng)
    srcdict = raw / "dict.txt"
    srcdict.write_text("".join(f"{w} {1000 - i}\n" for i, w in enumerate(VOCAB)))
    out = root / "RTE-bin"
    for field in ("input0", "input1", "label"):
        argv = ["--only-source", "--trainpref", str(raw / f"train.{field}"),
                "--validpref", str(raw / f"valid.{field}"), "--destdir", str(out / field), "--workers", "1"]
        if field != "label":
            argv += ["--testpref", str(raw / f"test.{field}"), "--srcdict", str(srcdict)]
        args = options.get_preprocessing_parser().parse_args(argv)
        preprocess.main(args)
    return out


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory) -> Path:
    """Folder with ``<TASK>-bin`` for every task name (``RTE-bin`` real, the rest symlinks to it)."""
    root = tmp_path_factory.mktemp("glue-bin")
    rte = binarise_tiny_glue(root)
    for name in TASK_NAMES:
        if name != "RTE":
            os.symlink(rte, root / f"{name}-bin")
    return root


@pytest.fixture()
def run_env(monkeypatch):
    """Environment for driver subprocesses: one BLAS thread, the repo importable."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return dict(os.environ)
