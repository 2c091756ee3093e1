"""IBERT-INT model files: lossless round trip, engine from the file bit-exact with the QAT model, token ids equal to
fairseq's preprocessing, one clear error per bad file."""
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_helpers as mh  # noqa: E402
from ibert_plugin.engine import cli, convert, model_file  # noqa: E402
from ibert_plugin.engine.engine import IntegerEngine  # noqa: E402
from ibert_plugin.engine.tokenizer import TextEncoder, gpt2_tokenizer_json  # noqa: E402

HEAD = "sentence_classification_head"


def _calibrated(arch, d, extra, batches, state=None):
    model = mh.build_model(arch, d, extra=extra + ["--quant-mode", "symmetric"])
    if state is not None:
        model.load_state_dict(state, strict=True)
    model.train()
    with torch.no_grad():
        for toks in batches:
            model(toks, features_only=True)
    return model.eval()


def _leaves(obj, path="model"):
    """(path, value) of every tensor / scalar in a compiled-model tree (independent of model_file's walker)."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}.{i}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}")
    else:
        yield path, obj


def _final_ln_ints(model, toks):
    """The QAT model's last-layer LayerNorm integers (B x T x D) and its logits."""
    outs = {}
    se = model.encoder.sentence_encoder
    h = se.layers[-1].final_layer_norm.register_forward_hook(lambda m, i, o: outs.__setitem__("q", o[0].detach()))
    with torch.no_grad():
        logits, _ = model(toks, features_only=True, classification_head_name=HEAD)
    h.remove()
    return outs["q"].transpose(0, 1).double(), logits


@pytest.fixture(scope="module")
def tiny_models():
    d = mh.make_dictionary()
    batches = [mh.random_batch(d, bsz=4, tgt_len=16, seed=s) for s in range(3)]
    return d, {wb: _calibrated("ibert_roberta", d, mh.TINY_DIMS + ["--weight-bits", wb], batches) for wb in ("8", "2")}


@pytest.mark.parametrize("wb", ["8", "2"])
def test_round_trip_is_lossless_and_engine_is_bit_exact(tiny_models, tmp_path, wb):
    d, models = tiny_models
    model = models[wb]
    im = convert.compile_model(model, HEAD)
    path = tmp_path / "m.int"
    header = model_file.save(str(path), im, labels=["neg", "pos"], source={"sha256": "0" * 64}, task="RT-SENT")
    mf = model_file.load(str(path))
    a, b = dict(_leaves(im)), dict(_leaves(mf.model))
    assert a.keys() == b.keys() and len(a) > 50
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
        else:
            assert type(v) is type(b[k]) and v == b[k], k
    assert mf.labels == ["neg", "pos"] and mf.header["task"] == "RT-SENT" and mf.text is None
    D = int(mh.TINY_DIMS[3])
    assert header["arch"] == {"layers": 2, "embed_dim": D, "vocab_size": len(d),
                              "position_rows": im.position_table.shape[0], "padding_idx": d.pad(), "heads": 4,
                              "ffn_dim": 128, "num_classes": 2}
    assert header["bits"]["weight"] == int(wb) and header["bits"]["ternary"] == (wb == "2")
    assert set(header["route_hints"].values()) == ({"fbgemm16"} if wb == "2" else {"u8u8"})
    toks = mh.random_batch(d, bsz=3, tgt_len=14, seed=7)
    eng_file = IntegerEngine(mf.model, threads=1)
    q_file, _, _ = eng_file.encode(toks)
    q_qat, logits_qat = _final_ln_ints(model, toks)
    keep = toks.ne(d.pad())[:, :, None]
    assert torch.equal(q_file.double() * keep, q_qat * keep)
    assert torch.equal(eng_file.classify(toks), IntegerEngine(im, threads=1).classify(toks))
    assert torch.equal(eng_file.classify(toks).argmax(-1), logits_qat.argmax(-1))


def _rt_sent(split):
    from ibert_plugin.assets import glue
    from ibert_plugin.assets.common import data_dir

    tsv = data_dir() / "glue" / "RT-SENT" / f"{split}.tsv"
    if not tsv.is_file():
        pytest.fail(f"{tsv} missing (run: python -m ibert_plugin.assets build)")
    cols, labels, _ = glue.read_split(tsv, glue.TASKS["RT-SENT"], "test" if split == "test" else "dev")
    return cols[0], labels


