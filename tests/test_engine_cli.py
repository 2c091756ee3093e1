"""``python -m ibert_plugin.engine`` on a tiny trained checkpoint: ``eval`` from the checkpoint (same accuracy as the
QAT model), ``convert`` to an IBERT-INT file and ``predict`` / ``eval`` from it in processes that cannot import fairseq
(bit-exact with the checkpoint's engine, same predictions as the QAT model), clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_helpers as mh  # noqa: E402

pytestmark = pytest.mark.slow  # whole pipelines / subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_cli")
    data = mh.make_tiny_glue(root)
    mh.fairseq_train(data, root / "ckpt", arch="ibert_roberta_tiny",
                     extra=["--quant-mode", "symmetric", "--weight-bits", "7"], max_update=6)
    return data, root / "ckpt" / "checkpoint_best.pt"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "ibert_plugin.engine", *args], capture_output=True, text=True,
                          cwd=REPO)


def test_eval_matches_qat_and_is_bit_exact(trained):
    data, ckpt = trained
    proc = _run("eval", "--checkpoint", str(ckpt), "--data-bin", str(data), "--batch-size", "8", "--compare-qat")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["sentences"] == 32 and res["accuracy"] == res["qat_accuracy"] and res["sentences_per_s"] > 0
    # trained checkpoint: every layer's integers equal the QAT model's
    from ibert_plugin.engine import convert

    eng, model, _ = convert.from_checkpoint(str(ckpt), threads=2)
    V = model.encoder.sentence_encoder.embed_tokens.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(4, V, (3, 12), generator=g)
    toks[:, 0] = 0
    toks[1, 8:] = 1
    outs = {}
    se = model.encoder.sentence_encoder
    hooks = [se.layers[i].final_layer_norm.register_forward_hook(
        lambda m, inp, o, i=i: outs.__setitem__(i, o[0].detach())) for i in range(len(se.layers))]
    with torch.no_grad():
        model(toks, features_only=True)
    for h in hooks:
        h.remove()
    _, _, acts = eng.encode(toks, collect=True)
    for i, v in outs.items():
        assert torch.equal(acts[f"layers.{i}.final_layer_norm"].double(), v.transpose(0, 1).double())


def test_eval_errors_exit_2(trained, tmp_path):
    data, ckpt = trained
    p = _run("eval", "--checkpoint", str(tmp_path / "nope.pt"), "--data-bin", str(data))
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found")
    p = _run("eval", "--checkpoint", str(ckpt), "--data-bin", str(tmp_path / "nodata"))
    assert p.returncode == 2 and "data directory not found" in p.stderr


def _tiny_tsv(data: Path, path: Path, with_labels=True):
    """The tiny valid split as a GLUE-format single-sentence TSV (RT-SENT / SST-2 layout: sentence, label)."""
    raw = data.parent / "raw"
    sents = (raw / "valid.input0").read_text().splitlines()
    labels = (raw / "valid.label").read_text().splitlines()
    with open(path, "w") as f:
        f.write("sentence\tlabel\n" if with_labels else "index\tsentence\n")
        for i, (s, lab) in enumerate(zip(sents, labels)):
            f.write(f"{s}\t{lab}\n" if with_labels else f"{i}\t{s}\n")
    return path


def _wordpiece_dir(root: Path) -> Path:
    """A WordPiece vocabulary in which every tiny-data word is one piece, so the TSV encodes like the binarised
    split."""
    d = root / "wp"
    d.mkdir(exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(40)]) + "\n")
    return d


def test_eval_tsv_matches_binarised_split(trained, tmp_path):
    data, ckpt = trained
    wp = _wordpiece_dir(tmp_path)
    common = ["--checkpoint", str(ckpt), "--data-bin", str(data), "--batch-size", "5", "--bpe", "wordpiece",
              "--bpe-dir", str(wp)]
    p_bin = _run("eval", *common, "--predictions", str(tmp_path / "bin.tsv"))
    p_tsv = _run("eval", *common, "--tsv", str(_tiny_tsv(data, tmp_path / "dev.tsv")), "--task", "RT-SENT",
                 "--compare-qat", "--predictions", str(tmp_path / "tsv.tsv"))
    assert p_bin.returncode == 0 and p_tsv.returncode == 0, p_bin.stderr[-2000:] + p_tsv.stderr[-2000:]
    r_bin = json.loads(p_bin.stdout.strip().splitlines()[-1])
    r_tsv = json.loads(p_tsv.stdout.strip().splitlines()[-1])
    assert r_tsv["sentences"] == r_tsv["labelled"] == 32
    assert r_tsv["accuracy"] == r_bin["accuracy"] == r_tsv["qat_accuracy"]
    preds = (tmp_path / "tsv.tsv").read_text().splitlines()
    assert preds == (tmp_path / "bin.tsv").read_text().splitlines()
    assert preds[0] == "index\tprediction" and len(preds) == 33 and {x.split("\t")[1] for x in preds[1:]} <= {"0", "1"}
    # an unlabelled test file is predicted, not scored
    p = _run("eval", *common, "--tsv", str(_tiny_tsv(data, tmp_path / "test.tsv", with_labels=False)), "--task",
             "RT-SENT", "--predictions", str(tmp_path / "test_pred.tsv"))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["accuracy"] is None and res["labelled"] == 0
    assert (tmp_path / "test_pred.tsv").read_text().splitlines() == preds


def test_eval_tsv_bad_input_exit_2(trained, tmp_path, capsys):
    from ibert_plugin.engine import cli

    data, ckpt = trained
    wp = _wordpiece_dir(tmp_path)
    common = ["eval", "--checkpoint", str(ckpt), "--data-bin", str(data), "--bpe", "wordpiece", "--bpe-dir", str(wp)]
    bad = tmp_path / "dev.tsv"

    def run(*args):
        rc = cli.main([*common, *args])
        return rc, capsys.readouterr().err.strip().splitlines()

    bad.write_text("sentence\tlabel\nw1 w2\t1\nw3 w4 only-one-field\n")
    want = f"error: {bad}:3: expected 2 tab-separated fields, got 1"
    assert run("--tsv", str(bad), "--task", "RT-SENT") == (2, [want])
    bad.write_text("sentence\tlabel\nw1 w2\t7\n")
    rc, err = run("--tsv", str(bad), "--task", "RT-SENT")
    assert rc == 2 and len(err) == 1 and "bad label '7'" in err[0]
    rc, err = run("--tsv", str(bad), "--task", "NOPE")
    assert rc == 2 and len(err) == 1 and "unknown task 'NOPE'" in err[0]
    rc, err = run("--tsv", str(tmp_path / "missing.tsv"), "--task", "RT-SENT")
    assert rc == 2 and len(err) == 1 and "file not found" in err[0]


# ---------------------------------------------------------------------------------------------------- model file
#: sitecustomize for the no-fairseq subprocesses: any import of fairseq / fairseq_cli fails, and is recorded.
NO_FAIRSEQ = """import atexit, os, sys
_seen = []
class _NoFairseq:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fairseq", "fairseq_cli"):
            _seen.append(name)
            raise ImportError("fairseq import blocked: " + name)
