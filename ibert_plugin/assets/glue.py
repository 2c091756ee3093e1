"""GLUE-style preprocessing into fairseq binaries (an offline, checked port of fairseq's
``examples/roberta/preprocess_GLUE_tasks.sh``).

Usage::

    python -m ibert_plugin.assets.glue GLUE_DIR TASK|ALL [--bpe gpt2|wordpiece] [--bpe-dir DIR] [--out DIR]
                                       [--data-dir D] [--workers 1]

For each task it reads ``GLUE_DIR/<TASK>/{train,dev,test}.tsv`` (MNLI: ``dev_matched``, ``dev_mismatched``,
``test_matched``, ``test_mismatched``), cuts the input/label columns exactly as fairseq's script does (layouts in
the task table, :data:`ibert_plugin.catalog.TASKS`), BPE-encodes the inputs with LOCAL files and runs fairseq's
preprocessing (``fairseq_cli.preprocess.main``, i.e. ``fairseq-preprocess`` of the running venv, called in-process so
the three calls share one import) into ``<out>/<TASK>-bin/{input0,input1,label}``:

* ``--bpe gpt2`` (default, as fairseq's script): GPT-2 BPE from ``--bpe-dir`` (default ``<data>/gpt2_bpe``:
  ``encoder.json``, ``vocab.bpe``, ``dict.txt`` from ``python -m ibert_plugin.assets build --only bpe``).
* ``--bpe wordpiece``: WordPiece from ``--bpe-dir`` (default ``<data>/minilm``: ``tokenizer.json`` or
  ``vocab.txt`` and the importer's ``dict.txt``), for the imported MiniLM checkpoint.

``--out`` defaults to ``<data>/glue-bin/<bpe>`` (``gpt2`` or ``wordpiece``); BPE-encoded text goes to
``<out>/<TASK>-processed``. Labels: a label dictionary built from train (dev labels must occur in train);
STS-B is regression, its scores are written divided by 5 as plain text to ``label/{train,valid}.label`` as
fairseq's script does. MNLI dev/test matched/mismatched become ``valid``/``valid1`` and ``test``/``test1``.

Every input file is validated before anything is written (column count, label set; QQP train/dev rows with the
wrong field count are dropped as fairseq's ``awk NF==6`` does, and counted). Any problem -- unknown task,
missing folder or file, malformed row -- is one ``error: <file>:<line>: ...`` line and exit status 2; the
``<TASK>-bin`` folder is built in a temp dir and renamed into place, so a failure never leaves a partial one.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..catalog import GLUE_TASKS, TaskSpec
from .common import AssetError, data_dir, decode_utf8, log

#: The GLUE-format tasks of the one task table (:data:`ibert_plugin.catalog.TASKS`), with their column layouts.
TASKS: Dict[str, TaskSpec] = GLUE_TASKS
#: Order used by ``ALL`` (fairseq's eight GLUE tasks, then the offline ones): every task of :data:`TASKS`.
ALL_ORDER = ("QQP", "MNLI", "QNLI", "MRPC", "RTE", "STS-B", "SST-2", "CoLA", "RT-SENT", "BOOLQ")


# --------------------------------------------------------------------------------------------- reading
def _utf8_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (universal newlines, line ends kept); a binary file or one in another
    encoding is one AssetError naming the file, line and byte offset (never a UnicodeDecodeError traceback)."""
    text = decode_utf8(path.read_bytes(), str(path))
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise AssetError(f"{path}:{line}: binary data (a NUL byte), not a TSV text file")
    yield from enumerate(io.StringIO(text, newline=""), 1)


def read_split(path: Path, spec: TaskSpec, kind: str) -> Tuple[List[List[str]], Optional[List[str]], int]:
    """Read and validate one split.

    Args:
        path: The ``.tsv`` file.
        spec: Task layout.
        kind: ``train``, ``dev`` or ``test``.

    Returns:
        (input columns per row, labels or None for test, number of dropped rows).

    Raises:
        AssetError: missing file or malformed row, naming ``file:line``.
    """
    if not path.is_file():
        raise AssetError(f"{path}: file not found")
    if kind == "test":
        cols, nfields, label_col = spec.test_inputs, spec.test_nfields, None
    elif kind == "dev":
        cols, nfields = spec.inputs, spec.dev_nfields or spec.nfields
        label_col = spec.dev_label or spec.label
    else:
        cols, nfields, label_col = spec.inputs, spec.nfields, spec.label
    # CoLA's test.tsv has a header although train/dev do not.
    skip_header = spec.header or kind == "test"
    inputs: List[List[str]] = [[] for _ in cols]
    labels: Optional[List[str]] = [] if label_col else None
    dropped = 0
    for n, line in _utf8_lines(path):
        if n == 1 and skip_header:
            continue
        line = line.rstrip("\n").rstrip("\r")  # tolerate CRLF files
        if not line.strip():
            continue  # trailing blank lines
        fields = line.split("\t")
        if len(fields) != nfields:
            if spec.drop_bad_rows and kind != "test":
                dropped += 1
                continue
            raise AssetError(f"{path}:{n}: expected {nfields} tab-separated fields, got {len(fields)}")
        for i, c in enumerate(cols):
            inputs[i].append(fields[c - 1])
        if labels is not None:
            lab = fields[label_col - 1].strip()
            if spec.labels is None:
                try:
                    v = float(lab)
                except ValueError:
                    raise AssetError(f"{path}:{n}: bad regression label {lab!r}") from None
                if not 0.0 <= v <= 5.0:
                    raise AssetError(f"{path}:{n}: regression label {lab!r} outside [0, 5]")
            elif lab not in spec.labels:
                raise AssetError(f"{path}:{n}: bad label {lab!r} (expected one of {sorted(spec.labels)})")
            labels.append(lab)
    if not inputs[0]:
        raise AssetError(f"{path}: no data rows")
    return inputs, labels, dropped


