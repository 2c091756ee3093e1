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
