"""SQuAD asset helpers (no sdist needed): Disfl-QA alignment and split, offset repair, download failures, local
sources (``--squad-source``) built from small stand-in member files whose sha256 the tests pin in place of the real
ones."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from ibert_plugin.assets import squad as S
from ibert_plugin.assets.common import AssetError


def test_align_answer():
    ctx = "the Earth ' s atmosphere holds O 2 gas"
    assert S.align_answer(ctx, "atmosphere") == ("atmosphere", ctx.index("atmosphere"), "exact")
    text, start, how = S.align_answer(ctx, "Earth's atmosphere")
    assert how == "whitespace" and text == "Earth ' s atmosphere" and ctx[start:start + len(text)] == text
    assert S.align_answer(ctx, "O2") == ("O 2", ctx.index("O 2"), "whitespace")
    assert S.align_answer(ctx, "nitrogen") == ("", -1, "unaligned")


def test_disfl_qa_split_by_context():
    contexts = [f"context number {i} says word{i} ' s value" for i in range(10)]
    examples = []
    for i, c in enumerate(contexts):
        examples.append({"input": f"what does {i} say no sorry mean ?  \ncontext: {c} ", "target": f"word{i}'s"})
        examples.append({"input": f"q{i} ?\ncontext: {c}", "target": "unknown"})
        examples.append({"input": f"r{i} ?\ncontext: {c}", "target": "absent text"})
    train, dev, rep = S.disfl_qa_to_squad2({"examples": examples, "canary": "CANARY"})
    assert rep["questions"] == 30 and rep["unanswerable"] == 10 and rep["whitespace"] == 10
    assert rep["unaligned_dropped"] == 10 and rep["contexts"] == {"train": 8, "dev": 2}
    ctx_train = {p["context"] for a in train["data"] for p in a["paragraphs"]}
    ctx_dev = {p["context"] for a in dev["data"] for p in a["paragraphs"]}
    assert len(ctx_dev) == 2 and not ctx_train & ctx_dev and train["canary"] == "CANARY"
    for doc in (train, dev):
        for a in doc["data"]:
            for p in a["paragraphs"]:
                assert len(p["qas"]) == 2
                for qa in p["qas"]:
                    if qa["is_impossible"]:
                        assert qa["answers"] == []
                    else:
                        (ans,) = qa["answers"]
                        assert p["context"][ans["answer_start"]:][:len(ans["text"])] == ans["text"]
    again = S.disfl_qa_to_squad2({"examples": examples, "canary": "CANARY"})
    assert again[1] == dev                                # fixed seed: the same split every time


def test_repair_offsets():
    ctx = "They won, 23–16, in 1990."
    doc = {"data": [{"paragraphs": [{"context": ctx, "qas": [
        {"id": "a", "answers": [{"text": " 23–16", "answer_start": ctx.index(",")}]},
        {"id": "b", "answers": [{"text": "1990", "answer_start": ctx.index("1990")}]}]}]}]}
    assert S.repair_offsets(doc) == 1
    a = doc["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]
    assert a == {"text": "23–16", "answer_start": ctx.index("23")}
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 0
    with pytest.raises(AssetError, match="question b: answer '1990' not found near offset 0"):
        S.repair_offsets(doc)


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    from ibert_plugin.assets import packages

    def no_index(args, what):
        raise AssetError(f"pip failed for {what} (exit 1): No matching distribution found for bigbench==1.0.0")

    monkeypatch.setattr(packages, "_pip", no_index)
    with pytest.raises(AssetError, match=r"cannot get the bigbench==1.0.0 sdist from the package index.*"
                                         r"pass a local copy with --squad-source PATH"):
        S.ensure_bigbench_sdist(tmp_path)

    def wrong_file(args, what):
        (tmp_path / ".bigbench.download" / S.SDIST[2]).write_bytes(b"not the sdist")

    monkeypatch.setattr(packages, "_pip", wrong_file)
    (tmp_path / S.SDIST[2]).write_bytes(b"truncated")    # a corrupt cached copy is replaced, not trusted
    with pytest.raises(AssetError, match="sha256 mismatch"):
        S.ensure_bigbench_sdist(tmp_path)
    assert not list(tmp_path.rglob(S.SDIST[2]))


def test_cli_lists_squad_but_does_not_build_it_by_default():
    from ibert_plugin.assets import __main__ as M

    assert "squad" not in M.STEPS and M._parse_only("squad") == ("squad",)
    with pytest.raises(AssetError, match="choose from bpe,minilm,rt_sent,boolq,squad"):
        M._parse_only("squat")


def _members():
    """Small stand-ins for the four bigbench files: two SQuADShifts articles, a dev article, Disfl-QA examples."""
    def article(title, n):
        ctx = f"{title} was founded in 19{n}0 by people."
        answer = {"text": f"19{n}0", "answer_start": ctx.index("19")}
        return {"title": title, "paragraphs": [{"context": ctx, "qas": [
            {"id": f"{title}-{n}", "question": "when?", "answers": [answer]}]}]}

    def doc(*arts):
        return json.dumps({"version": "1.1", "canary": "CANARY", "data": list(arts)}).encode()

    disfl = {"canary": "CANARY", "examples": [
        {"input": f"who no what did {i} do ?\ncontext: thing {i} ' s value is {i}", "target": t}
        for i in range(10) for t in (f"thing {i}'s value", "unknown")]}
    return {"squad_shifts/squaddev_v1.1.json": doc(article("Warsaw", 1)),
            "squad_shifts/new_wiki_v1.0.json": doc(article("Wiki", 2)),
            "squad_shifts/nyt_v1.0.json": doc(article("Nyt", 3)),
            "disfl_qa/task.json": json.dumps(disfl).encode()}


@pytest.fixture
def fake_release(tmp_path, monkeypatch):
    """Stand-in members pinned as the release's sha256, and an sdist holding them."""
    members = _members()
    monkeypatch.setattr(S, "MEMBERS", {k: hashlib.sha256(v).hexdigest() for k, v in members.items()})
    sdist = tmp_path / "dl" / S.SDIST[2]
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in [("bigbench-1.0.0/README.md", b"x")] + list(members.items()):
            info = tarfile.TarInfo(name if name.endswith(".md") else S.PREFIX + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    monkeypatch.setattr(S, "SDIST", S.SDIST[:3] + (sdist.stat().st_size, digest))
    return members, sdist


def test_local_source_sdist_or_tree(tmp_path, fake_release):
    members, sdist = fake_release
    assert S.members_from_source(sdist) == members              # the sdist file
    assert S.members_from_source(sdist.parent) == members       # a folder holding it (pip download -d)
    tree = tmp_path / "BIG-bench"
    for name, data in members.items():
        (tree / "bigbench" / "benchmark_tasks" / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / "bigbench" / "benchmark_tasks" / name).write_bytes(data)
    assert S.members_from_source(tree) == members               # a repository checkout
    assert S.members_from_source(tree / "bigbench" / "benchmark_tasks") == members
    (tree / "bigbench" / "benchmark_tasks" / "disfl_qa" / "task.json").write_bytes(b"{}")
    with pytest.raises(AssetError, match="disfl_qa/task.json has an unexpected sha256"):
        S.members_from_source(tree)
    (tree / "bigbench" / "benchmark_tasks" / "disfl_qa" / "task.json").unlink()
    with pytest.raises(AssetError, match="neither bigbench-1.0.0.tar.gz nor a BIG-bench tree"):
        S.members_from_source(tree)
    with pytest.raises(AssetError, match="no such file or folder"):
        S.members_from_source(tmp_path / "missing")
    other = tmp_path / "other" / S.SDIST[2]
    other.parent.mkdir()
    other.write_bytes(b"not it")
    with pytest.raises(AssetError, match="not the bigbench-1.0.0.tar.gz sdist"):
        S.members_from_source(other)


def test_build_from_local_source_then_up_to_date_without_it(tmp_path, fake_release, capsys):
    from ibert_plugin.assets import __main__ as M

    _, sdist = fake_release
    data = tmp_path / "data"
    assert M.main(["build", "--data-dir", str(data), "--only", "squad", "--squad-source", str(sdist)]) == 0
    train = json.loads((data / "squad" / "SQUAD1" / "train.json").read_text())
    assert [a["title"] for a in train["data"]] == ["Wiki", "Nyt"]
    dev2 = json.loads((data / "squad" / "SQUAD2" / "dev.json").read_text())
    assert sum(len(p["qas"]) for a in dev2["data"] for p in a["paragraphs"]) == 4   # 2 of 10 contexts, 2 q each

    def no_source():
        raise AssertionError("an up-to-date build must not read the source")

    assert S.build_squad(no_source, data / "squad")["SQUAD1"]["dev"]["questions"] == 1
    capsys.readouterr()
    assert M.main(["build", "--data-dir", str(data), "--squad-source", str(sdist)]) == 2
    assert capsys.readouterr().err.strip() == "error: --squad-source is for step squad: add --only squad"
