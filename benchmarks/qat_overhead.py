"""QAT overhead of the shipped model: ``ibert_roberta`` training steps, I-BERT and TernaryBERT vs full precision.

Builds the fairseq ``ibert_roberta`` architecture through fairseq's own parser (``ibert_roberta_base``: vocabulary
50265, 12 layers x 768, FFN 3072; ``ibert_roberta_minilm``: the demo's all-MiniLM-L6-v2, vocabulary 30523, 6 layers x
384, FFN 1536) with a 2-class sentence classification head, and times one training step, exactly what
``fairseq-train`` runs per batch apart from the trainer's bookkeeping: the criterion's forward (loss, logging
outputs), ``backward()``, and an Adam step over every parameter. Three modes, all from the same FP weights:

* ``fp``: ``--quant-mode none`` with fairseq's ``sentence_prediction`` criterion;
* ``symmetric``: I-BERT W8A8 integer-only QAT (``--quant-mode symmetric``), same criterion;
* ``ternary_distill``: TernaryBERT W2A8 (``--quant-mode ternarybert --weight-bits 2``, TWN) with the plugin's
  ``ternary_distill`` criterion, ``--pred-distill --intermediate-distill`` (the FP teacher's forward, every hidden
  state and every layer's attention scores included in the step, as in the demo).

Steps are interleaved (the mode order rotates every repetition) and each repetition gives one ratio per quantized
mode against the FP step timed next to it; the table reports the median ratio with its min and max. ``ratio`` is
process CPU time (robust on a shared machine; with several threads it counts every thread), ``ratio_wall`` wall
time. Targets: symmetric at most 1.5x FP, ternary distillation at most 2x FP.

Prints a table, then ONE JSON object as the last line.
Usage: ``OMP_NUM_THREADS=1 python benchmarks/qat_overhead.py [--shapes minilm,roberta_base,minilm_squad] [--reps 3]``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import torch

from harness import emit, summarize, timed
from ibert_plugin.catalog import ARCHS as CATALOG_ARCHS  # (harness puts the repository on sys.path)
from ibert_plugin.quant.config import IBERT_W8A8, TERNARYBERT_W2A8  # noqa: E402

HEAD = "sentence_classification_head"
#: shape -> fairseq architecture (the architecture table's ``--arch`` of that shape)
ARCHS = {shape: CATALOG_ARCHS[arch].fairseq_arch
         for shape, arch in (("roberta_base", "roberta_base"), ("minilm", "minilm"), ("minilm_squad", "minilm"))}
VOCAB = {"roberta_base": 50265, "minilm": 30523, "minilm_squad": 30523}
#: batch x sequence length per shape: roberta_base at GLUE's usual 128 tokens; MiniLM at the demo's RT-SENT batches
#: (32 sentences, about 25 WordPiece tokens each, padded to the longest); MiniLM at the SQuAD recipe's batches (16
#: windows of up to 384 tokens, the longest row 384 as for a long context; the (B, H, T, T) attention tensors then
#: outweigh the (B, T, C) activations).
BATCH = {"roberta_base": (4, 128), "minilm": (32, 40), "minilm_squad": (16, 384)}
MODES = {
    "fp": ["--quant-mode", "none"],
    "symmetric": IBERT_W8A8.to_flags(),
    "ternary_distill": TERNARYBERT_W2A8.to_flags(),
}
TARGETS = {"symmetric": 1.5, "ternary_distill": 2.0}


class _Task:
    """What the model's ``build_model`` and the criteria read from a ``sentence_prediction`` task."""

    def __init__(self, vocab: int):
        from fairseq.data import Dictionary

        self.source_dictionary = Dictionary()
        for i in range(vocab - len(self.source_dictionary) - 1):
            self.source_dictionary.add_symbol(f"w{i}")
        self.source_dictionary.add_symbol("<mask>")
        self.label_dictionary = Dictionary()
        for lab in ("0", "1"):
            self.label_dictionary.add_symbol(lab)

    def max_positions(self):
        return 512


def _build(shape: str, mode: str, task: _Task, layers: int):
    from fairseq import options
    from fairseq.models import ARCH_MODEL_REGISTRY

    import ibert_plugin  # noqa: F401  (registers the architectures and the criterion)

    arch = ARCHS[shape]
    argv = ["unused", "--task", "sentence_prediction", "--num-classes", "2", "--arch", arch, "--max-positions", "512",
            "--dropout", "0.1", "--attention-dropout", "0.1", *MODES[mode]]
    if layers:
        argv += ["--encoder-layers", str(layers)]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    torch.manual_seed(0)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, task)
    model.register_classification_head(HEAD, num_classes=2)
    return model


def _criterion(mode: str, task: _Task, teacher):
    from fairseq.criterions.sentence_prediction import SentencePredictionConfig, SentencePredictionCriterion

    from ibert_plugin.criterions.distill import TernaryDistillConfig, TernaryDistillCriterion

    if mode == "ternary_distill":
        return TernaryDistillCriterion(TernaryDistillConfig(pred_distill=True, intermediate_distill=True), task,
                                       teacher=teacher)
    return SentencePredictionCriterion(SentencePredictionConfig(), task)


