"""SQuAD task folders from the official files, identified by sha256 (``docs/squad.md``, section Data).

``python -m ibert_plugin.assets build --only squad [--squad-dir DIR]`` (not part of the default build):

1. **Sources.** With ``--squad-dir DIR`` every file under ``DIR`` (recursively, any name, plain or ``.xz``) is
   identified by the sha256 of its uncompressed bytes against :data:`KNOWN_FILES` (the official SQuAD v1.1 / v2.0
   train and dev files, SQuADShifts new_wiki / reddit / amazon_reviews, Disfl-QA's train / dev / test id lists);
   other files are ignored and listed in the log. Without ``--squad-dir`` the files of :data:`DOWNLOADS` are fetched
   from their pinned URLs into ``<data>/cache/squad`` (sha256-checked, written atomically). Offline, that fails with
   one error naming ``--squad-dir``.
2. **SQUAD1** (v1.1): ``train.json`` = the official train-v1.1 when present, else SQuADShifts new_wiki + reddit +
   amazon_reviews (``meta.json`` ``train_source`` says which); ``dev.json`` = the selection split, held out from the
   training sources by :func:`split_selection`; ``test.json`` = the whole official dev-v1.1 (byte-identical);
   ``test_subset.json`` = its first articles in file order, the fewest reaching :data:`SUBSET_MIN_QUESTIONS`, for
   CPU schedules. Nothing from v2.0 dev or Disfl-QA is trained or selected on (all 35 v2.0 dev articles are v1.1 dev
   articles).
3. **SQUAD2** (v2.0, ``is_impossible``): with the official train-v2.0, ``train.json`` / ``dev.json`` = it split by
   :func:`split_selection` and ``test.json`` = the whole official dev-v2.0 (byte-identical). Otherwise the official
   dev-v2.0 is partitioned by Disfl-QA's id lists: train ids -> ``train.json``, dev ids -> ``dev.json``, test ids ->
   ``test.json`` (every count checked against :data:`KNOWN_FILES`; the test articles share no article with the
   other two). ``test_disfluent.json`` holds the same questions as ``test.json`` (same ids, contexts, answers) with
   Disfl-QA's disfluent rewrite as the question text (official-train mode: the Disfl-QA questions of the whole
   dev-v2.0, when the id lists are there).

Every output folder gets ``meta.json`` (sources with their sha256, counts per file, split rules) and ``SHA256SUMS``.
A stamp keyed on the source folder's listing (relative paths and sizes) and the split settings makes a re-run a
no-op that reads no source file and needs no network.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import lzma
import math
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .common import AssetError, atomic_path, log, sha256_file, stamp_ok, write_bytes_atomic, write_stamp


@dataclass(frozen=True)
class KnownFile:
    """One official file: what it is, and how to recognise and fetch it.

    Attributes:
        role: the builder's name for it (``dev-v1.1``, ``squadshifts-reddit``, ``disfl-qa-test``, ...).
        name: the official file name.
        size: bytes of the uncompressed file.
        sha256: hex sha256 of the uncompressed file.
        counts: ``(articles, questions, unanswerable)`` checked at build time (``None``: not checked). For a
            Disfl-QA id list: counted over the dev-v2.0 questions it selects.
        url: where the file is fetched from (``None``: never downloaded).
    """
    role: str
    name: str
    size: int
    sha256: str
    counts: Tuple[Optional[int], Optional[int], Optional[int]]
    url: Optional[str] = None


_SITE = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"
_SHIFTS = ("https://raw.githubusercontent.com/modestyachts/squadshifts-website/"
           "b7cc4d50af791c36c49417fb94dd739d6a9e7bef/datasets/")
_DISFL = "https://raw.githubusercontent.com/google-research-datasets/Disfl-QA/1f0c16171c77b3d3408be92c485f11b8998a9189/"

#: The files a build recognises. Sizes and sha256 of the SQuAD and SQuADShifts files are the pins of the Hugging Face
#: ``datasets`` loaders (``datasets/squad``, ``squad_v2`` and ``squadshifts``, ``dataset_infos.json``,
#: ``download_checksums``), which are the files served by the official SQuAD site and the SQuADShifts authors' repo;
#: the Disfl-QA lists are the authors' files at the pinned commit (Gupta et al. 2021). Counts: SQuAD papers
#: (Rajpurkar et al. 2016, 2018) and the files themselves.
KNOWN_FILES: Tuple[KnownFile, ...] = (
    KnownFile("train-v1.1", "train-v1.1.json", 30_288_272,
              "3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955", (442, 87_599, 0),
              _SITE + "train-v1.1.json"),
    KnownFile("dev-v1.1", "dev-v1.1.json", 4_854_279,
              "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9", (48, 10_570, 0),
              _SITE + "dev-v1.1.json"),
    KnownFile("train-v2.0", "train-v2.0.json", 42_123_633,
              "68dcfbb971bd3e96d5b46c7177b16c1a4e7d4bdef19fb204502738552dede002", (None, 130_319, 43_498),
              _SITE + "train-v2.0.json"),
    KnownFile("dev-v2.0", "dev-v2.0.json", 4_370_528,
              "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8", (35, 11_873, 5_945),
              _SITE + "dev-v2.0.json"),
    KnownFile("squadshifts-new_wiki", "new_wiki_v1.0.json", 3_607_393,
              "1d50a0ca4cdab88d038b52ea8a2d0510af6038d7f41a0a256b9659237769d0ee", (48, 7_938, 0),
              _SHIFTS + "new_wiki_v1.0.json"),
    KnownFile("squadshifts-reddit", "reddit_v1.0.json", 4_170_330,
              "b4ac346dbf1816fdec80fdcf91d06a4b754fa51e47960fa8614a94f37ea42a4b", (1, 9_803, 0),
              _SHIFTS + "reddit_v1.0.json"),
    KnownFile("squadshifts-amazon_reviews", "amazon_reviews_v1.0.json", 4_177_842,
              "9db7bdee84a91f0fb80b9e74f365042fbbb217cb8e0a7e73bb071245472589b6", (413, 9_885, 0),
              _SHIFTS + "amazon_reviews_v1.0.json"),
    KnownFile("disfl-qa-train", "train.json", 1_467_771,
              "5407199d0c039de5b50cfc16d1ed4a3299c9127cb549da4e4a650b30f4e000eb", (24, 7_182, 3_677),
              _DISFL + "train.json"),
    KnownFile("disfl-qa-dev", "dev.json", 201_742,
              "b60e075b810b27a5130fd0aa2cfbc85753b71a0b30dcd2585f540f0a6afe6492", (24, 1_000, 502),
              _DISFL + "dev.json"),
    KnownFile("disfl-qa-test", "test.json", 771_364,
              "404801de916ebcb2caa82661dfd189c0520e2766db6838f6ff548088650e565e", (11, 3_643, 1_752),
              _DISFL + "test.json"),
)

#: Roles fetched when no ``--squad-dir`` is given: the four official SQuAD files and the Disfl-QA lists (for the
#: disfluent robustness file).
DOWNLOADS = ("train-v1.1", "dev-v1.1", "train-v2.0", "dev-v2.0", "disfl-qa-train", "disfl-qa-dev", "disfl-qa-test")
SQUADSHIFTS = ("squadshifts-new_wiki", "squadshifts-reddit", "squadshifts-amazon_reviews")
DISFL_QA = {"train.json": "disfl-qa-train", "dev.json": "disfl-qa-dev", "test.json": "disfl-qa-test"}

#: Selection split: seeded, per training source, at least this fraction of its questions ...
SELECT_SEED = 0
SELECT_FRACTION = 0.05
#: ... and at least this many questions over all sources (shared in proportion to their sizes).
SELECT_MIN_QUESTIONS = 1_000
#: ``SQUAD1/test_subset.json``: the fewest leading dev-v1.1 articles holding at least this many questions.
SUBSET_MIN_QUESTIONS = 2_500
URL_TIMEOUT_S = 60
#: Bumped when the output of the same sources changes (invalidates earlier stamps).
FORMAT = 3


# ----------------------------------------------------------------------------------------------------------- sources

@dataclass
class Source:
    """A recognised file: its table entry, where it was found, its uncompressed bytes and their JSON."""
    known: KnownFile
    path: Path
    data: bytes
    doc: dict


def _known(known: Optional[Sequence[KnownFile]]) -> Sequence[KnownFile]:
    return KNOWN_FILES if known is None else known


def _uncompressed(path: Path, sizes: Iterable[int]) -> Tuple[Optional[bytes], str]:
    """``(bytes, "")`` when ``path`` (plain or ``.xz``) could be a known file by size, else ``(None, why)``."""
    sizes = set(sizes)
    if path.name.endswith(".xz"):
        try:
            with lzma.open(path) as f:
                data = f.read(max(sizes) + 1)
        except (lzma.LZMAError, EOFError, OSError) as e:
            return None, f"not a readable .xz file ({e})"
    else:
        if path.stat().st_size not in sizes:
            return None, "size of no known file"
        data = path.read_bytes()
    return (data, "") if len(data) in sizes else (None, "size of no known file")


def identify(folder: Path, known: Optional[Sequence[KnownFile]] = None) -> Tuple[Dict[str, Source], List[str]]:
    """Recognise the files under ``folder`` by the sha256 of their uncompressed bytes.

    Args:
        folder: searched recursively; hidden files and folders are skipped.
        known: the table to match (default :data:`KNOWN_FILES`).

    Returns:
        ``(sources by role, ["relative/path: why ignored", ...])``; a second copy of a recognised file is ignored.
    """
    known = _known(known)
    by_hash = {k.sha256: k for k in known}
    found: Dict[str, Source] = {}
    ignored: List[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        data, why = _uncompressed(path, (k.size for k in known))
        k = by_hash.get(hashlib.sha256(data).hexdigest()) if data is not None else None
        if k is None:
            ignored.append(f"{rel}: {why or 'unknown sha256'}")
        elif k.role in found:
            ignored.append(f"{rel}: a second copy of {k.name} ({found[k.role].path.relative_to(folder)})")
        else:
            found[k.role] = Source(k, path, data, json.loads(data))
    return found, ignored


def _open_url(url: str):
    return urllib.request.urlopen(url, timeout=URL_TIMEOUT_S)


def download_official(cache_dir: Path, known: Optional[Sequence[KnownFile]] = None) -> Path:
    """Fetch the :data:`DOWNLOADS` files into ``cache_dir/squad`` (kept ones are re-checked, not re-fetched).

    Each file is streamed into a temporary file, sha256-checked and renamed into place, so a failure leaves no
    partial or empty file. Returns the folder.
    """
    folder = cache_dir / "squad"
    for k in (k for k in _known(known) if k.role in DOWNLOADS):
        dest = folder / f"{k.role}.json"          # the official name for SQuAD; Disfl-QA's "train.json" is ambiguous
        if dest.is_file() and dest.stat().st_size == k.size and sha256_file(dest) == k.sha256:
            continue
        log(f"SQuAD: downloading {k.url} ({k.size / 1e6:.1f} MB)")
        try:
            with atomic_path(dest) as tmp, _open_url(k.url) as response, open(tmp, "wb") as out:
                h = hashlib.sha256()
                for block in iter(lambda: response.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
                if h.hexdigest() != k.sha256:
                    raise AssetError(f"{k.url}: sha256 {h.hexdigest()[:12]}... is not the official "
                                     f"{k.sha256[:12]}... (nothing kept)")
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise AssetError(f"cannot download {k.url} ({reason}); without network, pass a folder holding the "
                             "SQuAD files (plain or .xz, any names) with --squad-dir DIR") from None
    return folder


# ------------------------------------------------------------------------------------------------------------ splits

def counts(doc: dict) -> Dict[str, int]:
    """Articles, paragraphs, questions and unanswerable questions of a SQuAD document."""
    paras = [p for a in doc["data"] for p in a["paragraphs"]]
    qas = [q for p in paras for q in p["qas"]]
    return {"articles": len(doc["data"]), "paragraphs": len(paras), "questions": len(qas),
            "unanswerable": sum(bool(q.get("is_impossible")) for q in qas)}


def _check_counts(what: str, doc: dict, k: KnownFile) -> None:
    c = counts(doc)
    got = (c["articles"], c["questions"], c["unanswerable"])
    if any(want is not None and want != g for want, g in zip(k.counts, got)):
        raise AssetError(f"{what}: (articles, questions, unanswerable) = {got}, expected {k.counts}")


def _doc(version: str, articles: List[dict]) -> dict:
    return {"version": version, "data": articles}


def _nq(paragraphs: Iterable[dict]) -> int:
    return sum(len(p["qas"]) for p in paragraphs)


def split_selection(sources: Sequence[Tuple[str, dict]], seed: Optional[int] = None
                    ) -> Tuple[List[dict], List[dict], Dict[str, dict]]:
    """Hold out a selection split from training sources, whole units at a time.

    The unit is the article; in a source with a single article (SQuADShifts reddit: 2,035 independent posts) it is
    the paragraph. Per source the units are shuffled with ``random.Random(f"{seed}:{role}")`` and taken in that order
    until the held-out questions reach ``max(SELECT_FRACTION, SELECT_MIN_QUESTIONS / all questions)`` of the
    source's questions. Article and paragraph order are kept on both sides.

    Args:
        sources: ``(role, SQuAD document)`` in training-file order.
        seed: default :data:`SELECT_SEED`.

    Returns:
        ``(train articles, selection articles, report per role)``.
    """
    seed = SELECT_SEED if seed is None else seed
    total = sum(_nq(p for a in doc["data"] for p in a["paragraphs"]) for _, doc in sources)
    share = max(SELECT_FRACTION, SELECT_MIN_QUESTIONS / max(total, 1))
    train: List[dict] = []
    select: List[dict] = []
    report: Dict[str, dict] = {}
    for role, doc in sources:
        arts = doc["data"]
        by_para = len(arts) == 1
        units = ([(0, j) for j in range(len(arts[0]["paragraphs"]))] if by_para
                 else [(i, None) for i in range(len(arts))])
        size = {u: (len(arts[u[0]]["paragraphs"][u[1]]["qas"]) if by_para else _nq(arts[u[0]]["paragraphs"]))
                for u in units}
        target = math.ceil(share * sum(size.values()))
        order = list(units)
        random.Random(f"{seed}:{role}").shuffle(order)
        held, n_held = set(), 0
        for u in order:
            if n_held >= target:
                break
            held.add(u)
            n_held += size[u]
        for i, art in enumerate(arts):
            sides = {True: [], False: []}
            for j, para in enumerate(art["paragraphs"]):
                sides[((i, j) if by_para else (i, None)) in held].append(para)
            for side, out in ((False, train), (True, select)):
                if sides[side]:
                    out.append({"title": art["title"], "paragraphs": sides[side]})
        report[role] = {"unit": "paragraph" if by_para else "article", "units_held_out": len(held),
                        "units": len(units), "questions_held_out": n_held, "questions": sum(size.values())}
    return train, select, report


def _filtered(doc: dict, ids: Dict[str, Optional[str]]) -> dict:
    """``doc`` keeping only the questions in ``ids`` (article and paragraph order kept, empty ones dropped); a
    non-None value of ``ids`` replaces the question text."""
    articles = []
    for art in doc["data"]:
        paras = []
        for para in art["paragraphs"]:
            qas = [dict(q, question=ids[q["id"]]) if ids[q["id"]] is not None else q
                   for q in para["qas"] if q["id"] in ids]
            if qas:
                paras.append({"qas": qas, "context": para["context"]})
        if paras:
            articles.append({"title": art["title"], "paragraphs": paras})
    return _doc(doc["version"], articles)


def disfl_qa_partition(dev2: dict, lists: Dict[str, dict], known: Dict[str, KnownFile]) -> Dict[str, dict]:
    """Partition dev-v2.0 by Disfl-QA's id lists and check the result.

    Args:
        dev2: the official dev-v2.0 document.
        lists: ``{"train.json" | "dev.json" | "test.json": {id: {"original": ..., "disfluent": ...}}}``.
        known: the table entries of the three lists, keyed like ``lists`` (their ``counts`` are checked).

    Returns:
        ``{"train.json", "dev.json", "test.json", "test_disfluent.json"}`` -> SQuAD v2.0 documents.
    """
    questions = {q["id"]: q["question"] for a in dev2["data"] for p in a["paragraphs"] for q in p["qas"]}
    seen: Dict[str, str] = {}
    for name, items in lists.items():
        for qid, item in items.items():
            if qid not in questions:
                raise AssetError(f"Disfl-QA {name}: id {qid} is not in dev-v2.0")
            if qid in seen:
                raise AssetError(f"Disfl-QA: id {qid} is in both {seen[qid]} and {name}")
            if item.get("original") != questions[qid]:
                raise AssetError(f"Disfl-QA {name}: id {qid}: 'original' differs from the dev-v2.0 question")
            seen[qid] = name
    out = {name: _filtered(dev2, dict.fromkeys(items)) for name, items in lists.items()}
    for name, doc in out.items():
        _check_counts(f"dev-v2.0 by Disfl-QA {name}", doc, known[name])
    titles = {name: {a["title"] for a in doc["data"]} for name, doc in out.items()}
    shared = titles["test.json"] & (titles["train.json"] | titles["dev.json"])
    if shared:
        raise AssetError(f"Disfl-QA test shares articles with train/dev: {sorted(shared)[:3]}")
    out["test_disfluent.json"] = _filtered(dev2, {q: v["disfluent"] for q, v in lists["test.json"].items()})
    return out


def dev_subset(dev: dict, min_questions: Optional[int] = None) -> Tuple[dict, Dict]:
    """The fewest leading articles of ``dev`` (file order) holding ``min_questions`` (default
    :data:`SUBSET_MIN_QUESTIONS`) questions, and a description for ``meta.json``."""
    need = SUBSET_MIN_QUESTIONS if min_questions is None else min_questions
    n, k = 0, 0
    while k < len(dev["data"]) and n < need:
        n += _nq(dev["data"][k]["paragraphs"])
        k += 1
    if n < need:
        raise AssetError(f"the dev set has only {n} questions, fewer than the subset's {need}")
    rule = f"dev-v1.1 articles 0-{k - 1} in file order: the fewest leading articles with >= {need} questions"
    return _doc(dev["version"], dev["data"][:k]), {"rule": rule, "article_indices": list(range(k)),
                                                   "titles": [a["title"] for a in dev["data"][:k]]}


# ------------------------------------------------------------------------------------------------------------- build

def _missing(found: Dict[str, Source]) -> List[str]:
    miss = []
    for dev, train, alt, alt_name in (("dev-v1.1", "train-v1.1", SQUADSHIFTS, "SQuADShifts new_wiki, reddit and "
                                       "amazon_reviews"),
                                      ("dev-v2.0", "train-v2.0", tuple(DISFL_QA.values()),
                                       "Disfl-QA train/dev/test")):
        if dev not in found:
            miss.append(f"{dev}.json")
        if train not in found and not all(r in found for r in alt):
            miss.append(f"{train}.json or {alt_name} (have: "
                        f"{', '.join(r for r in alt if r in found) or 'none'})")
    return miss


def _write(task_dir: Path, step: str, files: Dict[str, bytes], key: Dict, meta: Dict) -> None:
    files = dict(files)
    files["meta.json"] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    for name, data in files.items():
        write_bytes_atomic(task_dir / name, data)
    sums = "".join(f"{hashlib.sha256(files[n]).hexdigest()}  {n}\n" for n in sorted(files))
    write_bytes_atomic(task_dir / "SHA256SUMS", sums.encode())
    write_stamp(task_dir, step, sorted(files) + ["SHA256SUMS"], key)


def _encode(doc: dict) -> bytes:
    return json.dumps(doc).encode()     # the official files' own serialisation (ASCII, default separators)


def _file_meta(files: Dict[str, bytes], sources: Dict[str, str]) -> Dict[str, dict]:
    return {name: {**counts(json.loads(data)), "source": sources[name]} for name, data in files.items()}


def _source_meta(found: Dict[str, Source], roles: Iterable[str], root: Path) -> Dict[str, dict]:
    out = {}
    for r in roles:
        s = found[r]
        rel = s.path.relative_to(root) if s.path.is_relative_to(root) else s.path
        out[r] = {"file": str(rel), "name": s.known.name, "sha256": s.known.sha256, "bytes": s.known.size}
    return out


def _selection_meta(report: Dict[str, dict]) -> Dict:
    return {"seed": SELECT_SEED, "fraction": SELECT_FRACTION, "min_questions": SELECT_MIN_QUESTIONS,
            "rule": "per training source, whole units (articles; paragraphs in a single-article source) shuffled "
                    "with random.Random(f'{seed}:{source}') until the held-out questions reach max(fraction, "
                    "min_questions / all training questions) of the source's questions",
            "sources": report}


def _build_squad1(found: Dict[str, Source], root: Path) -> Tuple[Dict[str, bytes], Dict]:
    official = "train-v1.1" in found
    roles = ("train-v1.1",) if official else SQUADSHIFTS
    train, select, report = split_selection([(r, found[r].doc) for r in roles])
    dev_raw = found["dev-v1.1"].data
    subset, subset_info = dev_subset(found["dev-v1.1"].doc)
    train_source = ("official SQuAD v1.1 train" if official else
                    "SQuADShifts new_wiki + reddit + amazon_reviews (no official train-v1.1 in the source folder)")
    files = {"train.json": _encode(_doc("1.1", train)), "dev.json": _encode(_doc("1.1", select)),
             "test.json": dev_raw, "test_subset.json": _encode(subset)}
    file_sources = {"train.json": f"{train_source}, minus the selection split",
                    "dev.json": f"selection split held out from {train_source}",
                    "test.json": "the whole official SQuAD v1.1 dev set (dev-v1.1.json, byte-identical)",
                    "test_subset.json": f"official SQuAD v1.1 dev, {subset_info['rule']}"}
    meta = {"task": "SQUAD1", "train_source": train_source,
            "training": "official" if official else "squadshifts",
            "files": _file_meta(files, file_sources), "selection": _selection_meta(report),
            "test_subset": subset_info, "sources": _source_meta(found, roles + ("dev-v1.1",), root)}
    return files, meta


def _build_squad2(found: Dict[str, Source], root: Path) -> Tuple[Dict[str, bytes], Dict]:
    dev_raw = found["dev-v2.0"].data
    dev2 = found["dev-v2.0"].doc
    have_disfl = all(r in found for r in DISFL_QA.values())
    lists = {name: found[r].doc for name, r in DISFL_QA.items()} if have_disfl else {}
    if "train-v2.0" in found:
        train, select, report = split_selection([("train-v2.0", found["train-v2.0"].doc)])
        files = {"train.json": _encode(_doc("v2.0", train)), "dev.json": _encode(_doc("v2.0", select)),
                 "test.json": dev_raw}
        src = {"train.json": "official SQuAD v2.0 train, minus the selection split",
               "dev.json": "selection split held out from the official SQuAD v2.0 train",
               "test.json": "the whole official SQuAD v2.0 dev set (dev-v2.0.json, byte-identical)"}
        if have_disfl:
            every = {q: v["disfluent"] for items in lists.values() for q, v in items.items()}
            files["test_disfluent.json"] = _encode(_filtered(dev2, every))
            src["test_disfluent.json"] = ("the dev-v2.0 questions that Disfl-QA rewrites (its train, dev and test "
                                          "ids), question text = Disfl-QA 'disfluent'")
        roles = ("train-v2.0", "dev-v2.0") + (tuple(DISFL_QA.values()) if have_disfl else ())
        meta = {"training": "official", "train_source": "official SQuAD v2.0 train",
                "selection": _selection_meta(report)}
    else:
        docs = disfl_qa_partition(dev2, lists, {name: found[r].known for name, r in DISFL_QA.items()})
        files = {name: _encode(doc) for name, doc in docs.items()}
        src = {"train.json": "official SQuAD v2.0 dev, the questions of Disfl-QA's train ids",
               "dev.json": "official SQuAD v2.0 dev, the questions of Disfl-QA's dev ids (selection)",
               "test.json": "official SQuAD v2.0 dev, the questions of Disfl-QA's test ids (articles shared with "
                            "neither train nor selection)",
               "test_disfluent.json": "test.json with each question replaced by its Disfl-QA 'disfluent' rewrite "
                                      "(same ids, contexts and answers)"}
        roles = ("dev-v2.0",) + tuple(DISFL_QA.values())
        meta = {"training": "disfl-qa-partition",
                "train_source": "official SQuAD v2.0 dev partitioned by Disfl-QA's id lists (no official "
                                "train-v2.0 in the source folder)",
                "selection": {"rule": "Disfl-QA's dev ids (they share articles with its train ids)"}}
    meta.update(task="SQUAD2", files=_file_meta(files, src), sources=_source_meta(found, roles, root))
    return files, meta


def _listing(folder: Path) -> List[List]:
    return [[str(p.relative_to(folder)), p.stat().st_size] for p in sorted(folder.rglob("*")) if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def build_squad(out_dir: Path, squad_dir: Optional[Path] = None, cache_dir: Optional[Path] = None,
                known: Optional[Sequence[KnownFile]] = None) -> Dict:
    """Write ``out_dir/SQUAD1`` and ``out_dir/SQUAD2`` (see the module docstring); returns their ``meta.json``.

    Args:
        out_dir: output folder (``<data>/squad``).
        squad_dir: folder of SQuAD-format files; ``None``: download :data:`DOWNLOADS` into ``cache_dir``.
        cache_dir: download cache (``<data>/cache``); needed when ``squad_dir`` is ``None``.
        known: the table of recognised files (default :data:`KNOWN_FILES`).

    Raises:
        AssetError: a missing source folder or required file, a failed download, a failed count check.
    """
    known = _known(known)
    if squad_dir is not None and not Path(squad_dir).is_dir():
        raise AssetError(f"--squad-dir {squad_dir}: not a folder")
    key = {"format": FORMAT, "known": sorted(k.sha256 for k in known), "select": [SELECT_SEED, SELECT_FRACTION,
           SELECT_MIN_QUESTIONS], "subset_min_questions": SUBSET_MIN_QUESTIONS,
           "source": _listing(Path(squad_dir)) if squad_dir is not None else "download"}
    d1, d2 = out_dir / "SQUAD1", out_dir / "SQUAD2"
    if stamp_ok(d1, "squad1", key) and stamp_ok(d2, "squad2", key):
        log(f"SQUAD1/SQUAD2: up to date in {out_dir}")
        return {"SQUAD1": json.loads((d1 / "meta.json").read_text()),
                "SQUAD2": json.loads((d2 / "meta.json").read_text())}
    if squad_dir is None:
        if cache_dir is None:
            raise AssetError("no --squad-dir and no download cache folder")
        squad_dir = download_official(cache_dir, known)
    root = Path(squad_dir)
    found, ignored = identify(root, known)
    for line in ignored:
        log(f"SQuAD: ignored {line}")
    log(f"SQuAD: recognised {', '.join(f'{s.known.role} ({s.path.relative_to(root)})' for s in found.values())}")
    missing = _missing(found)
    if missing:
        raise AssetError(f"{root}: missing {'; '.join(missing)} (files are recognised by the sha256 of their "
                         f"uncompressed bytes; {len(found)} recognised, {len(ignored)} ignored)")
    for s in found.values():
        if not s.known.role.startswith("disfl-qa"):
            _check_counts(f"{s.path.relative_to(root)} ({s.known.name})", s.doc, s.known)
    out = {}
    for task, step, d, builder in (("SQUAD1", "squad1", d1, _build_squad1), ("SQUAD2", "squad2", d2, _build_squad2)):
        files, meta = builder(found, root)
        _write(d, step, files, key, meta)
        out[task] = meta
        log(f"{task}: " + "; ".join(f"{n} {m['questions']} q / {m['articles']} articles"
                                    for n, m in meta["files"].items()))
    return out
