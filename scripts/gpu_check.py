#!/usr/bin/env python3
"""The GPU check (issue 25): the demo's MiniLM on RT-SENT through ``run.py`` on CUDA, about 8 minutes on one H100.

Stages (``run.py`` launches, batch 32, ``--log-interval 1`` so that every update's time is in the log):

1. FP fine-tuning from the pretrained MiniLM with ``--fp16`` (fairseq's GLUE recipe; the FP stage only), 300 updates;
2. an FP32 timing run from the same start (60 updates, nothing saved): the baseline of the step-time targets;
3. I-BERT W8A8 QAT from the FP checkpoint (100 updates);
4. TernaryBERT W2A8 TWN distillation from the FP checkpoint (prediction + intermediate distillation, 150 updates);
5. integer-only ternary (W2-E8-A8 QAT from the TernaryBERT checkpoint, 100 updates).

Then:

(a) bit-exactness across devices: each integer-only checkpoint (W8A8, integer ternary) is loaded once on the CPU and
    once on CUDA; on dev batches every hooked integer output (:mod:`ibert_plugin.engine.qat_compare`: embedding sum,
    embedding LayerNorm, every QuantAct, softmax, i-GELU and LayerNorm of every layer) must be equal with
    ``torch.equal`` between CUDA, CPU and the integer engine; the logits are compared too (the engine's must equal the
    CPU model's; CUDA's float head may round differently: its largest difference is reported);
(b) step time: per stage, the median [min, max] of the per-update wall time (fairseq's ``ups`` at log interval 1,
    updates 11 to the end of the first epoch), and each quantized stage's median over the FP32 and FP16 medians;
    targets: I-BERT QAT <= 2x FP32, TernaryBERT distillation <= 2.5x FP32;
(c) accuracy: best dev accuracy (fairseq's validation) and test accuracy (``test_with_labels.tsv``) of every model.

The last line of the output is one JSON object (also written to ``--json``). Exit status 0 when it ran, whatever the
figures (``"targets"`` in the JSON says which were met), non-zero with one ``error:`` line otherwise.

``--dry-run`` (CPU-only machines; CI runs it): parses every stage's ``run.py`` flags, checks the assets, prints the
commands, and runs the comparison code on a tiny integer model, CPU against CPU and against the engine; no training.

Bringing fairseq to a GPU machine that has Python 3.12 and torch with CUDA but no fairseq and no network: on a
machine with PyPI access, download into one folder (``wheels/``)::

    pip download --no-deps --no-binary :all: fairseq-fixed==0.12.3.1 -d wheels            # the sdist
    pip download --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        --platform manylinux_2_17_x86_64 -d wheels hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \\
        bitarray

(``antlr4-python3-runtime`` is hydra's and omegaconf's one dependency; fairseq's others -- numpy, cython, regex,
sacrebleu, scikit-learn, tqdm, torchaudio -- are usually there already: ``pip show`` them) and build the assets
(``make assets``: ``data/minilm``, ``data/glue/RT-SENT``, ``data/glue-bin/RT-SENT-bin``). Copy ``wheels/`` and
``data/`` next to the repository on the GPU machine, then there::

    pip install --no-index --find-links wheels --no-deps hydra-core omegaconf antlr4-python3-runtime bitarray
    pip install --no-index --find-links wheels --no-deps --no-build-isolation fairseq-fixed   # builds, minutes
    make gpu-check     # builds the C++ kernels, runs the check; the JSON also goes to outputs/gpu_check.json

(``--target DIR`` plus ``PYTHONPATH=DIR`` works where site-packages is read-only; ``run.py`` then starts
``python -m fairseq_cli.train``.)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TASK = "RT-SENT"
HEAD = "sentence_classification_head"
#: Updates of the first epoch of RT-SENT at batch 32 (8,568 training sentences).
UPDATES_PER_EPOCH = 268
#: Updates left out of the step times: CUDA context, cuBLAS handles, allocator growth, lazily placed teacher.
WARMUP_STEPS = 10
#: Step-time targets over the FP32 step (issue 25).
TARGETS = {"w8": 2.0, "ternary": 2.5}
#: Sentences per comparison batch, and how many batches (spread over the length-sorted dev set).
CMP_BATCH, CMP_BATCHES = 32, 4


class CheckError(Exception):
    """Bad input or a failed stage: ``main`` prints ``error: <message>`` and exits 2."""


def _log(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------- plan
def _stage_argv(common: List[str], mode: List[str], updates: int, warmup: float, extra: List[str] = ()) -> List[str]:
    """run.py flags of one stage: stop after ``updates``, LR schedule fitted into them, no mid-run validation,
    every update logged (its time is what (b) reads)."""
    return [*common, *mode, "--max-update", str(updates), "--",
            "--total-num-update", str(updates), "--warmup-updates", str(int(updates * warmup)),
            "--validate-interval-updates", "0", "--log-interval", "1", "--log-format", "simple", *extra]


def plan(a: argparse.Namespace, data: Path, out: Path, fp_ckpt: str = "<fp>", tern_ckpt: str = "<ternary>"):
    """``[(key, label, run.py argv)]`` in order; ``fp_ckpt`` / ``tern_ckpt`` fill in the checkpoints later stages
    start from."""
    from ibert_plugin.quant.config import IBERT_W8A8, INT_TERNARY_W2, TERNARYBERT_W2A8

    common = ["--arch", "minilm", "--task", TASK, "--data-dir", str(data / "glue-bin"), "--output-dir", str(out),
              "--bs", "32", "--fresh"]
    pretrained = str(a.pretrained or data / "minilm" / "model.pt")
    tern = [*TERNARYBERT_W2A8.to_flags(), "--pred-distill", "--intermediate-distill", "--lr", "1e-4"]
    return [
        ("fp16", "FP fine-tuning (--fp16)", _stage_argv(
            common, ["--quant-mode", "none", "--restore-file", pretrained, "--lr", "1e-4"], a.fp_updates, 0.1,
            ["--fp16"] if a.device == "cuda" else [])),
        ("fp32", "FP32 timing run", _stage_argv(
            common, ["--quant-mode", "none", "--restore-file", pretrained, "--lr", "1e-4", "--no-save"],
            a.fp32_updates, 0.1)),
        ("w8", "I-BERT W8A8 QAT", _stage_argv(
            common, [*IBERT_W8A8.to_flags(), "--restore-file", fp_ckpt, "--lr", "1e-5"], a.qat_updates, 0.0)),
        ("ternary", "TernaryBERT W2A8 TWN distillation", _stage_argv(
            common, [*tern, "--restore-file", fp_ckpt], a.ternary_updates, 0.1)),
        ("int_ternary", "integer-only ternary (W2-E8-A8) QAT", _stage_argv(
            common, [*INT_TERNARY_W2.to_flags(), "--restore-file", tern_ckpt, "--lr", "2e-5"], a.int_ternary_updates,
            0.0)),
    ]


def assets(data: Path, pretrained: Optional[str]) -> Dict[str, Path]:
    """The files the check reads; :class:`CheckError` naming the first missing one and how to build it."""
    need = {
        "pretrained": Path(pretrained) if pretrained else data / "minilm" / "model.pt",
        "label_dict": data / "glue-bin" / f"{TASK}-bin" / "label" / "dict.txt",
        "train": data / "glue-bin" / f"{TASK}-bin" / "input0" / "train.bin",
        "valid": data / "glue-bin" / f"{TASK}-bin" / "input0" / "valid.bin",
        "test": data / "glue-bin" / f"{TASK}-bin" / "input0" / "test.bin",
        "test_labels": data / "glue" / TASK / "test_with_labels.tsv",
    }
    for what, path in need.items():
        if not path.is_file():
            raise CheckError(f"missing {what} asset {path}: build the assets with `make assets` (or "
                             f"`python -m ibert_plugin.demo` once) on a machine with package access and copy data/")
    return need


# ------------------------------------------------------------------------------------------------------- step times
_TRAIN_LINE = re.compile(r"\|\s*train_inner\s*\|\s*epoch (\d+):.*?\bups=([0-9.]+).*?\bnum_updates=(\d+)")


def step_times(log_text: str, warmup: int = WARMUP_STEPS, epoch_updates: int = UPDATES_PER_EPOCH) -> List[float]:
    """Seconds per update from fairseq's ``train_inner`` lines at ``--log-interval 1`` (``1 / ups``), updates
    ``warmup + 1`` to the end of the first epoch (the first update of the next epoch carries a validation)."""
    out = []
    for m in _TRAIN_LINE.finditer(log_text):
        epoch, ups, upd = int(m.group(1)), float(m.group(2)), int(m.group(3))
        if epoch == 1 and warmup < upd <= epoch_updates and ups > 0:
            out.append(1.0 / ups)
    return out


def summary(times: List[float]) -> Dict[str, float]:
    """``{"median", "min", "max", "n"}`` of per-update seconds (CheckError when there are none)."""
    if not times:
        raise CheckError("no per-update times in the log (needs --log-interval 1 --log-format simple and more than "
                         f"{WARMUP_STEPS} updates)")
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def ratios(steps: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Each quantized stage's median step over the FP32 and the FP16 median steps, and whether it meets its
    target (``TARGETS``, over FP32)."""
    out = {}
    for key, s in steps.items():
        if key in ("fp16", "fp32"):
            continue
        r = {"over_fp32": s["median"] / steps["fp32"]["median"], "over_fp16": s["median"] / steps["fp16"]["median"]}
        if key in TARGETS:
            r["target_over_fp32"] = TARGETS[key]
            r["met"] = r["over_fp32"] <= TARGETS[key]
        out[key] = r
    return out