def _fairseq_text(kind):
    """(TextEncoder, fairseq dictionary, fairseq-path BPE) for the project's GPT-2 or WordPiece assets."""
    from fairseq.data import Dictionary

    from ibert_plugin.assets import glue
    from ibert_plugin.assets.common import data_dir
    from ibert_plugin.assets.wordpiece_bpe import load_wordpiece_tokenizer

    bpe_dir = data_dir() / ("gpt2_bpe" if kind == "gpt2" else "minilm")
    if not (bpe_dir / "dict.txt").is_file():
        pytest.fail(f"{bpe_dir}/dict.txt missing (run: python -m ibert_plugin.assets build)")
    d = Dictionary.load(str(bpe_dir / "dict.txt"))
    d.add_symbol("<mask>")
    tok_json = gpt2_tokenizer_json(bpe_dir) if kind == "gpt2" else load_wordpiece_tokenizer(str(bpe_dir)).to_str()
    text = TextEncoder(bpe=kind, tokenizer_json=tok_json, symbols=list(d.symbols), bos=d.bos(), pad=d.pad(),
                       eos=d.eos(), unk=d.unk(), init_token=d.bos(), separator_token=d.eos(), max_positions=512,
                       num_inputs=1)
    return text, d, glue.BpeEncoder(kind, bpe_dir)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "wordpiece"])
def test_token_ids_equal_fairseq_preprocessing_on_rt_sent(kind):
    text, d, bpe = _fairseq_text(kind)
    sents = sum((_rt_sent(s)[0] for s in ("train", "dev", "test")), [])
    sents += ["  leading and trailing  ", "tab\tinside", "caf\u00e9 \u4e2d\u6587 \U0001F600 naïve", "it's they'LL",
              "\u00a0x"]
    want = [[d.bos()] + d.encode_line(line, add_if_not_exist=False).tolist() for line in bpe.encode_all(sents)]
    got, truncated = text.encode([sents])
    assert truncated == 0 and len(got) == len(sents) > 10000
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"{len(bad)} sentences differ, first: {sents[bad[0]]!r}"
    assert sum(r.count(d.unk()) for r in got) < len(got)  # the dictionary lookup is really used
    # sentence pairs: <s> a </s> </s> b </s>, as sentence_prediction concatenates input0 and input1
    pair = dataclasses.replace(text, num_inputs=2)
    a, b = sents[:200], sents[200:400]
    got, _ = pair.encode([a, b])
    assert got == [want[i] + [d.eos()] + want[200 + i][1:] for i in range(200)]


@pytest.mark.slow
def test_minilm_rt_sent_from_file_matches_qat(tmp_path):
    """The shipped shape: MiniLM (6 x 384) in 8-bit I-BERT mode, RT-SENT dev sentences tokenized from the file."""
    from fairseq import checkpoint_utils

    from ibert_plugin.assets.common import data_dir

    text, d, _ = _fairseq_text("wordpiece")
    sents, labels = _rt_sent("dev")
    rows, _ = text.encode([sents[:48]])
    batches = text.batches(rows, 16)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(data_dir() / "minilm" / "model.pt"))["model"]
    model = _calibrated("ibert_roberta_minilm", d, ["--weight-bits", "8", "--max-positions", "512"], batches, state)
    im = convert.compile_model(model, HEAD)
    path = tmp_path / "minilm.int"
    model_file.save(str(path), im, text=text, labels=["0", "1"])
    mf = model_file.load(str(path))
    rows_file, _ = mf.text.encode([sents[:48]])
    assert rows_file == rows
    eng = IntegerEngine(mf.model, threads=2)
    eng_mem = IntegerEngine(im, threads=2)
    for toks in mf.text.batches(rows_file, 16):
        q_file, _, _ = eng.encode(toks)
        q_qat, logits_qat = _final_ln_ints(model, toks)
        keep = toks.ne(d.pad())[:, :, None]
        assert torch.equal(q_file.double() * keep, q_qat * keep)
        logits = eng.classify(toks)
        assert torch.equal(logits, eng_mem.classify(toks))
        assert torch.equal(logits.argmax(-1), logits_qat.argmax(-1))


# ---------------------------------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    _, models = tiny_models
    im = convert.compile_model(models["8"], HEAD)
    path = tmp_path_factory.mktemp("mf") / "m.int"
    model_file.save(str(path), im, labels=["0", "1"])
    return path


def _seal(path: Path) -> None:
    """Recompute the version-2 whole-file checksum as docs/integer_model_format.md specifies it (sha256 of the file
    with the 64 hex digits of ``"file_sha256":"..."`` read as ``0``), written independently of model_file."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    key = b'"file_sha256":"'
    at = bytes(data[: 8 + n]).index(key) + len(key)
    data[at: at + 64] = b"0" * 64
    data[at: at + 64] = hashlib.sha256(bytes(data)).hexdigest().encode()
    path.write_bytes(bytes(data))


def _rewrite(src: Path, dst: Path, edit, seal=True):
    """Copy ``src`` with its metadata / JSON header changed by ``edit(meta, header)`` (tensors unchanged), resealed
    with a valid checksum unless ``seal`` is False (what a hand edit of the file gives)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    header = json.loads(meta["header"])
    edit(meta, header)
    meta["header"] = json.dumps(header)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    if seal and "file_sha256" in meta:
        _seal(dst)
    return dst


