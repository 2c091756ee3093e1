"""The RT-SENT post-training peers' scoring path (``benchmarks/rt_sent_accuracy.py --peers``): another encoder of a
checkpoint, through the checkpoint's own float head, scored sentence by sentence like the checkpoint itself."""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_helpers as mh  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_a_plain_encoder_of_the_checkpoint_scores_like_the_checkpoint(tmp_path):
    """FloatEncoder (what every peer is exported from) + the checkpoint's head gives the checkpoint's own per-sentence
    outcomes; a broken encoder (its features negated) does not, so the comparison can fail."""
    from fairseq import checkpoint_utils

    from ibert_plugin.recipes.scoring import score_checkpoint
    from integer_engine import FloatEncoder

    data = mh.make_tiny_glue(tmp_path, n_train=64, n_valid=32)
    mh.fairseq_train(data, tmp_path / "ck", arch="ibert_roberta_tiny", extra=["--quant-mode", "none"], max_update=8)
    ckpt = tmp_path / "ck" / "checkpoint_best.pt"
    own = score_checkpoint(ckpt, data, tmp_path, "RT-SENT", splits=("valid",))["valid"]
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(ckpt)], arg_overrides={"data": str(data)})
    enc = FloatEncoder(models[0].eval())
    via = score_checkpoint(ckpt, data, tmp_path, "RT-SENT", splits=("valid",), encoder=enc)["valid"]
    assert len(own) == 32 and via == own
    calls = []  # an array output is accepted too; a wrong encoder (negated features) changes the outcomes
    wrong = score_checkpoint(ckpt, data, tmp_path, "RT-SENT", splits=("valid",),
                             encoder=lambda t: calls.append(1) or -enc(t).numpy())["valid"]
    assert calls and wrong != own


def test_an_unknown_peer_fails_before_any_training():
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rt_sent_accuracy.py"), "--peers", "tflite_int8"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: unknown peer(s) tflite_int8")
    assert "Traceback" not in p.stderr and "demo:" not in p.stdout