# ------------------------------------------------------------------------------------------------------- comparison
def compare_on(model_cpu, device, batches, with_engine: bool = True) -> Dict[str, object]:
    """The same QAT model on the CPU and on ``device`` (a deep copy), and the integer engine built from it: every
    hooked integer output and the logits on each batch of tokens.

    Returns a JSON-able dict: differing integers per module (device vs CPU, engine vs CPU), the number of outputs
    compared, whether the logits are equal (engine vs CPU, device vs CPU) and the largest logit difference."""
    import torch

    from ibert_plugin.engine import convert, qat_compare

    model_dev = copy.deepcopy(model_cpu).to(device).eval()
    eng = convert.from_model(model_cpu) if with_engine else None
    dev_bad: Dict[str, int] = {}
    eng_bad: Dict[str, int] = {}
    n_outputs, eng_logits_equal, dev_logits_equal, max_logit_diff = 0, True, True, 0.0
    for tokens in batches:
        bad, n, logits_cpu, logits_dev = qat_compare.compare_devices(model_cpu, model_dev, tokens, HEAD)
        n_outputs += n
        for k, v in bad.items():
            dev_bad[k] = dev_bad.get(k, 0) + v
        dev_logits_equal &= torch.equal(logits_cpu, logits_dev)
        max_logit_diff = max(max_logit_diff, float((logits_cpu - logits_dev).abs().max()))
        if eng is not None:
            _, bad_e, _ = qat_compare.compare(eng, model_cpu, tokens, HEAD)
            for k, v in bad_e.items():
                eng_bad[k] = eng_bad.get(k, 0) + v
            eng_logits_equal &= torch.equal(eng.classify(tokens), logits_cpu)
    res = {"device": str(device), "outputs_compared": n_outputs, "device_vs_cpu_differing": dev_bad,
           "integers_equal_device_cpu": not dev_bad, "logits_equal_device_cpu": dev_logits_equal,
           "logits_max_abs_diff_device_cpu": max_logit_diff}
    if eng is not None:
        res.update({"engine_vs_cpu_differing": eng_bad, "integers_equal_engine_cpu": not eng_bad,
                    "logits_equal_engine_cpu": eng_logits_equal})
    return res