def _bad_file(kind, saved, tmp):
    data = saved.read_bytes()
    p = tmp / f"{kind}.int"
    if kind == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif kind == "flipped":
        b = bytearray(data)
        b[-100] ^= 0x01
        p.write_bytes(bytes(b))
    elif kind == "random":
        p.write_bytes(bytes(range(256)) * 8)
    elif kind == "torch":
        torch.save({"model": {"w": torch.ones(2)}}, p)
    elif kind == "foreign_safetensors":
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(p), metadata={"format": "pt"})
    elif kind == "newer":
        _rewrite(saved, p, lambda m, h: m.update(version="4"))
    elif kind == "v1":  # a version-1 file: payload checksum in the header, no whole-file checksum
        def v1(m, h):
            del m["file_sha256"]
            m["version"] = h["version"] = "1"
            h["payload_sha256"] = "0" * 64
        _rewrite(saved, p, v1)
    elif kind == "header_digit":  # the edit: one digit of a requantization constant changed in place
        b = bytearray(data)
        at = data.index(b'"multiplier\\":') + len(b'"multiplier\\":')  # token_requant's, a plain int
        b[at] = ord("1") if b[at] != ord("1") else ord("2")
        p.write_bytes(bytes(b))
    elif kind == "labels_swapped":  # same length, so the safetensors offsets stay valid
        _rewrite(saved, p, lambda m, h: h.update(labels=h["labels"][::-1]), seal=False)
    elif kind == "fields":
        _rewrite(saved, p, lambda m, h: h["model"]["fields"]["layers"]["list"][0]["fields"].pop("heads"))
    elif kind == "shapes":
        _rewrite(saved, p, lambda m, h: h["arch"].update(embed_dim=h["arch"]["embed_dim"] * 2))
    return p


