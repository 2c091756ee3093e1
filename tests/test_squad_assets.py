"""SQuAD asset build (``python -m ibert_plugin.assets build --only squad``) on small stand-in files: the tests write
SQuAD-format documents, pin their sha256 in a stand-in table of known files (in place of the official pins), and
check identification, the SQUAD1 / SQUAD2 splits, idempotence and the one-line errors (offline included)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import lzma
import urllib.error

import pytest

from ibert_plugin.assets import __main__ as M
from ibert_plugin.assets import squad as S
from ibert_plugin.assets.common import AssetError


def _article(title, n_paras, n_q, impossible=()):
    """``n_paras`` paragraphs of ``n_q`` questions; question indices in ``impossible`` are v2.0 unanswerable."""
    paras = []
    for p in range(n_paras):
        ctx = f"{title} paragraph {p}: " + " ".join(f"item{q} costs {100 + q} coins." for q in range(n_q))
        qas = []
        for q in range(n_q):
            qa = {"question": f"What does item{q} of {title} {p} cost?", "id": f"{title}-{p}-{q}"}
            if q in impossible:
                qa.update(answers=[], is_impossible=True)
            else:
                qa["answers"] = [{"text": f"{100 + q} coins", "answer_start": ctx.index(f"{100 + q} coins")}]
                if impossible:
                    qa["is_impossible"] = False
            qas.append(qa)
        paras.append({"context": ctx, "qas": qas})
    return {"title": title, "paragraphs": paras}


def _ids(doc):
    return [q["id"] for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]


def _qas(doc):
    return [q for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]


def _docs():
    """Stand-ins for every known file: role -> (document, (articles, questions, unanswerable))."""
    def v1(arts):
        return {"version": "1.1", "data": arts}

    def v2(arts):
        return {"version": "v2.0", "data": arts}

    dev2 = v2([_article(f"V2_{i}", 2, 4, impossible=(1, 3)) for i in range(7)])
    q = {(i, p, k): f"V2_{i}-{p}-{k}" for i in range(7) for p in range(2) for k in range(4)}
    lists = {"train": [v for (i, p, k), v in q.items() if i < 4 and k < 3],     # articles 0-3, questions 0-2
             "dev": [v for (i, p, k), v in q.items() if i < 4 and k == 3],      # articles 0-3, question 3
             "test": [v for (i, p, k), v in q.items() if i in (4, 5)]}          # article 6: in no list
    text = {qa["id"]: qa["question"] for qa in _qas(dev2)}
    disfl = {s: {i: {"original": text[i], "disfluent": f"uh no {text[i]}"} for i in ids} for s, ids in lists.items()}
    return {
        "dev-v1.1": (v1([_article(f"Dev_{i}", 1, n) for i, n in enumerate((3, 2, 4, 1))]), (4, 10, 0)),
        "train-v1.1": (v1([_article(f"Train1_{i}", 2, 2) for i in range(5)]), (5, 20, 0)),
        "squadshifts-new_wiki": (v1([_article(f"Wiki_{i}", 2, 2) for i in range(6)]), (6, 24, 0)),
        "squadshifts-reddit": (v1([_article("Reddit", 10, 2)]), (1, 20, 0)),
        "squadshifts-amazon_reviews": (v1([_article(f"Amazon_{i}", 1, 2) for i in range(8)]), (8, 16, 0)),
        "dev-v2.0": (dev2, (7, 56, 28)),
        "train-v2.0": (v2([_article(f"Train2_{i}", 2, 4, impossible=(0, 2)) for i in range(5)]), (5, 40, 20)),
        "disfl-qa-train": (disfl["train"], (4, 24, 8)),
        "disfl-qa-dev": (disfl["dev"], (4, 8, 8)),
        "disfl-qa-test": (disfl["test"], (2, 16, 8)),
    }


@pytest.fixture
def standins(monkeypatch):
    """role -> uncompressed bytes; the module's table, sizes and thresholds replaced by the stand-ins'."""
    docs = _docs()
    raw = {role: json.dumps(doc).encode() for role, (doc, _) in docs.items()}
    table = tuple(dataclasses.replace(k, size=len(raw[k.role]), sha256=hashlib.sha256(raw[k.role]).hexdigest(),
                                      counts=docs[k.role][1], url=f"https://example.invalid/{k.role}")
                  for k in S.KNOWN_FILES)
    monkeypatch.setattr(S, "KNOWN_FILES", table)
    monkeypatch.setattr(S, "SELECT_MIN_QUESTIONS", 5)
    monkeypatch.setattr(S, "SUBSET_MIN_QUESTIONS", 5)
    return raw


def _folder(root, raw, roles, xz=()):
    """Write the stand-ins of ``roles`` under ``root`` with unofficial names (``.xz`` for the roles in ``xz``)."""
    root.mkdir(parents=True, exist_ok=True)
    for n, role in enumerate(roles):
        path = root / f"sub{n % 2}" / (f"copy_{n}.json.xz" if role in xz else f"file {n}.txt")
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(lzma.compress(raw[role]) if role in xz else raw[role])
    return root


FALLBACK = ("dev-v1.1", "squadshifts-new_wiki", "squadshifts-reddit", "squadshifts-amazon_reviews", "dev-v2.0",
            "disfl-qa-train", "disfl-qa-dev", "disfl-qa-test")


def _build(capsys, data, src=None):
    argv = ["build", "--data-dir", str(data), "--only", "squad"] + (["--squad-dir", str(src)] if src else [])
    rc = M.main(argv)
    return rc, capsys.readouterr().err


def _one_error_line(err):
    lines = [ln for ln in err.splitlines() if not ln.startswith("[assets]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _load(path):
    return json.loads(path.read_text())


def test_known_table_is_consistent():
    roles = [k.role for k in S.KNOWN_FILES]
    assert len(set(roles)) == len(roles) and len({k.sha256 for k in S.KNOWN_FILES}) == len(roles)
    assert set(S.DOWNLOADS) | set(S.SQUADSHIFTS) | set(S.DISFL_QA.values()) <= set(roles)
    for k in S.KNOWN_FILES:
        assert len(k.sha256) == 64 and int(k.sha256, 16) >= 0 and k.size > 0
        assert k.role not in S.DOWNLOADS or (k.url or "").startswith("https://")


def test_identify_plain_and_xz_any_names_and_reports_unknown(tmp_path, standins):
    root = _folder(tmp_path / "src", standins, FALLBACK, xz=("dev-v1.1", "squadshifts-reddit", "disfl-qa-test"))
    (root / "README.md").write_text("notes")
    (root / "sub0" / "broken.json.xz").write_bytes(lzma.compress(standins["dev-v2.0"])[:50])
    (root / "almost.json").write_bytes(standins["dev-v2.0"][:-1] + b" ")      # right size, wrong bytes
    (root / "zz").mkdir()
    (root / "zz" / "again.json").write_bytes(standins["dev-v1.1"])            # a second copy (found later)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.json").write_bytes(standins["train-v1.1"])          # hidden: not searched
    found, ignored = S.identify(root)
    assert sorted(found) == sorted(FALLBACK)
    assert found["dev-v1.1"].path.name.endswith(".json.xz") and found["dev-v1.1"].data == standins["dev-v1.1"]
    assert found["dev-v2.0"].path.suffix == ".txt" and found["disfl-qa-test"].doc == json.loads(
        standins["disfl-qa-test"])
    why = dict(line.split(": ", 1) for line in ignored)
    assert why["README.md"] == "size of no known file" and why["almost.json"] == "unknown sha256"
    assert why["sub0/broken.json.xz"].startswith("not a readable .xz file")
    assert why["zz/again.json"].startswith("a second copy of dev-v1.1.json")
    assert len(ignored) == 4


def test_squad1_from_squadshifts_article_disjoint(tmp_path, standins, capsys):
    src = _folder(tmp_path / "src", standins, FALLBACK, xz=("squadshifts-new_wiki",))
    rc, err = _build(capsys, tmp_path / "data", src)
    assert rc == 0, err
    d = tmp_path / "data" / "squad" / "SQUAD1"
    train, select = _load(d / "train.json"), _load(d / "dev.json")
    meta = _load(d / "meta.json")
    assert meta["training"] == "squadshifts" and "SQuADShifts" in meta["train_source"]
    # every training question lands on exactly one side
    shifts = [json.loads(standins[r]) for r in S.SQUADSHIFTS]
    assert sorted(_ids(train) + _ids(select)) == sorted(i for doc in shifts for i in _ids(doc))
    assert not set(_ids(train)) & set(_ids(select))
    # multi-article sources split by article, reddit (one article) by paragraph
    def multi(doc):
        return {a["title"] for a in doc["data"] if a["title"] != "Reddit"}

    assert multi(select) and not multi(train) & multi(select)
    def ctx(doc):
        return {p["context"] for a in doc["data"] for p in a["paragraphs"]}

    assert not ctx(train) & ctx(select)
    assert any(a["title"] == "Reddit" for a in select["data"]) and any(a["title"] == "Reddit" for a in train["data"])
    assert len(_ids(select)) >= 5 and meta["selection"]["sources"]["squadshifts-reddit"]["unit"] == "paragraph"
    assert meta["files"]["dev.json"]["questions"] == len(_ids(select))
    # nothing from v2.0 dev or Disfl-QA is trained or selected on
    assert not {i for i in _ids(train) + _ids(select) if i.startswith("V2_")}
    # report = the whole dev-v1.1, byte for byte; subset = its leading articles reaching 5 questions
    assert (d / "test.json").read_bytes() == standins["dev-v1.1"]
    assert [a["title"] for a in _load(d / "test_subset.json")["data"]] == ["Dev_0", "Dev_1"]
    assert meta["test_subset"]["article_indices"] == [0, 1] and meta["files"]["test_subset.json"]["questions"] == 5
    sums = dict(reversed(ln.split("  ")) for ln in (d / "SHA256SUMS").read_text().splitlines())
    assert sums["train.json"] == hashlib.sha256((d / "train.json").read_bytes()).hexdigest()
    # seeded: a second build elsewhere gives the same bytes
    assert _build(capsys, tmp_path / "again", src)[0] == 0
    assert (tmp_path / "again" / "squad" / "SQUAD1" / "dev.json").read_bytes() == (d / "dev.json").read_bytes()


def test_squad2_partition_by_disfl_qa(tmp_path, standins, capsys):
    rc, err = _build(capsys, tmp_path / "data", _folder(tmp_path / "src", standins, FALLBACK))
    assert rc == 0, err
    d = tmp_path / "data" / "squad" / "SQUAD2"
    lists = {s: json.loads(standins[f"disfl-qa-{s}"]) for s in ("train", "dev", "test")}
    for name, s in (("train.json", "train"), ("dev.json", "dev"), ("test.json", "test")):
        assert sorted(_ids(_load(d / name))) == sorted(lists[s])
    test, disfl = _load(d / "test.json"), _load(d / "test_disfluent.json")
    assert sum(q["is_impossible"] for q in _qas(test)) == 8
    for a, b in zip(_qas(test), _qas(disfl), strict=True):
        assert b["question"] == lists["test"][a["id"]]["disfluent"] != a["question"]
        assert {k: v for k, v in a.items() if k != "question"} == {k: v for k, v in b.items() if k != "question"}
    assert [p["context"] for x in test["data"] for p in x["paragraphs"]] == \
        [p["context"] for x in disfl["data"] for p in x["paragraphs"]]
    meta = _load(d / "meta.json")
    assert meta["training"] == "disfl-qa-partition"
    assert {n: (m["articles"], m["questions"], m["unanswerable"]) for n, m in meta["files"].items()} == {
        "train.json": (4, 24, 8), "dev.json": (4, 8, 8), "test.json": (2, 16, 8), "test_disfluent.json": (2, 16, 8)}


def test_partition_counts_are_checked(tmp_path, standins, capsys, monkeypatch):
    table = tuple(dataclasses.replace(k, counts=(2, 16, 7)) if k.role == "disfl-qa-test" else k
                  for k in S.KNOWN_FILES)
    monkeypatch.setattr(S, "KNOWN_FILES", table)
    rc, err = _build(capsys, tmp_path / "data", _folder(tmp_path / "src", standins, FALLBACK))
    assert rc == 2
    assert "Disfl-QA test.json: (articles, questions, unanswerable) = (2, 16, 8), expected (2, 16, 7)" in \
        _one_error_line(err)


def test_partition_refuses_inconsistent_lists():
    docs = _docs()
    dev2 = docs["dev-v2.0"][0]
    unchecked = {n: S.KnownFile(n, n, 1, "0" * 64, (None, None, None)) for n in S.DISFL_QA}

    def lists(**change):
        out = {f"{s}.json": dict(docs[f"disfl-qa-{s}"][0]) for s in ("train", "dev", "test")}
        for name, (qid, item) in change.items():
            out[f"{name}.json"][qid] = item
        return out

    good = S.disfl_qa_partition(dev2, lists(), unchecked)
    assert sorted(good) == ["dev.json", "test.json", "test_disfluent.json", "train.json"]
    v2_q = {q["id"]: q["question"] for q in _qas(dev2)}
    cases = [(dict(test=("V2_0-0-0", {"original": v2_q["V2_0-0-0"], "disfluent": "x"})), "is in both"),
             (dict(test=("nope", {"original": "q", "disfluent": "x"})), "id nope is not in dev-v2.0"),
             (dict(test=("V2_6-0-0", {"original": "other", "disfluent": "x"})), "'original' differs"),
             (dict(test=("V2_6-0-0", {"original": v2_q["V2_6-0-0"], "disfluent": "x"}),
                   dev=("V2_6-1-3", {"original": v2_q["V2_6-1-3"], "disfluent": "x"})), "shares articles")]
    for change, msg in cases:
        with pytest.raises(AssetError, match=msg):
            S.disfl_qa_partition(dev2, lists(**change), unchecked)


def test_official_train_sets_take_precedence(tmp_path, standins, capsys):
    roles = FALLBACK + ("train-v1.1", "train-v2.0")
    rc, err = _build(capsys, tmp_path / "data", _folder(tmp_path / "src", standins, roles, xz=("train-v2.0",)))
    assert rc == 0, err
    d1, d2 = tmp_path / "data" / "squad" / "SQUAD1", tmp_path / "data" / "squad" / "SQUAD2"
    assert _load(d1 / "meta.json")["training"] == _load(d2 / "meta.json")["training"] == "official"
    for d, role in ((d1, "train-v1.1"), (d2, "train-v2.0")):
        train, select = _ids(_load(d / "train.json")), _ids(_load(d / "dev.json"))
        assert select and sorted(train + select) == sorted(_ids(json.loads(standins[role])))
        titles = [{a["title"] for a in _load(d / n)["data"]} for n in ("train.json", "dev.json")]
        assert not titles[0] & titles[1]
    assert (d2 / "test.json").read_bytes() == standins["dev-v2.0"]
    every = [i for s in ("train", "dev", "test") for i in json.loads(standins[f"disfl-qa-{s}"])]
    assert sorted(_ids(_load(d2 / "test_disfluent.json"))) == sorted(every)


def test_missing_required_files_is_one_error_line(tmp_path, standins, capsys):
    src = _folder(tmp_path / "src", standins, [r for r in FALLBACK if r not in ("squadshifts-reddit", "dev-v2.0")])
    rc, err = _build(capsys, tmp_path / "data", src)
    line = _one_error_line(err)
    assert rc == 2 and "missing train-v1.1.json or SQuADShifts new_wiki, reddit and amazon_reviews" in line
    assert "dev-v2.0.json" in line and not (tmp_path / "data" / "squad").exists()
    rc, err = _build(capsys, tmp_path / "data", tmp_path / "nowhere")
    assert rc == 2 and _one_error_line(err) == f"error: --squad-dir {tmp_path / 'nowhere'}: not a folder"


def test_finished_build_reads_no_source(tmp_path, standins, capsys, monkeypatch):
    src = _folder(tmp_path / "src", standins, FALLBACK)
    assert _build(capsys, tmp_path / "data", src)[0] == 0
    out = tmp_path / "data" / "squad"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def no_read(*args, **kwargs):
        raise AssertionError("an up-to-date build must not read its sources")

    monkeypatch.setattr(S, "identify", no_read)
    assert S.build_squad(out, src)["SQUAD1"]["training"] == "squadshifts"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (src / "extra.txt").write_text("a new file in the source folder")           # a changed listing rebuilds
    with pytest.raises(AssertionError, match="must not read"):
        S.build_squad(out, src)


def test_download_offline_is_one_error_line_naming_squad_dir(tmp_path, standins, capsys, monkeypatch):
    def offline(url):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(S, "_open_url", offline)
    rc, err = _build(capsys, tmp_path / "data")
    line = _one_error_line(err)
    assert rc == 2 and "cannot download https://example.invalid/train-v1.1" in line and "--squad-dir DIR" in line
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.name != "assets.json"]


def test_download_checks_sha256_then_builds(tmp_path, standins, capsys, monkeypatch):
    served = {f"https://example.invalid/{role}": data for role, data in standins.items()}
    served["https://example.invalid/dev-v2.0"] = b"{}"                         # a wrong file
    monkeypatch.setattr(S, "_open_url", lambda url: io.BytesIO(served[url]))
    rc, err = _build(capsys, tmp_path / "data")
    assert rc == 2 and "is not the official" in _one_error_line(err)
    cache = tmp_path / "data" / "cache" / "squad"
    assert sorted(p.name for p in cache.iterdir()) == ["dev-v1.1.json", "train-v1.1.json", "train-v2.0.json"]
    served["https://example.invalid/dev-v2.0"] = standins["dev-v2.0"]
    rc, err = _build(capsys, tmp_path / "data")
    assert rc == 0, err
    assert _load(tmp_path / "data" / "squad" / "SQUAD2" / "meta.json")["training"] == "official"
    assert (cache / "dev-v2.0.json").read_bytes() == standins["dev-v2.0"]
    assert (cache / "disfl-qa-test.json").read_bytes() == standins["disfl-qa-test"]


def test_cli_squad_is_optional_and_squad_dir_needs_it(tmp_path, capsys):
    assert "squad" not in M.STEPS and M._parse_only("squad") == ("squad",)
    with pytest.raises(AssetError, match="choose from bpe,minilm,rt_sent,boolq,squad"):
        M._parse_only("squat")
    assert M.main(["build", "--data-dir", str(tmp_path), "--squad-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: --squad-dir is for step squad: add --only squad"