def dev_batches(checkpoint: str, data_bin: Path):
    """``CMP_BATCHES`` padded token batches of ``CMP_BATCH`` dev sentences, spread over the length-sorted dev set
    (short to long), collated as fairseq's validation does."""
    import numpy as np
    from fairseq import checkpoint_utils

    import ibert_plugin  # noqa: F401

    _, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": str(data_bin)})
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sizes = np.asarray(ds.sizes)
    order = np.argsort(sizes if sizes.ndim == 1 else sizes[0], kind="stable")
    starts = np.linspace(0, max(0, len(order) - CMP_BATCH), CMP_BATCHES).astype(int)
    return [ds.collater([ds[int(i)] for i in order[s:s + CMP_BATCH]])["net_input"]["src_tokens"] for s in starts]


# ---------------------------------------------------------------------------------------------------------- the run
def _require_fairseq() -> None:
    try:
        import fairseq  # noqa: F401
    except ImportError:
        raise CheckError("fairseq is not importable: install fairseq-fixed (sdist) with hydra-core, omegaconf and "
                         "bitarray as scripts/gpu_check.py's docstring says") from None


def _run_stage(key: str, label: str, argv: List[str]):
    import run as run_py

    _log(f"{label}: python run.py {' '.join(argv)}")
    t0 = time.time()
    try:
        res = run_py.main(argv)
    except run_py.RunError as e:
        raise CheckError(f"{label}: run.py refused: {e}") from None
    if res.returncode != 0:
        raise CheckError(f"{label} failed (exit {res.returncode}); see {res.log_path}")
    res.stage_seconds = time.time() - t0
    _log(f"{label}: done in {res.stage_seconds:.0f} s; {res.summary()}")
    return res


