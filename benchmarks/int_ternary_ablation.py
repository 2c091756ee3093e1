"""Where the integer-only ternary model loses accuracy: ablations of the demo's integer-only QAT stage on RT-SENT.

The demo's integer-only ternary row (W2-E8-A8: TWN ternary weights, 8-bit word embedding, I-BERT's integer GELU,
softmax and LayerNorm, static 8-bit activation ranges) is a short integer-only QAT stage from the TernaryBERT
checkpoint, trained with plain cross-entropy. Each variant below reruns that stage with ONE change, from the same
TernaryBERT checkpoint, with the same schedule (updates, lr, validation every half epoch, checkpoint chosen on dev),
and is scored on the 1,000 held-out test sentences; every gap to FP comes with a paired bootstrap 95 % interval
(:func:`ibert_plugin.stats.paired_bootstrap`), and so does each variant's difference to the baseline.

Variants (``--variants``, comma list):

* ``baseline``: the demo's stage (``--quant-mode symmetric --weight-bits 2 --weight-quant-method twn``);
* ``fd_gelu``: ``--force-dequant gelu`` (float GELU: what the integer GELU costs);
* ``fd_nonlinear``: ``--force-dequant nonlinear`` (float GELU, softmax and LayerNorm: what the integer
  nonlinearities cost together; what is left is the ternary weights plus the static 8-bit integer dataflow);
* ``distill``: the same integer-only model trained with TernaryBERT's prediction + intermediate-layer distillation
  from the FP teacher (``--quant-mode ternarybert --integer-only --pred-distill --intermediate-distill``, teacher =
  the FP checkpoint) instead of cross-entropy on the labels (same weight decay, 0.1, and Adam betas).

Checkpoints come from a finished demo run (``--demo-dir``, default ``outputs/demo``: its ``demo_state.json``), or are
given with ``--fp-checkpoint`` / ``--ternary-checkpoint``; a ``baseline`` already trained by that demo is reused, and
so is every variant finished by an earlier run with the same arguments (``<output-dir>/state.json``).
Usage::

    OMP_NUM_THREADS=2 python benchmarks/int_ternary_ablation.py [--demo-dir outputs/demo] [--variants ...]

Prints a table, then ONE JSON object as the last line.
"""
import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ibert_plugin import demo  # noqa: E402
from ibert_plugin.assets.common import data_dir  # noqa: E402
from ibert_plugin.quant.config import INT_TERNARY_W2, TERNARYBERT_W2A8  # noqa: E402
from ibert_plugin.recipes.scoring import cached_scores  # noqa: E402
from ibert_plugin.recipes.stages import (  # noqa: E402
    Progress,
    Stage,
    StageError,
    note,
    run_stage,
    schedule_flags,
    validation_count,
)
from ibert_plugin.stats import paired_bootstrap  # noqa: E402

VARIANTS = {
    "baseline": INT_TERNARY_W2.to_flags(),
    "fd_gelu": INT_TERNARY_W2.replace(force_dequant="gelu").to_flags(),
    "fd_nonlinear": INT_TERNARY_W2.replace(force_dequant="nonlinear").to_flags(),
    "distill": [*TERNARYBERT_W2A8.to_flags(), "--integer-only", "--pred-distill", "--intermediate-distill",
                "--weight-decay", "0.1"],  # the baseline's weight decay
}


