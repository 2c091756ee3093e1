"""Helpers for building small fairseq RoBERTa models and data in tests (no network, CPU)."""
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
    import ibert_plugin  # noqa: F401  (registers the architectures)
    from fairseq import options

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
