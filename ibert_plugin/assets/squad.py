"""Real SQuAD-format QA data from the ``bigbench==1.0.0`` sdist (offline_assets.md section 6b).

``python -m ibert_plugin.assets build --only squad`` (not part of the default build):

1. ``pip download --no-deps --no-binary :all: bigbench==1.0.0`` once into ``<data>/cache`` (never installed: it
   pulls tensorflow, t5, seqio); the archive's size and sha256 are checked, a wrong file is deleted and re-fetched.
   ``--squad-source PATH`` takes a local copy instead (:func:`members_from_source`): the sdist file, a folder
   holding it, or an unpacked BIG-bench tree (the sdist unpacked, or a BIG-bench repository checkout whose files
   are those of the 1.0.0 release) -- for machines without the package index, or when the index no longer serves
   the release.
2. The four needed members are streamed out of the 1.9 GB tree (``tarfile`` ``r|gz``, nothing unpacked to disk)
   and each one's sha256 is verified (read from a tree: each file's sha256 is verified the same way).
3. ``<data>/squad/SQUAD1``: ``train.json`` = SQuADShifts new_wiki + nyt (17,992 questions, new Wikipedia articles
   and New York Times articles crowdsourced with SQuAD's pipeline, SQuAD v1.1 JSON, articles concatenated in that
   order); ``dev.json`` = the official SQuAD v1.1 dev set (48 articles, 10,565 questions). Answers that are not at their
   ``answer_start`` (15 in dev, 18 in train: texts with a leading space whose offset points two characters early,
   and one off by one) are re-anchored to the stripped text's nearest occurrence (:func:`repair_offsets`; counts in
   ``meta.json``); every other byte of content is unchanged and the metrics normalise the space away.
4. ``<data>/squad/SQUAD2``: a v2.0-style set from Disfl-QA (disfluent questions over SQuAD v2.0 contexts,
   ``target == "unknown"`` -> ``is_impossible``). Contexts are shuffled with ``random.Random(SQUAD2_SEED)`` (in
   first-appearance order) and the first ``SQUAD2_DEV_FRACTION`` of them go to dev, so no context is in both.
   Answers get character offsets: the first exact occurrence in the context; else a match that ignores whitespace
   (Disfl-QA's contexts are space-tokenised: ``"Earth ' s"``), the answer text then being the context's own
   characters; an answer found neither way is dropped with its question (counted in ``meta.json``).

Every output folder gets ``meta.json`` (counts, alignment report) and ``SHA256SUMS``; a stamp makes re-runs skip
finished work. BIG-bench's canary string is kept in every file (a request to keep the data out of LM pre-training).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .common import AssetError, log, sha256_file, stamp_ok, write_stamp, write_text_atomic

SDIST = ("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz", 358_249_635,
         "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
MEMBERS = {
    "squad_shifts/squaddev_v1.1.json": "45089eff3cf52004b1dca6814cde5c57082fdb09872f18c79a5d944d45be523a",
    "squad_shifts/new_wiki_v1.0.json": "428104b87438d9059eb5df2883267cf9d30f6f4fcaed92e72107c8b913eaea40",
    "squad_shifts/nyt_v1.0.json": "a770cdc1b460e3bd256a9f95aae021ed6502768b1713be777f3dd8740a4a1965",
    "disfl_qa/task.json": "baff19410992adcf14e5bb2e1ea652e7589a8e11e8c314a00225110e104e2824",
}
SQUAD1_TRAIN = ("squad_shifts/new_wiki_v1.0.json", "squad_shifts/nyt_v1.0.json")
SQUAD2_SEED = 0
SQUAD2_DEV_FRACTION = 0.2


#: Where the members may sit inside a folder given to ``--squad-source``: the ``benchmark_tasks`` folder itself, a
#: BIG-bench checkout or package folder, or the unpacked sdist.
TREE_ROOTS = ("", "benchmark_tasks", "bigbench/benchmark_tasks", PREFIX)
SOURCE_HINT = ("pass a local copy with --squad-source PATH: the bigbench-1.0.0.tar.gz sdist (sha256 "
               f"{SDIST[4][:12]}...), a folder holding it, or a BIG-bench tree with bigbench/benchmark_tasks/"
               "{squad_shifts,disfl_qa}")


def _sdist_ok(path: Path) -> bool:
    return path.stat().st_size == SDIST[3] and sha256_file(path) == SDIST[4]


def ensure_bigbench_sdist(cache_dir: Path) -> Path:
    """The verified sdist in ``cache_dir`` (downloaded with ``pip download`` when absent or corrupt)."""
    from .packages import _pip

    dist, version, fname, size, digest = SDIST
    dest = cache_dir / fname
    if dest.is_file():
        if _sdist_ok(dest):
            log(f"{fname} already in {cache_dir} (sha256 ok)")
            return dest
        log(f"{dest}: wrong size or sha256, downloading again")
        dest.unlink()
    tmp = cache_dir / ".bigbench.download"
    tmp.mkdir(parents=True, exist_ok=True)
    for p in tmp.iterdir():
        p.unlink()
    try:
        _pip(["download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check", "-d", str(tmp),
              f"{dist}=={version}"], f"downloading {dist}=={version} sdist (358 MB)")
    except AssetError as e:
        raise AssetError(f"cannot get the {dist}=={version} sdist from the package index: {e}; "
                         f"{SOURCE_HINT}") from None
    got = tmp / fname
    if not got.is_file():
        raise AssetError(f"pip download did not produce {fname} (got {[p.name for p in tmp.iterdir()]})")
    if sha256_file(got) != digest:
        got.unlink()
        raise AssetError(f"{fname}: sha256 mismatch (expected {digest}); the download was deleted")
    got.replace(dest)
    tmp.rmdir()
    return dest


def _verified(where: Path, out: Dict[str, bytes]) -> Dict[str, bytes]:
    for name, data in out.items():
        if hashlib.sha256(data).hexdigest() != MEMBERS[name]:
            raise AssetError(f"{where}: {name} has an unexpected sha256 (not the bigbench 1.0.0 file)")
    return out


def members_from_source(source: Path) -> Dict[str, bytes]:
    """:data:`MEMBERS` from a local copy (``--squad-source``), each sha256-verified.

    Args:
        source: the ``bigbench-1.0.0.tar.gz`` sdist (size and sha256 checked), a folder holding it (``pip download
            -d``), or a folder with the members under one of :data:`TREE_ROOTS`.
    """
    source = Path(source)
    fname = SDIST[2]
    if source.is_dir() and (source / fname).is_file():
        source = source / fname
    if source.is_file():
        if not _sdist_ok(source):
            raise AssetError(f"--squad-source {source}: not the {fname} sdist (size or sha256 differ)")
        return read_members(source)
    if not source.is_dir():
        raise AssetError(f"--squad-source {source}: no such file or folder")
    for root in TREE_ROOTS:
        if all((source / root / name).is_file() for name in MEMBERS):
            log(f"SQuAD: reading {len(MEMBERS)} files from {source / root}")
            return _verified(source / root, {name: (source / root / name).read_bytes() for name in MEMBERS})
    raise AssetError(f"--squad-source {source}: neither {fname} nor a BIG-bench tree holding "
                     f"{', '.join(MEMBERS)} (under one of: {', '.join(r or '.' for r in TREE_ROOTS)})")


def read_members(sdist: Path) -> Dict[str, bytes]:
    """Stream :data:`MEMBERS` out of the sdist and verify their sha256."""
    want = {PREFIX + name: name for name in MEMBERS}
    out: Dict[str, bytes] = {}
    try:
        with tarfile.open(sdist, "r|gz") as tar:
            for m in tar:
                if m.name in want:
                    out[want[m.name]] = tar.extractfile(m).read()
                    if len(out) == len(want):
                        break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise AssetError(f"{sdist}: cannot read the archive: {e}") from None
    missing = sorted(set(MEMBERS) - set(out))
    if missing:
        raise AssetError(f"{sdist}: missing {', '.join(missing)}")
    return _verified(sdist, out)


def squad_members(cache_dir: Path, source: Optional[Path] = None) -> Dict[str, bytes]:
    """:data:`MEMBERS`, verified: from ``source`` when given, else from the cached (or downloaded) sdist."""
    if source is not None:
        return members_from_source(source)
    sdist = ensure_bigbench_sdist(cache_dir)
    log(f"SQuAD: streaming {len(MEMBERS)} files out of {sdist.name}")
    return read_members(sdist)


def _ws_pattern(text: str) -> re.Pattern:
    """Regex matching ``text`` with any whitespace (or none) between its non-space characters."""
    return re.compile(r"\s*".join(re.escape(ch) for ch in text if not ch.isspace()))


def align_answer(context: str, answer: str) -> Tuple[str, int, str]:
    """``(text, answer_start, how)`` for an answer string; ``how`` is ``exact``, ``whitespace`` or ``unaligned``
    (then ``("", -1, "unaligned")``)."""
    i = context.find(answer)
    if i >= 0 and answer.strip():
        return answer, i, "exact"
    if answer.strip():
        m = _ws_pattern(answer).search(context)
        if m:
            return m.group(0), m.start(), "whitespace"
    return "", -1, "unaligned"


def disfl_qa_to_squad2(task: dict) -> Tuple[dict, dict, dict]:
    """Split Disfl-QA by context into v2.0 train/dev documents; returns ``(train, dev, report)``."""
    groups: Dict[str, List[dict]] = {}
    report = {"questions": 0, "unanswerable": 0, "exact": 0, "whitespace": 0, "unaligned_dropped": 0,
              "ambiguous_first_occurrence": 0}
    for n, ex in enumerate(task["examples"]):
        text = ex.get("input", "")
        if "\ncontext:" not in text:
            raise AssetError(f"disfl_qa/task.json: example {n} has no '\\ncontext:' part")
        question, context = text.split("\ncontext:", 1)
        question, context = question.strip(), context.strip()
        target = ex["target"] if isinstance(ex["target"], str) else ex["target"][0]
        report["questions"] += 1
        qa = {"id": f"disfl_qa_{n:05d}", "question": question}
        if target == "unknown":
            report["unanswerable"] += 1
            qa.update(answers=[], is_impossible=True)
        else:
            ans, start, how = align_answer(context, target)
            report[how if how != "unaligned" else "unaligned_dropped"] += 1
            if how == "unaligned":
                continue
            if how == "exact" and context.count(ans) > 1:
                report["ambiguous_first_occurrence"] += 1
            qa.update(answers=[{"text": ans, "answer_start": start}], is_impossible=False)
        groups.setdefault(context, []).append(qa)
    contexts = list(groups)
    random.Random(SQUAD2_SEED).shuffle(contexts)
    n_dev = round(SQUAD2_DEV_FRACTION * len(contexts))
    canary = task.get("canary", "")

    def doc(ctxs):
        return {"version": "v2.0", "canary": canary,
                "data": [{"title": f"disfl_qa_context_{k:04d}", "paragraphs": [{"context": c, "qas": groups[c]}]}
                         for k, c in enumerate(ctxs)]}

    dev, train = doc(contexts[:n_dev]), doc(contexts[n_dev:])
    report["contexts"] = {"train": len(contexts) - n_dev, "dev": n_dev}
    return train, dev, report


def repair_offsets(doc: dict, slack: int = 3) -> int:
    """Re-anchor answers not found at their ``answer_start``: the stripped text's occurrence nearest to it within
    ``slack`` characters (SQuAD's and SQuADShifts' leading-space answers point two characters early). Returns the
    number repaired; an answer not found within ``slack`` raises :class:`AssetError`."""
    fixed = 0
    for article in doc["data"]:
        for para in article["paragraphs"]:
            ctx = para["context"]
            for qa in para["qas"]:
                for ans in qa["answers"]:
                    s, text = ans["answer_start"], ans["text"]
                    if ctx[s:s + len(text)] == text:
                        continue
                    core = text.strip()
                    hits = [i for i in range(max(0, s - slack), s + len(text) - len(core) + slack + 1)
                            if ctx[i:i + len(core)] == core]
                    if not core or not hits:
                        raise AssetError(f"question {qa['id']}: answer {text!r} not found near offset {s}")
                    ans["answer_start"], ans["text"] = min(hits, key=lambda i: abs(i - s)), core
                    fixed += 1
    return fixed


def _count(doc: dict) -> Dict[str, int]:
    qas = [q for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]
    return {"articles": len(doc["data"]), "questions": len(qas),
            "unanswerable": sum(bool(q.get("is_impossible")) for q in qas)}


def _write(task_dir: Path, step: str, files: Dict[str, bytes], key: Dict, meta: Dict) -> None:
    files = dict(files)
    files["meta.json"] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    for name, data in files.items():
        write_text_atomic(task_dir / name, data.decode("utf-8"))
    sums = "".join(f"{hashlib.sha256(files[n]).hexdigest()}  {n}\n" for n in sorted(files))
    write_text_atomic(task_dir / "SHA256SUMS", sums)
    write_stamp(task_dir, step, sorted(files) + ["SHA256SUMS"], key)


def build_squad(load_members: Callable[[], Dict[str, bytes]], squad_dir: Path) -> Dict:
    """Write ``squad_dir/SQUAD1`` and ``squad_dir/SQUAD2`` (see the module docstring); returns their meta.

    Args:
        load_members: returns the verified :data:`MEMBERS` (e.g. ``lambda: squad_members(cache)``); called only
            when the outputs are not up to date, so a finished build needs neither the sdist nor the index.
        squad_dir: output folder.
    """
    key = {"source": "bigbench==1.0.0 sdist", "members": MEMBERS, "squad2_seed": SQUAD2_SEED,
           "squad2_dev_fraction": SQUAD2_DEV_FRACTION, "format": 2}
    d1, d2 = squad_dir / "SQUAD1", squad_dir / "SQUAD2"
    if stamp_ok(d1, "squad1", key) and stamp_ok(d2, "squad2", key):
        log(f"SQUAD1/SQUAD2: up to date in {squad_dir}")
        return {"SQUAD1": json.loads((d1 / "meta.json").read_text()),
                "SQUAD2": json.loads((d2 / "meta.json").read_text())}
    raw = load_members()
    docs = {name: json.loads(raw[name]) for name in SQUAD1_TRAIN}
    train1 = {"version": "1.1", "canary": docs[SQUAD1_TRAIN[0]].get("canary", ""),
              "source": " + ".join(f"SQuADShifts {Path(n).stem}" for n in SQUAD1_TRAIN),
              "data": [a for n in SQUAD1_TRAIN for a in docs[n]["data"]]}
    dev1 = json.loads(raw["squad_shifts/squaddev_v1.1.json"])
    repaired = {"train": repair_offsets(train1), "dev": repair_offsets(dev1)}
    meta1 = {"task": "SQUAD1", "train_source": train1["source"], "dev_source": "official SQuAD v1.1 dev set "
             "(bigbench squad_shifts/squaddev_v1.1.json)", "repaired_answer_offsets": repaired,
             "train": _count(train1), "dev": _count(dev1)}
    _write(d1, "squad1", {"train.json": json.dumps(train1, ensure_ascii=False).encode(),
                          "dev.json": json.dumps(dev1, ensure_ascii=False).encode()}, key, meta1)
    train2, dev2, report = disfl_qa_to_squad2(json.loads(raw["disfl_qa/task.json"]))
    meta2 = {"task": "SQUAD2", "source": "Disfl-QA (bigbench disfl_qa/task.json)", "split_seed": SQUAD2_SEED,
             "dev_fraction_of_contexts": SQUAD2_DEV_FRACTION, "alignment": report,
             "train": _count(train2), "dev": _count(dev2)}
    _write(d2, "squad2", {"train.json": json.dumps(train2, ensure_ascii=False).encode(),
                          "dev.json": json.dumps(dev2, ensure_ascii=False).encode()}, key, meta2)
    log(f"SQUAD1: train {meta1['train']['questions']} / dev {meta1['dev']['questions']}; SQUAD2: train "
        f"{meta2['train']['questions']} / dev {meta2['dev']['questions']} ({report['unaligned_dropped']} "
        "unaligned answers dropped)")
    return {"SQUAD1": meta1, "SQUAD2": meta2}