sys.meta_path.insert(0, _NoFairseq())
atexit.register(lambda: open(os.environ["NO_FAIRSEQ_LOG"], "w").write("\\n".join(_seen)))
"""


def _run_no_fairseq(tmp_path, *args, stdin=None):
    site = tmp_path / "no_fairseq"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_FAIRSEQ)
    log = tmp_path / "fairseq_imports.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), NO_FAIRSEQ_LOG=str(log),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ibert_plugin.engine", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, input=stdin)
    assert log.read_text() == "", f"fairseq imports attempted: {log.read_text()}"
    return proc


@pytest.fixture(scope="module")
def model_int(trained, tmp_path_factory):
    data, ckpt = trained
    root = tmp_path_factory.mktemp("model_int")
    out = root / "model.int"
    p = _run("convert", "--checkpoint", str(ckpt), "--output", str(out), "--bpe", "wordpiece", "--bpe-dir",
             str(_wordpiece_dir(root)), "--task", "RT-SENT")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(f"wrote {out} (IBERT-INT v3")
    return out


def test_blocker_blocks_fairseq(tmp_path):
    site = tmp_path / "no_fairseq"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_FAIRSEQ)
    env = dict(os.environ, PYTHONPATH=str(site), NO_FAIRSEQ_LOG=str(tmp_path / "log"))
    p = subprocess.run([sys.executable, "-c", "import fairseq"], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "fairseq import blocked: fairseq" in p.stderr


def _checkpoint_logits(ckpt, data, sentences, batch_size):
    """Engine (from the checkpoint) logits (``predict_batches``, as ``predict``) and QAT logits on fairseq-encoded
    ``<s> sentence </s>`` rows."""
    from fairseq.data import Dictionary, data_utils

    from ibert_plugin.engine import convert

    d = Dictionary.load(str(data / "input0" / "dict.txt"))
    d.add_symbol("<mask>")
    rows = [torch.cat([torch.tensor([d.bos()]), d.encode_line(s, add_if_not_exist=False).long()]) for s in sentences]
    eng, model, _ = convert.from_checkpoint(str(ckpt), threads=1)
    qat_l = []
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            toks = data_utils.collate_tokens(rows[s: s + batch_size], d.pad(), left_pad=False)
            qat_l.append(model(toks, features_only=True, classification_head_name="sentence_classification_head")[0])
    return eng.predict_batches(rows, batch_size), torch.cat(qat_l)


def test_predict_from_model_file_without_fairseq_is_bit_exact(trained, model_int, tmp_path):
    data, ckpt = trained
    sents = (data.parent / "raw" / "valid.input0").read_text().splitlines()
    p = _run_no_fairseq(tmp_path, "predict", "--model", str(model_int), "--format", "jsonl", "--batch-size", "8",
                        "--threads", "1", stdin="\n".join(sents) + "\n")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert [r["index"] for r in rows] == list(range(32))
    labels = list(rows[0]["probabilities"])
    probs = torch.tensor([[r["probabilities"][k] for k in labels] for r in rows], dtype=torch.float64)
    eng_logits, qat_logits = _checkpoint_logits(ckpt, data, sents, 8)
    # the label dictionary's order is the head's class order
    assert torch.equal(probs, torch.softmax(eng_logits.double(), dim=-1))
    assert [labels[i] for i in qat_logits.argmax(-1).tolist()] == [r["prediction"] for r in rows]
    # sentences as arguments, TSV out: the same predictions
    p = _run_no_fairseq(tmp_path, "predict", "--model", str(model_int), sents[0], sents[1], "--threads", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout.splitlines()
    assert out[0] == "index\tprediction\t" + "\t".join(f"p_{k}" for k in labels) and len(out) == 3
    assert [x.split("\t")[1] for x in out[1:]] == [rows[0]["prediction"], rows[1]["prediction"]]
    assert float(out[1].split("\t")[2]) == pytest.approx(rows[0]["probabilities"][labels[0]], abs=1e-6)


def test_eval_from_model_file_without_fairseq_matches_qat(trained, model_int, tmp_path):
    data, ckpt = trained
    dev = _tiny_tsv(data, tmp_path / "dev.tsv")
    p_file = _run_no_fairseq(tmp_path, "eval", "--model", str(model_int), "--tsv", str(dev), "--predictions",
                             str(tmp_path / "file.tsv"), "--batch-size", "5")
    assert p_file.returncode == 0, p_file.stderr[-2000:]
    p_ckpt = _run("eval", "--checkpoint", str(ckpt), "--data-bin", str(data), "--compare-qat", "--predictions",
                  str(tmp_path / "ckpt.tsv"))
    assert p_ckpt.returncode == 0, p_ckpt.stderr[-2000:]
    r_file = json.loads(p_file.stdout.strip().splitlines()[-1])
    r_ckpt = json.loads(p_ckpt.stdout.strip().splitlines()[-1])
    assert r_file["labelled"] == r_ckpt["labelled"] == 32
    assert r_file["accuracy"] == r_ckpt["accuracy"] == r_ckpt["qat_accuracy"]
    assert (tmp_path / "file.tsv").read_text() == (tmp_path / "ckpt.tsv").read_text()


def _bad_checkpoint(kind, ckpt, tmp):
    p = tmp / f"{kind}.pt"
    if kind == "random":
        p.write_bytes(bytes(range(256)) * 16)
    elif kind == "truncated":
        p.write_bytes(ckpt.read_bytes()[:4096])
    elif kind == "foreign":
        torch.save({"weights": torch.ones(3)}, p)
    elif kind == "pickled_object":
        torch.save({"model": {}, "args": Path("x")}, p)
    return p


@pytest.mark.parametrize("kind", ["random", "truncated", "foreign", "pickled_object"])
@pytest.mark.parametrize("cmd", ["convert", "eval"])
def test_bad_checkpoint_is_one_error_line(trained, tmp_path, capsys, kind, cmd):
    from ibert_plugin.engine import cli

    data, ckpt = trained
    bad = _bad_checkpoint(kind, ckpt, tmp_path)
    argv = ["convert", "--checkpoint", str(bad), "--output", str(tmp_path / "x.int")] if cmd == "convert" else \
        ["eval", "--checkpoint", str(bad), "--data-bin", str(data)]
    rc = cli.main(argv)
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("INFO:")]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "is not a valid checkpoint" in err[0], err
    assert "weights_only" not in err[0] and not (tmp_path / "x.int").exists()


def test_model_file_errors_exit_2(trained, model_int, tmp_path):
    data, ckpt = trained
    p = _run_no_fairseq(tmp_path, "predict", "--model", str(ckpt), "w1 w2")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"error: {ckpt}: not an IBERT-INT model file"]
    trunc = tmp_path / "t.int"
    trunc.write_bytes(model_int.read_bytes()[:50000])
    p = _run_no_fairseq(tmp_path, "eval", "--model", str(trunc), "--tsv", str(_tiny_tsv(data, tmp_path / "d.tsv")))
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(f"error: {trunc}: truncated IBERT-INT")
    p = _run_no_fairseq(tmp_path, "eval", "--model", str(model_int), "--tsv", str(tmp_path / "d.tsv"),
                        "--compare-qat")
    assert p.returncode == 2 and "need --checkpoint" in p.stderr


def _one_error(p, *needles):
    err = (p.stderr if isinstance(p.stderr, str) else p.stderr.decode("utf-8", "replace")).strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]


def test_bad_text_input_is_one_error_line(model_int, tmp_path):
    """Non-UTF-8 sentences (argv, stdin), non-UTF-8 or binary --tsv, and bad --threads: one error line, exit 2."""
    m = str(model_int)
    cmd = [sys.executable, "-m", "ibert_plugin.engine"]
    p = subprocess.run(cmd + ["predict", "--model", m, "fine", b"caf\xe9 au lait"], capture_output=True, cwd=REPO)
    _one_error(p, "sentence argument 2 is not UTF-8 text (byte 0xe9 at character 3)")
    p = subprocess.run(cmd + ["predict", "--model", m], input=b"fine film\n\xff\xfe dull\n", capture_output=True,
                       cwd=REPO)
    _one_error(p, "<stdin>:2: not UTF-8 text (byte 0xff at offset 10)")
    latin1, binary = tmp_path / "latin1.tsv", tmp_path / "binary.tsv"
    latin1.write_bytes(b"sentence\tlabel\na fine film\t1\nun caf\xe9 fade\t0\n")
    binary.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\t\x00\n")
    for sub in (["predict"], ["eval"]):
        p = _run(*sub, "--model", m, "--tsv", str(latin1), "--task", "RT-SENT")
        _one_error(p, f"{latin1}:3: not UTF-8 text (byte 0xe9 at offset")
        p = _run(*sub, "--model", m, "--tsv", str(binary), "--task", "RT-SENT")
        _one_error(p, f"{binary}:1: not UTF-8 text (byte 0x8b at offset 1)")
    nul = tmp_path / "nul.tsv"
    nul.write_bytes(b"a\x00b\t1\n")
    _one_error(_run("eval", "--model", m, "--tsv", str(nul), "--task", "RT-SENT"), f"{nul}:1: binary data (a NUL")
    for t in ("-2", "0"):
        _one_error(_run("predict", "--model", m, "--threads", t, "a fine film"), f"--threads must be >= 1 (got {t}")