def run_check(a: argparse.Namespace, data: Path, out: Path) -> Dict[str, object]:
    import torch

    sys.path.insert(0, str(REPO))
    from ibert_plugin.engine import convert
    from ibert_plugin.recipes import scoring

    torch.backends.cuda.matmul.allow_tf32 = False  # the FP32 head of (a) in IEEE float32 on both devices
    torch.backends.cudnn.allow_tf32 = False
    data_bin = data / "glue-bin" / f"{TASK}-bin"
    t0 = time.time()
    results, steps = {}, {}
    fp_ckpt = tern_ckpt = None
    for i, (key, label, _) in enumerate(plan(a, data, out)):
        argv = plan(a, data, out, fp_ckpt or "<fp>", tern_ckpt or "<ternary>")[i][2]
        res = results[key] = _run_stage(key, label, argv)
        steps[key] = summary(step_times(Path(res.log_path).read_text(errors="replace")))
        if key == "fp16":
            fp_ckpt = res.checkpoint
        elif key == "ternary":
            tern_ckpt = res.checkpoint
    train_s = time.time() - t0

    device = torch.device(a.device)
    compare = {}
    batches = dev_batches(results["w8"].checkpoint, data_bin)
    for key in ("w8", "int_ternary"):
        model, _ = convert.load_qat_checkpoint(results[key].checkpoint)
        compare[key] = compare_on(model, device, batches)
        _log(f"{key}: {json.dumps(compare[key])}")

    accuracy = {}
    for key, res in results.items():
        if key == "fp32":  # the timing run saves nothing
            continue
        sc = scoring.score_checkpoint(Path(res.checkpoint), data_bin, data / "glue", TASK, splits=("test",),
                                      device=device)
        accuracy[key] = {"dev": res.best, "test": 100.0 * sum(sc["test"]) / len(sc["test"]),
                         "test_sentences": len(sc["test"])}

    rat = ratios(steps)
    integers_equal = all(c["integers_equal_device_cpu"] and c["integers_equal_engine_cpu"] for c in compare.values())
    return {
        "gpu_check": True, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "batch": 32, "step_s": steps, "step_ratio": rat, "compare": compare, "accuracy": accuracy,
        "targets": {"integers_equal": integers_equal,
                    **{f"{k}_step_over_fp32_le_{TARGETS[k]:g}": rat[k]["met"] for k in TARGETS}},
        "stage_s": {k: round(r.stage_seconds, 1) for k, r in results.items()},
        "train_s": round(train_s, 1), "total_s": round(time.time() - t0, 1),
    }


def dry_run(a: argparse.Namespace, data: Path, out: Path) -> Dict[str, object]:
    """The plumbing without a GPU and without training: flags, assets, commands, and the comparison code on a tiny
    calibrated integer model (CPU against CPU, and against the engine)."""
    from ibert_plugin.recipes.options import RunError, parse_args

    stages = []
    for key, label, argv in plan(a, data, out, fp_ckpt="fp/checkpoint_best.pt", tern_ckpt="tern/checkpoint_best.pt"):
        try:
            parse_args(argv)
        except RunError as e:
            raise CheckError(f"stage {key}: run.py refuses its flags: {e}") from None
        stages.append({"key": key, "label": label, "command": "python run.py " + " ".join(argv)})
        print(stages[-1]["command"])
    missing = None
    try:
        assets(data, a.pretrained)
    except CheckError as e:
        if a.require_assets:
            raise
        missing = str(e)
    _require_fairseq()
    cmp = compare_on(*_tiny_model(), with_engine=not a.skip_engine)
    ok = cmp["integers_equal_device_cpu"] and cmp["logits_equal_device_cpu"] and cmp.get(
        "integers_equal_engine_cpu", True) and cmp.get("logits_equal_engine_cpu", True)
    if not ok:
        raise CheckError(f"the comparison code found differences CPU against CPU: {json.dumps(cmp)}")
    return {"gpu_check": True, "dry_run": True, "stages": stages, "assets_missing": missing, "compare": cmp}


