"""Helpers for building small fairseq RoBERTa models and data in tests (no network, CPU)."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "ibert_plugin"

TINY_DIMS = [
    "--encoder-layers", "2", "--encoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "4",
]


class _Task:
    """The two things ``RobertaModel.build_model`` needs from a task."""

    def __init__(self, dictionary, max_positions=512):
        self.source_dictionary = dictionary
        self._max_positions = max_positions

    def max_positions(self):
        return self._max_positions


def make_dictionary(num_words=60):
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(num_words):
        d.add_symbol(f"w{i}")
    d.add_symbol("<mask>")
    return d


def parse_model_args(arch, extra=()):
    from fairseq import options

    import ibert_plugin  # noqa: F401  (registers the architectures)

    parser = options.get_training_parser()
    argv = ["unused-data", "--task", "sentence_prediction", "--num-classes", "2", "--arch", arch,
            "--max-positions", "64", *extra]
    return options.parse_args_and_arch(parser, argv)


def build_model(arch, dictionary, extra=(), num_classes=2, seed=0):
    """Build ``arch`` for ``dictionary`` with a sentence classification head, in eval mode."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    args = parse_model_args(arch, extra)
    torch.manual_seed(seed)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, _Task(dictionary))
    model.register_classification_head("sentence_classification_head", num_classes=num_classes)
    return model.eval()


def random_batch(dictionary, bsz=3, tgt_len=12, seed=0):
    """Token batch with <s> ... </s>, varying lengths and left-over right padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(dictionary.nspecial, len(dictionary) - 1, (bsz, tgt_len), generator=g)
    tokens[:, 0] = dictionary.bos()
    for i in range(bsz):
        length = max(tgt_len - 3 * i, 2)
        tokens[i, length - 1] = dictionary.eos()
        tokens[i, length:] = dictionary.pad()
    return tokens


def make_tiny_glue(root: Path, n_train=64, n_valid=32, seed=0, pair=False):
    """Whitespace-token sentence classification data binarised with fairseq-preprocess (``root/bin``)."""
    import random

    rng = random.Random(seed)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(40)]
    with open(raw / "dict.txt", "w") as f:
        for w in words:
            f.write(f"{w} 1\n")
    for split, n in (("train", n_train), ("valid", n_valid)):
        with open(raw / f"{split}.input0", "w") as f0, open(raw / f"{split}.input1", "w") as f1, \
                open(raw / f"{split}.label", "w") as fl:
            for _ in range(n):
                label = rng.randint(0, 1)
                # label 1 sentences use the first half of the vocabulary: learnable in a few updates
                pool = words[:20] if label else words[20:]
                f0.write(" ".join(rng.choice(pool) for _ in range(rng.randint(3, 10))) + "\n")
                f1.write(" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + "\n")
                fl.write(f"{label}\n")
    bindir = root / "bin"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    inputs = ["input0", "input1"] if pair else ["input0"]
    for name in inputs:
        subprocess.run(
            [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--trainpref", str(raw / f"train.{name}"),
             "--validpref", str(raw / f"valid.{name}"), "--destdir", str(bindir / name), "--workers", "1",
             "--srcdict", str(raw / "dict.txt")],
            check=True, capture_output=True, env=env,
        )
    subprocess.run(
        [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--trainpref", str(raw / "train.label"),
         "--validpref", str(raw / "valid.label"), "--destdir", str(bindir / "label"), "--workers", "1"],
        check=True, capture_output=True, env=env,
    )
    return bindir


def fairseq_train(data_bin: Path, save_dir: Path, arch="ibert_roberta_tiny", extra=(), max_update=6):
    """Run ``fairseq-train --user-dir ibert_plugin`` on tiny data; returns the completed process (check=True)."""
    argv = [
        sys.executable, "-m", "fairseq_cli.train", str(data_bin), "--user-dir", str(PLUGIN_DIR), "--cpu",
        "--task", "sentence_prediction", "--num-classes", "2", "--init-token", "0", "--separator-token", "2",
        "--max-positions", "64", "--arch", arch, "--criterion", "sentence_prediction", "--optimizer", "adam",
        "--adam-betas", "(0.9,0.98)", "--lr", "1e-3", "--lr-scheduler", "polynomial_decay", "--warmup-updates", "0",
        "--total-num-update", str(max_update), "--max-update", str(max_update), "--batch-size", "16",
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "1",
        "--num-workers", "0", "--seed", "1", "--best-checkpoint-metric", "accuracy",
        "--maximize-best-checkpoint-metric", "--dropout", "0.1", "--attention-dropout", "0.1", *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"fairseq-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# ---------------------------------------------------------------------------------------------------- bit-exactness
HEAD = "sentence_classification_head"  # the head build_model registers (= engine.qat_compare.HEAD)


def perturb(model, seed):
    """Give a randomly initialised model non-trivial, wide-range parameters (in place).

    Every linear output row is rescaled log-normally (per-channel weight scales spread over ~2 decades), biases get
    N(0, sigma) with a per-seed sigma and FC1 some large ones (|b| up to 6: GELU far in its tails), every LayerNorm
    gets gamma in +-[0.2, 2.5] (about a fifth negative) and beta ~ N(0, 0.7), token embedding rows are rescaled
    log-normally (wide dynamic range of the embedding sum). Seeds ``3k + 1`` also shrink a tenth of the FC1 rows by
    0.1 (accumulator scales down to ~1e-6: GELU outputs near 2^50 for the requantization after it); seeds ``5k`` set
    one gamma per LayerNorm to exactly 0 (the gamma guard).
    """
    from ibert_plugin.quant.modules import IntLayerNorm, QuantLinear

    g = torch.Generator().manual_seed(10_000 + seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    sigma_b = float(0.05 + 1.5 * rand(1))
    enc = model.encoder.sentence_encoder
    with torch.no_grad():
        for name, mod in enc.named_modules():
            if isinstance(mod, QuantLinear):
                n_out = mod.weight.shape[0]
                mod.weight.mul_(torch.exp(0.8 * randn(n_out, 1)))
                mod.bias.copy_(sigma_b * randn(n_out))
                if name.endswith("fc1"):
                    if seed % 3 == 1:
                        mod.weight[rand(n_out) < 0.1] *= 0.1
                    big = rand(n_out) < 0.15
                    mod.bias[big] = (2.0 + 4.0 * rand(int(big.sum()))) * torch.sign(randn(int(big.sum())))
            elif isinstance(mod, IntLayerNorm):
                c = mod.weight.shape[0]
                sign = torch.where(rand(c) < 0.2, -1.0, 1.0)
                mod.weight.copy_(sign * (0.2 + 2.3 * rand(c)))
                if seed % 5 == 0:
                    mod.weight[int(rand(1) * c)] = 0.0
                mod.bias.copy_(0.7 * randn(c))
        tok = enc.embed_tokens.weight
        tok.mul_(torch.exp(0.7 * randn(tok.shape[0], 1)))
        enc.embed_positions.weight.mul_(1.0 + 3.0 * rand(1))
    return model


def calibrate(model, batches):
    """Set the activation ranges and LayerNorm shifts: train-mode forwards (no grad) on ``batches``; returns the model
    in eval mode (ranges frozen)."""
    model.train()
    with torch.no_grad():
        for tokens in batches:
            model(tokens, features_only=True)
    return model.eval()


def perturbed_calibrated(template, dictionary, seed):
    """A copy of ``template`` re-initialised with ``seed`` (BERT init), :func:`perturb`-ed and :func:`calibrate`-d on
    :func:`wide_batches`: the models of the seed sweeps, in eval mode."""
    from fairseq.modules.transformer_sentence_encoder import init_bert_params

    model = copy.deepcopy(template)
    torch.manual_seed(seed)
    model.apply(init_bert_params)
    perturb(model, seed)
    return calibrate(model, wide_batches(dictionary, seed))


def wide_batches(dictionary, seed, n=3, max_len=48):
    """Calibration batches of mixed lengths (up to ``max_len``, padded) for :func:`calibrate`."""
    g = torch.Generator().manual_seed(seed)
    return [random_batch(dictionary, bsz=4, tgt_len=int(torch.randint(6, max_len + 1, (1,), generator=g)),
                         seed=seed * 31 + i) for i in range(n)]


# ---------------------------------------------------------------------------------------------------- MiniLM assets
def data_dir() -> Path:
    from ibert_plugin.assets.common import data_dir as _data_dir

    return _data_dir()


def require_assets(*rel):
    """Paths under the data folder; a missing one fails the test (``make test`` builds them first)."""
    import pytest

    paths = [data_dir() / r for r in rel]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.fail(f"assets missing: {', '.join(missing)} (run: python -m ibert_plugin.assets build)")
    return paths


def minilm_dictionary():
    """The imported MiniLM's fairseq dictionary plus ``<mask>`` (as the sentence_prediction task loads it)."""
    from fairseq.data import Dictionary

    (dict_txt,) = require_assets("minilm/dict.txt")
    d = Dictionary.load(str(dict_txt))
    d.add_symbol("<mask>")
    return d