# --------------------------------------------------------------------------------------------- BPE
class BpeEncoder:
    """Local-file BPE: ``gpt2`` (ids as fairseq's multiprocessing_bpe_encoder writes) or ``wordpiece``."""

    def __init__(self, kind: str, bpe_dir: Path):
        self.kind = kind
        if kind == "gpt2":
            enc, voc = bpe_dir / "encoder.json", bpe_dir / "vocab.bpe"
            for p in (enc, voc):
                if not p.is_file():
                    raise AssetError(f"{p}: not found (run: python -m ibert_plugin.assets build --only bpe)")
            from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

            self._gpt2 = get_encoder(str(enc), str(voc))
        elif kind == "wordpiece":
            from .wordpiece_bpe import load_wordpiece_tokenizer

            if not any((bpe_dir / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
                raise AssetError(f"{bpe_dir}: no tokenizer.json or vocab.txt "
                                 "(run: python -m ibert_plugin.assets build --only minilm)")
            self._wp = load_wordpiece_tokenizer(str(bpe_dir))
        else:
            raise AssetError(f"unknown --bpe {kind!r} (gpt2 or wordpiece)")

    def encode_all(self, texts: Sequence[str]) -> List[str]:
        """BPE-encode a column; the GPT-2 path strips like multiprocessing_bpe_encoder (``line.strip()``)."""
        if self.kind == "gpt2":
            return [" ".join(map(str, self._gpt2.encode(t.strip()))) for t in texts]
        return [" ".join(e.tokens) for e in self._wp.encode_batch(list(texts), add_special_tokens=False)]


# --------------------------------------------------------------------------------------------- fairseq
def _fairseq_preprocess(argv: List[str]) -> None:
    """Run fairseq-preprocess in-process (same code as the console script of this venv)."""
    from fairseq import options
    from fairseq_cli import preprocess

    args = options.get_preprocessing_parser().parse_args(argv)
    before = list(preprocess.logger.handlers)
    try:
        preprocess.main(args)
    finally:
        # fairseq adds a FileHandler per call; drop it so later calls do not log into this destdir.
        for h in preprocess.logger.handlers[:]:
            if h not in before:
                preprocess.logger.removeHandler(h)
                h.close()


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for ln in lines:
            f.write(ln + "\n")


def preprocess_task(glue_dir: Path, task: str, encoder: BpeEncoder, dict_txt: Path, out: Path,
                    workers: int = 1) -> Dict:
    """Validate, BPE-encode and binarize one task into ``out/<task>-bin``. Returns counts."""
    spec = TASKS[task]
    tdir = glue_dir / task
    if not tdir.is_dir():
        raise AssetError(f"{tdir}: task folder not found")
    t0 = time.time()
    # 1. Read + validate every split first: nothing is written unless the whole task is well formed.
    splits = [("train", "train")] + [(s, "dev") for s in spec.dev_splits] + [(s, "test") for s in spec.test_splits]
    data = {}
    for name, kind in splits:
        inputs, labels, dropped = read_split(tdir / f"{name}.tsv", spec, kind)
        data[name] = (inputs, labels)
        if dropped:
            log(f"{task}/{name}.tsv: dropped {dropped} rows with a wrong field count (as fairseq's script does)")
    if spec.labels is not None:
        train_labels = set(data["train"][1])
        for s in spec.dev_splits:
            extra = set(data[s][1]) - train_labels
            if extra:
                raise AssetError(f"{tdir / (s + '.tsv')}: labels {sorted(extra)} never occur in train.tsv")

    # 2. BPE into <out>/<task>-processed (kept for inspection, like fairseq's processed/ folder).
    proc = out / f"{task}-processed"
    if proc.exists():
        shutil.rmtree(proc)
    proc.mkdir(parents=True)
    n_in = len(spec.inputs)
    for name, (inputs, labels) in data.items():
        for i in range(n_in):
            _write_lines(proc / f"{name}.input{i}", encoder.encode_all(inputs[i]))
        if labels is not None:
            _write_lines(proc / f"{name}.label", labels)

    # 3. fairseq-preprocess into a temp dir, then swap it in.
    final, tmp = out / f"{task}-bin", out / f".{task}-bin.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        dev = ",".join(str(proc / f"{s}.LANG") for s in spec.dev_splits)
        test = ",".join(str(proc / f"{s}.LANG") for s in spec.test_splits)
        for i in range(n_in):
            lang = f"input{i}"
            _fairseq_preprocess(["--only-source", "--trainpref", str(proc / f"train.{lang}"),
                                 "--validpref", dev.replace("LANG", lang), "--testpref", test.replace("LANG", lang),
                                 "--destdir", str(tmp / lang), "--workers", str(workers), "--srcdict", str(dict_txt)])
        if spec.labels is not None:
            _fairseq_preprocess(["--only-source", "--trainpref", str(proc / "train.label"),
                                 "--validpref", dev.replace("LANG", "label"), "--destdir", str(tmp / "label"),
                                 "--workers", str(workers)])
        else:
            # STS-B: fairseq's script writes `awk '{print $1 / 5.0}'` text files; %.6g matches awk's output.
            (tmp / "label").mkdir(parents=True)
            for src, dst in (("train", "train"), (spec.dev_splits[0], "valid")):
                _write_lines(tmp / "label" / f"{dst}.label", [format(float(v) / 5.0, ".6g") for v in data[src][1]])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-binarised folder left behind
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    counts = {name: len(inputs[0]) for name, (inputs, _) in data.items()}
    log(f"{task}: {counts} -> {final} ({time.time() - t0:.1f}s)")
    return counts


def run(glue_dir: Path, task: str, bpe: str = "gpt2", bpe_dir: Optional[Path] = None, out: Optional[Path] = None,
        data: Optional[Path] = None, workers: int = 1) -> Dict[str, Dict]:
    """Preprocess ``task`` (or ``ALL`` present tasks). Returns per-task split counts."""
    data = data or data_dir()
    if bpe not in ("gpt2", "wordpiece"):
        raise AssetError(f"unknown --bpe {bpe!r} (gpt2 or wordpiece)")
    if not glue_dir.is_dir():
        raise AssetError(f"{glue_dir}: GLUE directory not found")
    if task == "ALL":
        tasks = [t for t in ALL_ORDER if (glue_dir / t).is_dir()]
        missing = [t for t in ALL_ORDER if t not in tasks]
        if not tasks:
            raise AssetError(f"{glue_dir}: none of the task folders {', '.join(ALL_ORDER)} exist")
        if missing:
            log(f"ALL: not present in {glue_dir}, skipped: {', '.join(missing)}")
    elif task in TASKS:
        tasks = [task]
    else:
        raise AssetError(f"unknown task {task!r}; choose from {', '.join(ALL_ORDER)} or ALL")
    bpe_dir = Path(bpe_dir) if bpe_dir else data / ("gpt2_bpe" if bpe == "gpt2" else "minilm")
    dict_txt = bpe_dir / "dict.txt"
    if not dict_txt.is_file():
        raise AssetError(f"{dict_txt}: not found (run: python -m ibert_plugin.assets build)")
    out = Path(out) if out else data / "glue-bin" / bpe
    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again if the run fails leaving them empty
    out.mkdir(parents=True, exist_ok=True)
    try:
        encoder = BpeEncoder(bpe, bpe_dir)
        return {t: preprocess_task(glue_dir, t, encoder, dict_txt, out, workers) for t in tasks}
    except BaseException:
        for p in created:
            try:
                p.rmdir()  # only if empty: a finished task of an ALL run stays
            except OSError:
                break
        raise


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on any error, with one ``error:`` line)."""
    ap = argparse.ArgumentParser(prog="preprocess_GLUE_tasks.sh",
                                 description="BPE + fairseq-preprocess GLUE-format tasks with local files")
    ap.add_argument("glue_dir", help="folder holding <TASK>/{train,dev,test}.tsv")
    ap.add_argument("task", help=f"{'|'.join(ALL_ORDER)}|ALL")
    ap.add_argument("--bpe", default="gpt2", help="gpt2 (default) or wordpiece")
    ap.add_argument("--bpe-dir", default=None, help="default <data>/gpt2_bpe or <data>/minilm")
    ap.add_argument("--out", default=None, help="output root; default <data>/glue-bin/<bpe>")
    ap.add_argument("--data-dir", default=None, help="default $IBERT_DATA_DIR or <repo>/data")
    ap.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers (default 1)")
    args = ap.parse_args(argv)
    # fairseq's INFO chatter (one block per preprocess call) is noise here; our own progress is on stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in ("fairseq_cli.preprocess", "fairseq"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        t0 = time.time()
        counts = run(Path(args.glue_dir), args.task, args.bpe, args.bpe_dir and Path(args.bpe_dir),
                     args.out and Path(args.out), data_dir(args.data_dir), args.workers)
        log(f"done in {time.time() - t0:.1f}s: {counts}")
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
