"""SQuAD asset helpers (no sdist needed): Disfl-QA alignment and split, offset repair, download failures."""
from __future__ import annotations

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
    with pytest.raises(AssetError, match=r"cannot get the bigbench==1.0.0 sdist from the package index"):
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