def _tiny_model():
    """A tiny symmetric-mode model with calibrated ranges, ``"cpu"``, and two padded token batches."""
    import torch
    from fairseq import options
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_REGISTRY

    import ibert_plugin  # noqa: F401

    d = Dictionary()
    for i in range(60):
        d.add_symbol(f"w{i}")

    class _Task:
        source_dictionary = d

        @staticmethod
        def max_positions():
            return 64

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["-", "--task", "sentence_prediction", "--num-classes", "2", "--arch",
                                                "ibert_roberta_tiny", "--max-positions", "64", "--quant-mode",
                                                "symmetric"])
    torch.manual_seed(0)
    model = ARCH_MODEL_REGISTRY["ibert_roberta_tiny"].build_model(args, _Task())
    model.register_classification_head(HEAD, num_classes=2)
    g = torch.Generator().manual_seed(0)
    batches = []
    for bsz, t in ((4, 16), (3, 9)):
        tok = torch.randint(d.nspecial, len(d), (bsz, t), generator=g)
        tok[:, 0] = d.bos()
        for i in range(1, bsz):  # rows of decreasing length, right-padded
            tok[i, t - 2 * i:] = d.pad()
        batches.append(tok)
    model.train()
    with torch.no_grad():
        for tok in batches:
            model(tok, features_only=True)
    return model.eval(), torch.device("cpu"), batches


# -------------------------------------------------------------------------------------------------------------- cli
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="asset folder (default $IBERT_DATA_DIR or <repo>/data)")
    p.add_argument("--output-dir", default=None, help="run.py output root (default outputs/gpu_check)")
    p.add_argument("--pretrained", default=None, help="pretrained MiniLM model.pt (default <data-dir>/minilm/model.pt)")
    p.add_argument("--fp-updates", type=int, default=300, help="FP (--fp16) fine-tuning updates (default 300)")
    p.add_argument("--fp32-updates", type=int, default=60, help="FP32 timing-run updates (default 60)")
    p.add_argument("--qat-updates", type=int, default=100, help="I-BERT W8A8 QAT updates (default 100)")
    p.add_argument("--ternary-updates", type=int, default=150, help="TernaryBERT distillation updates (default 150)")
    p.add_argument("--int-ternary-updates", type=int, default=100, help="integer-only ternary updates (default 100)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    p.add_argument("--device", default="cuda",
                   help="device of the comparison and the scoring (default cuda; cpu: a full rehearsal on a CPU-only "
                        "machine, where run.py trains on the CPU too, without --fp16, and (a) compares CPU with CPU)")
    p.add_argument("--dry-run", action="store_true", help="CPU-only plumbing check (no training, no GPU)")
    p.add_argument("--require-assets", action="store_true", help="--dry-run: missing assets are an error")
    p.add_argument("--skip-engine", action="store_true", help="--dry-run: leave the engine out of the comparison")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line error (or --help)
        return int(e.code or 0)
    try:
        for name in ("fp_updates", "fp32_updates", "qat_updates", "ternary_updates", "int_ternary_updates"):
            if getattr(a, name) <= WARMUP_STEPS:
                raise CheckError(f"--{name.replace('_', '-')} must exceed the {WARMUP_STEPS} warm-up updates left "
                                 f"out of the step times (got {getattr(a, name)})")
        data = Path(a.data_dir or os.environ.get("IBERT_DATA_DIR") or REPO / "data").resolve()
        out = Path(a.output_dir or REPO / "outputs" / "gpu_check").resolve()
        if a.dry_run:
            result = dry_run(a, data, out)
        else:
            import torch

            if a.device == "cuda" and not torch.cuda.is_available():
                raise CheckError(f"CUDA is not available (torch {torch.__version__}, CUDA build "
                                 f"{torch.version.cuda or 'none'}): run this on a GPU machine, or use --dry-run")
            assets(data, a.pretrained)
            _require_fairseq()
            result = run_check(a, data, out)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = json.dumps(result)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