def _sample(task: _Task, bsz: int, seq: int) -> Dict:
    d = task.source_dictionary
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(d.nspecial, len(d) - 1, (bsz, seq), generator=g)
    tokens[:, 0] = d.bos()
    lengths = torch.linspace(seq, max(4, seq // 2), bsz).long()  # padded batch, as fairseq's collater makes
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = d.eos()
        tokens[i, n:] = d.pad()
    return {"net_input": {"src_tokens": tokens, "src_lengths": lengths}, "target": torch.arange(bsz) % 2,
            "ntokens": int(lengths.sum()), "nsentences": bsz}


def _step(model, criterion, opt, sample):
    def step():
        opt.zero_grad(set_to_none=True)
        loss, _sample_size, _ = criterion(model, sample)
        loss.backward()
        opt.step()

    wall, cpu, _ = timed(step)
    return wall, cpu


def bench_shape(shape: str, reps: int, layers: int) -> Dict:
    task = _Task(VOCAB[shape])
    bsz, seq = BATCH[shape]
    sample = _sample(task, bsz, seq)
    fp = _build(shape, "fp", task, layers)
    state = fp.state_dict()
    teacher = _build(shape, "fp", task, layers)
    teacher.load_state_dict(state)
    models, crits, opts = {}, {}, {}
    for mode in MODES:
        m = fp if mode == "fp" else _build(shape, mode, task, layers)
        if mode != "fp":
            m.load_state_dict(dict(state), strict=True)  # loading fills missing buffers into the dict it is given
        models[mode] = m.train()
        crits[mode] = _criterion(mode, task, teacher)
        opts[mode] = torch.optim.Adam(m.parameters(), lr=1e-6, betas=(0.9, 0.98), eps=1e-6)
    for mode in MODES:  # warm-up: allocator, first-call overheads, range initialisation, teacher placement
        _step(models[mode], crits[mode], opts[mode], sample)
    wall = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    order = list(MODES)
    for r in range(reps):
        for mode in order[r % len(order):] + order[:r % len(order)]:
            w, c = _step(models[mode], crits[mode], opts[mode], sample)
            wall[mode].append(w)
            cpu[mode].append(c)
    out = {"shape": shape, "arch": ARCHS[shape], "layers": len(fp.encoder.sentence_encoder.layers),
           "batch": bsz, "seq": seq, "step_cpu_s": {m: summarize(v).median for m, v in cpu.items()},
           "step_wall_s": {m: summarize(v).median for m, v in wall.items()}}
    for mode in TARGETS:
        rc = summarize([a / b for a, b in zip(cpu[mode], cpu["fp"])])
        rw = summarize([a / b for a, b in zip(wall[mode], wall["fp"])])
        out[mode] = {**rc.to_dict("ratio"), "ratio_wall": rw.median, "target": TARGETS[mode],
                     "meets_target": rc.median <= TARGETS[mode]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="minilm,roberta_base",
                    help=f"comma-separated, of: {', '.join(ARCHS)} (batch x length: "
                         f"{', '.join(f'{k} {b}x{t}' for k, (b, t) in BATCH.items())})")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions per mode (after one warm-up each)")
    ap.add_argument("--layers", type=int, default=0, help="override the encoder depth (0: the architecture's)")
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in ARCHS]
    if bad or not shapes:
        print(f"error: unknown shape {', '.join(bad) or '(none)'}; choose from {', '.join(ARCHS)}", file=sys.stderr)
        return 2
    if args.reps < 1 or args.layers < 0:
        print("error: --reps must be >= 1 and --layers >= 0", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    results: List[Dict] = [bench_shape(s, args.reps, args.layers) for s in shapes]
    print(f"QAT overhead: shipped ibert_roberta training step (criterion forward + backward + Adam), {threads} "
          f"thread(s), {args.reps} interleaved repetitions, median [min, max] of the per-repetition ratios")
    print(f"{'shape':<24}{'mode':<17}{'step cpu s':>11}{'step wall s':>12}{'ratio (cpu)':>24}{'wall':>7}  target")
    for r in results:
        name = f"{r['shape']} {r['layers']}L b{r['batch']}x{r['seq']}"
        print(f"{name:<24}{'fp':<17}{r['step_cpu_s']['fp']:>11.3f}{r['step_wall_s']['fp']:>12.3f}")
        for mode in TARGETS:
            q = r[mode]
            ratio = f"{q['ratio']:.2f} [{q['ratio_min']:.2f}, {q['ratio_max']:.2f}]"
            print(f"{'':<24}{mode:<17}{r['step_cpu_s'][mode]:>11.3f}{r['step_wall_s'][mode]:>12.3f}{ratio:>24}"
                  f"{q['ratio_wall']:>7.2f}  <= {q['target']} {'ok' if q['meets_target'] else 'MISSED'}")
    emit({"benchmark": "qat_overhead", "threads": threads, "reps": args.reps, "device": "cpu", "results": results,
          "meets_targets": all(r[m]["meets_target"] for r in results for m in TARGETS)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