def _from_demo(demo_dir: Path):
    """(fp, ternary, baseline) checkpoints of a finished demo run, from its state file."""
    state_file = demo_dir / "demo_state.json"
    if not state_file.exists():
        return None, None, None
    fp = tern = base = None
    for argv, rec in json.loads(state_file.read_text()).items():
        if "--quant-mode none" in argv:
            fp = rec
        elif "--quant-mode ternarybert" in argv and "--weight-quant-method twn" in argv:
            tern = rec
        elif "--quant-mode symmetric --weight-bits 2" in argv:
            base = rec
    return fp, tern, base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo-dir", default=str(REPO / "outputs" / "demo"))
    p.add_argument("--fp-checkpoint", default=None)
    p.add_argument("--ternary-checkpoint", default=None)
    p.add_argument("--data-dir", default=None, help="asset folder (default $IBERT_DATA_DIR or <repo>/data)")
    p.add_argument("--output-dir", default=str(REPO / "outputs" / "int_ternary_ablation"))
    p.add_argument("--variants", default="baseline,fd_gelu,fd_nonlinear,distill")
    p.add_argument("--updates", type=int, default=demo.UPDATES_PER_EPOCH // 2,
                   help="integer-only QAT updates per variant (default 134, the demo's)")
    p.add_argument("--lr", default="2e-5", help="learning rate (default 2e-5, the demo's)")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    for v in names:
        if v not in VARIANTS:
            print(f"error: unknown variant {v!r} (choose {', '.join(VARIANTS)})", file=sys.stderr)
            return 2
    fp_rec, tern_rec, base_rec = _from_demo(Path(a.demo_dir))
    fp_ckpt = a.fp_checkpoint or (fp_rec or {}).get("checkpoint")
    tern_ckpt = a.ternary_checkpoint or (tern_rec or {}).get("checkpoint")
    for what, path in (("FP", fp_ckpt), ("TernaryBERT", tern_ckpt)):
        if not path or not Path(path).exists():
            flag = f"--{what.lower().replace('ternarybert', 'ternary')}-checkpoint"
            print(f"error: no {what} checkpoint (run the demo first, or pass {flag})", file=sys.stderr)
            return 2

    data = data_dir(a.data_dir)
    data_bin = data / "glue-bin" / f"{demo.TASK}-bin"
    glue_dir = data / "glue"
    out = Path(a.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "scores.json"
    state_file = out / "state.json"
    validate_every = max(1, demo.UPDATES_PER_EPOCH // 2)
    schedule = schedule_flags(a.updates, 0.0, validate_every)
    fp_scores = cached_scores(Path(fp_ckpt), data_bin, glue_dir, demo.TASK, cache)
    rows = {}
    for name in names:
        reuse = name == "baseline" and base_rec and Path(base_rec["checkpoint"]).exists() and \
            a.updates == demo.UPDATES_PER_EPOCH // 2 and a.lr == "2e-5" and a.ternary_checkpoint is None
        t0 = time.time()
        if reuse:
            ckpt, best = base_rec["checkpoint"], base_rec["best"]
            note(f"{name}: reusing the demo's stage {ckpt}")
        else:
            argv_v = ["--arch", "minilm", "--task", demo.TASK, "--data-dir", str(data / "glue-bin"),
                      "--output-dir", str(out / name), *VARIANTS[name], "--restore-file", tern_ckpt, "--lr", a.lr,
                      *schedule]
            if name == "distill":  # the teacher is the FP model, not the TernaryBERT checkpoint training starts from
                argv_v += ["--teacher-path", fp_ckpt]
            stage = Stage(name, f"ablation {name}", "int_ternary", a.updates,
                          validation_count(a.updates, validate_every, demo.UPDATES_PER_EPOCH), argv_v)
            try:  # the demo's stage runner: progress lines, and reuse of a variant finished with the same arguments
                res = run_stage(stage, state_file, False, Progress(out / name), 0.0)
            except StageError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            ckpt, best = res.checkpoint, res.best
        sc = cached_scores(Path(ckpt), data_bin, glue_dir, demo.TASK, cache)
        row = dict(dev_acc=best, test_acc=round(100.0 * sum(sc["test"]) / len(sc["test"]), 2),
                   gap_vs_fp=paired_bootstrap(fp_scores["test"], sc["test"]).to_dict(),
                   checkpoint=str(ckpt), wall_s=round(time.time() - t0, 1), reused=bool(reuse), _scores=sc["test"])
        rows[name] = row
    if "baseline" in rows:
        for name, row in rows.items():
            if name != "baseline":
                row["vs_baseline"] = paired_bootstrap(rows["baseline"]["_scores"], row["_scores"]).to_dict()
    fp_test = 100.0 * sum(fp_scores["test"]) / len(fp_scores["test"])
    print(f"\ninteger-only ternary ablations ({a.updates} updates each, from {tern_ckpt}); FP test {fp_test:.2f}")
    print(f"{'variant':<14} {'dev':>6} {'test':>6}  {'gap to FP [95% CI]':<26} {'vs baseline [95% CI]':<26}")
    for name, r in rows.items():
        g, vb = r["gap_vs_fp"], r.get("vs_baseline")
        vb_s = "" if not vb else f"{vb['gap']:+.1f} [{vb['low']:+.1f}, {vb['high']:+.1f}]"
        dev = "n/a" if r["dev_acc"] is None else f"{r['dev_acc']:.2f}"
        print(f"{name:<14} {dev:>6} {r['test_acc']:>6.2f}  {g['gap']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}]"
              f"{'':<10} {vb_s}")
    for r in rows.values():
        r.pop("_scores")
    print(json.dumps({"benchmark": "int_ternary_ablation", "task": demo.TASK,
                      "split": "test (checkpoint chosen on dev)",
                      "updates": a.updates, "fp_test_acc": round(fp_test, 2), "fp_checkpoint": str(fp_ckpt),
                      "ternary_checkpoint": str(tern_ckpt), "variants": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
