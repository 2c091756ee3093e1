"""``python -m ibert_plugin.engine eval`` on a tiny trained checkpoint: same accuracy as the QAT model, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_helpers as mh  # noqa: E402

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
    d = model.encoder.sentence_encoder.dictionary if hasattr(model.encoder.sentence_encoder, "dictionary") else None
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
    """A WordPiece vocabulary in which every tiny-data word is one piece, so the TSV encodes like the binarised split."""
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


def test_eval_tsv_bad_input_exit_2(trained, tmp_path):
    data, ckpt = trained
    wp = _wordpiece_dir(tmp_path)
    common = ["eval", "--checkpoint", str(ckpt), "--data-bin", str(data), "--bpe", "wordpiece", "--bpe-dir", str(wp)]
    bad = tmp_path / "dev.tsv"
    bad.write_text("sentence\tlabel\nw1 w2\t1\nw3 w4 only-one-field\n")
    p = _run(*common, "--tsv", str(bad), "--task", "RT-SENT")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == f"error: {bad}:3: expected 2 tab-separated fields, got 1"
    bad.write_text("sentence\tlabel\nw1 w2\t7\n")
    p = _run(*common, "--tsv", str(bad), "--task", "RT-SENT")
    assert p.returncode == 2 and "bad label '7'" in p.stderr and "Traceback" not in p.stderr
    p = _run(*common, "--tsv", str(bad), "--task", "NOPE")
    assert p.returncode == 2 and "unknown task 'NOPE'" in p.stderr
    p = _run(*common, "--tsv", str(tmp_path / "missing.tsv"), "--task", "RT-SENT")
    assert p.returncode == 2 and "file not found" in p.stderr
