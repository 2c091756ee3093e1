"""GPT-2 BPE files rebuilt from whisper's gpt2.tiktoken are byte-identical to OpenAI's (sha256 check),
and the hf_wordpiece BPE round-trips. Skips (with the reason) when openai-whisper is not installed."""
import hashlib
import importlib.util
from pathlib import Path

import pytest

FIX = Path(__file__).resolve().parent / "fixtures"


def _whisper_dir():
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / "assets" / "gpt2.tiktoken").is_file() else None


@pytest.mark.skipif(_whisper_dir() is None,
                    reason="openai-whisper==20250625 not installed (python -m ibert_plugin.assets build --only bpe)")
def test_gpt2_bpe_hashes_and_rerun(tmp_path):
    from ibert_plugin.assets import gpt2_bpe

    out = gpt2_bpe.build_gpt2_bpe(_whisper_dir(), tmp_path / "gpt2_bpe")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert sha(out / "encoder.json") == gpt2_bpe.ENCODER_JSON_SHA256
    assert sha(out / "vocab.bpe") == gpt2_bpe.VOCAB_BPE_SHA256
    lines = (out / "dict.txt").read_text().splitlines()
    assert len(lines) == 50257 and lines[0] == "0 1" and lines[-1] == "50256 1"
    # Re-run is a no-op (stamp verified), and a corrupted output is rebuilt.
    mtime = (out / "vocab.bpe").stat().st_mtime_ns
    gpt2_bpe.build_gpt2_bpe(_whisper_dir(), out)
    assert (out / "vocab.bpe").stat().st_mtime_ns == mtime
    (out / "vocab.bpe").write_text("#version: 0.2\n")
    gpt2_bpe.build_gpt2_bpe(_whisper_dir(), out)
    assert sha(out / "vocab.bpe") == gpt2_bpe.VOCAB_BPE_SHA256


def test_gpt2_bpe_missing_source_is_asset_error(tmp_path):
    from ibert_plugin.assets import gpt2_bpe
    from ibert_plugin.assets.common import AssetError

    with pytest.raises(AssetError, match="gpt2.tiktoken not found"):
        gpt2_bpe.build_gpt2_bpe(tmp_path, tmp_path / "out")


def test_hf_wordpiece_bpe_roundtrip():
    from argparse import Namespace

    from fairseq.data.encoders import build_bpe

    import ibert_plugin.assets.wordpiece_bpe  # noqa: F401  (registers hf_wordpiece)

    bpe = build_bpe(Namespace(bpe="hf_wordpiece", wordpiece_vocab=str(FIX / "wordpiece_tiny" / "vocab.txt"),
                              wordpiece_lowercase="auto"))
    enc = bpe.encode("A boring MESS of a movie.")
    assert enc == "a boring me ##ss of a movie ."
    assert bpe.decode(enc) == "a boring mess of a movie."
    assert not bpe.is_beginning_of_word("##ss") and bpe.is_beginning_of_word("me")
    assert bpe.encode("zebra") == "[UNK]"


def test_hf_wordpiece_flags_parse_through_fairseq_argparse(tmp_path):
    """``--bpe hf_wordpiece --wordpiece-vocab V`` on fairseq's own command-line path (the dataclass fields are turned
    into argparse options from their runtime type annotations, which string annotations would break)."""
    from fairseq import options
    from fairseq.data.encoders import build_bpe

    import ibert_plugin.assets.wordpiece_bpe  # noqa: F401  (registers hf_wordpiece)

    vocab = str(FIX / "wordpiece_tiny" / "vocab.txt")
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(tmp_path), "--arch", "roberta_base", "--task", "masked_lm",
                                                "--bpe", "hf_wordpiece", "--wordpiece-vocab", vocab])
    assert args.wordpiece_vocab == vocab and args.wordpiece_lowercase == "auto"
    assert build_bpe(args).encode("A boring MESS") == "a boring me ##ss"