def minilm_model(dictionary, weight_bits):
    """``ibert_roberta_minilm`` in symmetric (I-BERT) mode with ``weight_bits`` weights, loaded strictly from the
    imported ``data/minilm/model.pt`` (the classification head stays randomly initialised, seed 0)."""
    from fairseq import checkpoint_utils

    (pt,) = require_assets("minilm/model.pt")
    model = build_model("ibert_roberta_minilm", dictionary,
                        extra=["--quant-mode", "symmetric", "--weight-bits", str(weight_bits),
                               "--max-positions", "512"])
    state = checkpoint_utils.load_checkpoint_to_cpu(str(pt))["model"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def rt_sent_sentences(split="train"):
    """RT-SENT sentences of ``split`` (``train`` or ``dev``) in file order."""
    from ibert_plugin.assets import glue

    (tsv,) = require_assets(f"glue/RT-SENT/{split}.tsv")
    cols, _, _ = glue.read_split(tsv, glue.TASKS["RT-SENT"], split)
    return cols[0]


def wordpiece_rows(dictionary, sentences, lengths=None):
    """``<s> sentence </s>`` id rows (WordPiece from ``data/minilm``). With ``lengths``, row ``i`` joins consecutive
    sentences until it has ``lengths[i]`` tokens (truncated, ``</s>`` last): real text at long lengths."""
    from ibert_plugin.assets import glue

    enc = glue.BpeEncoder("wordpiece", data_dir() / "minilm")
    ids = [dictionary.encode_line(s, append_eos=False, add_if_not_exist=False).tolist()
           for s in enc.encode_all(sentences)]
    if lengths is None:
        return [torch.tensor([dictionary.bos()] + r + [dictionary.eos()]) for r in ids]
    rows, it = [], iter(ids)
    for n in lengths:
        body = []
        while len(body) < n - 2:
            body += next(it)
        rows.append(torch.tensor([dictionary.bos()] + body[: n - 2] + [dictionary.eos()]))
    return rows


def pad_rows(dictionary, rows, length=None):
    """Right-padded ``[len(rows), max(length, longest)]`` token batch."""
    T = max([len(r) for r in rows] + [length or 0])
    out = torch.full((len(rows), T), dictionary.pad(), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