BAD = {
    "truncated": "truncated IBERT-INT file",
    "flipped": "checksum mismatch (a byte of the file was changed)",
    "header_digit": "checksum mismatch (a byte of the file was changed)",
    "labels_swapped": "checksum mismatch (a byte of the file was changed)",
    "v1": "is IBERT-INT version 1, whose header (constants, tokenizer, labels) is not checksummed: re-run",
    "random": "not an IBERT-INT model file",
    "torch": "not an IBERT-INT model file",
    "foreign_safetensors": "not an IBERT-INT model file (a safetensors file without the IBERT-INT header)",
    "newer": "IBERT-INT version 4, newer than this engine reads (up to 3)",
    "fields": "IntLayer fields differ from this engine's (missing ['heads']",
    "shapes": "corrupt IBERT-INT file",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_model_file_is_one_error_line(saved, tmp_path, capsys, kind):
    p = _bad_file(kind, saved, tmp_path)
    with pytest.raises(model_file.ModelFileError, match=r".*" + __import__("re").escape(BAD[kind])):
        model_file.load(str(p))
    rc = cli.main(["predict", "--model", str(p), "a sentence"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and BAD[kind] in err[0]


def test_every_changed_byte_is_refused_naming_the_file(saved, tmp_path):
    """A changed byte anywhere (8-byte length, safetensors JSON, the IBERT-INT header with every constant and label,
    padding, tensor payload) makes load fail with one message naming the file: the whole file is checksummed."""
    data = saved.read_bytes()
    n = int.from_bytes(data[:8], "little")
    digest = data.index(b'"file_sha256"')  # the stored checksum itself, every one of its bytes
    # every byte of the length and of the checksum field, ~250 spread over the header, ~50 over the payload (each try
    # rewrites and re-hashes the whole 14 MB file)
    positions = sorted(set(range(8)) | set(range(digest, digest + 80)) | set(range(8, 8 + n, max(1, n // 250)))
                       | set(range(8 + n, len(data), max(1, (len(data) - 8 - n) // 50))) | {8 + n - 1, len(data) - 1})
    p = tmp_path / "x.int"
    for pos in positions:
        b = bytearray(data)
        b[pos] ^= 0x04
        p.write_bytes(bytes(b))
        with pytest.raises(model_file.ModelFileError) as e:
            model_file.load(str(p))
        assert str(p) in str(e.value) and "\n" not in str(e.value), (pos, str(e.value))
    p.write_bytes(data + b" ")  # appended bytes too
    with pytest.raises(model_file.ModelFileError, match="checksum mismatch"):
        model_file.load(str(p))


def test_changed_header_constant_via_cli_predict_and_eval(saved, tmp_path, capsys):
    p = _bad_file("header_digit", saved, tmp_path)
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("a fine film\t1\n")
    for argv in (["predict", "--model", str(p), "a sentence"], ["eval", "--model", str(p), "--tsv", str(tsv),
                                                                 "--task", "RT-SENT"]):
        rc = cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: corrupt IBERT-INT file " + str(p)), err


def test_good_file_loads_and_save_refuses_mismatched_vocabulary(saved, tmp_path):
    assert model_file.load(str(saved)).header["format"] == "IBERT-INT"
    text, _, _ = _fairseq_text("wordpiece")
    mf = model_file.load(str(saved))
    with pytest.raises(model_file.EngineError, match="dictionary has 30522 entries, the model's token table 65"):
        model_file.save(str(tmp_path / "x.int"), mf.model, text=text)
    assert not (tmp_path / "x.int").exists()


FIXTURE_V2 = Path(__file__).resolve().parent / "fixtures" / "engine_v2"


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory):
    """The version-2 file written by the engine before the field renames (tests/fixtures/README.md)."""
    import lzma

    p = tmp_path_factory.mktemp("v2") / "tiny_w8_v2.int"
    p.write_bytes(lzma.decompress((FIXTURE_V2 / "tiny_w8_v2.int.xz").read_bytes()))
    return p


def test_version_2_file_runs_bit_exact_with_what_it_gave_when_written(v2_file):
    expected = json.loads((FIXTURE_V2 / "tiny_w8_v2.expected.json").read_text())
    raw_version = json.loads(v2_file.read_bytes()[8: 8 + int.from_bytes(v2_file.read_bytes()[:8], "little")]
                             .decode())["__metadata__"]["version"]
    assert raw_version == "2"
    mf = model_file.load(str(v2_file))
    assert mf.header["version"] == model_file.FORMAT_VERSION and mf.header["upgraded_from"] == 2
    assert set(mf.header["route_hints"]) == {f"layers.{i}.{k}" for i in range(2) for k in
                                             ("qkv", "out_proj", "fc1", "fc2")}
    im = mf.model
    assert isinstance(im.token_requant.multiplier, int) and im.layers[0].input_requant.multiplier.shape == (64,)
    eng = IntegerEngine(im, threads=1)
    toks = torch.tensor(expected["tokens"])
    q, s, _ = eng.encode(toks)
    assert torch.equal(q, torch.tensor(expected["q_out"], dtype=torch.int64))
    assert torch.equal(s, torch.tensor(expected["s_out"], dtype=s.dtype))
    assert torch.equal(eng.classify(toks), torch.tensor(expected["logits"], dtype=torch.float32))


def test_version_2_file_resaved_is_version_3_with_the_same_constants(v2_file, tmp_path):
    old = model_file.load(str(v2_file))
    out = tmp_path / "v3.int"
    model_file.save(str(out), old.model, labels=old.labels, source=old.header["source"], task=old.header["task"])
    new = model_file.load(str(out))
    assert "upgraded_from" not in new.header and new.header["route_hints"] == old.header["route_hints"]
    a, b = dict(_leaves(old.model)), dict(_leaves(new.model))
    assert a.keys() == b.keys() and any(k.endswith("input_requant.multiplier") for k in a)
    for k, v in a.items():
        assert (torch.equal(v, b[k]) and v.dtype == b[k].dtype) if isinstance(v, torch.Tensor) else v == b[k], k


def test_version_2_file_with_a_changed_byte_is_refused(v2_file, tmp_path):
    b = bytearray(v2_file.read_bytes())
    b[-50] ^= 0x04
    p = tmp_path / "flipped_v2.int"
    p.write_bytes(bytes(b))
    with pytest.raises(model_file.ModelFileError, match="checksum mismatch"):
        model_file.load(str(p))


def test_version_2_tree_missing_a_field_names_it_in_version_3_terms():
    tree = {"type": "IntLN", "fields": {"shift": 3, "b_int": {"tensor": "x"}}}
    up = model_file.upgrade_v2_header({"model": tree})["model"]
    assert up["fields"] == {"shift": 3, "bias": {"tensor": "x"}}
    with pytest.raises(model_file.ModelFileError, match=r"IntLN fields differ .*missing \['out_scale'\]"):
        model_file._decode(up, "model", {"x": torch.zeros(2, dtype=torch.int64)}, model_file._dataclass_types())
