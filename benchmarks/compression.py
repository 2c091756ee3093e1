"""Model-size compression of the packed format: FP32 vs INT8 vs packed ternary (TernaryBERT, arXiv:2009.12812).

Shapes (random weights in the fairseq ``roberta`` layout, i.e. the parameter names ``ibert_roberta`` uses, with
a 2-class sentence classification head):

* ``roberta_base``: vocab 50265, 12 layers x 768, FFN 3072, 514 positions (+ the MLM head fairseq keeps);
* ``minilm``: vocab 30522 + 1, 6 layers x 384, FFN 1536, 514 positions.

Baseline: ``torch.save(model.state_dict())`` in float32 (no optimizer state; the tied MLM-head weight is stored
once). Quantized variants are packed with :func:`ibert_plugin.quant.packing.pack_state` from weights quantized here:

* ``int8``: every encoder Linear and the word + position embeddings as int8 codes with per-row float32 scales
  (``S = max|w_row| / 127``), everything else float32 (the I-BERT storage);
* ``ternary``: TernaryBERT W2-E2: encoder Linears layer-wise TWN, word embedding row-wise TWN, 2 bits per weight;
  positions, LayerNorms, biases, classification head (and MLM head) float32;
* then the format options that reach TernaryBERT's 14.9x: ``+fp16-pos`` (positions float16), ``-lm-head`` (omit
  the MLM head, unused by sentence classification), ``base3`` (5 trits per byte), ``+fp16-float`` (all floats),
  and ``+cls-dense`` (the head's dense ternary, as ``ibert_roberta --quant-mode ternarybert`` does: BERT's pooler);
* ``export:*``: :func:`pack_model` on a random ``ibert_roberta --quant-mode ternarybert --weight-bits 2`` model,
  i.e. whatever that model quantizes (what ``python -m ibert_plugin.export`` writes).

Why plain 2-bit RoBERTa-base misses 14.9x: 2 bits on the 123.5 M ternary weights is 30.9 MB (16.2x at best), and the
float32 leftovers add ~7 MB (classification-head dense 2.4, MLM head 2.6, positions 1.6, LN/bias 0.5); TernaryBERT's
BERT-base has a 30522 vocabulary, a ternary pooler and no MLM head. base-3 packing (1.6 bit) alone gets past it.

Prints a table, then ONE JSON object as the last line. ``python benchmarks/compression.py [--models minilm]``.
"""
import argparse
import os
import time

import torch

from harness import emit
from ibert_plugin.quant.config import TERNARYBERT_W2A8  # noqa: E402
from ibert_plugin.quant.packing import pack_model, pack_state, saved_bytes
from ibert_plugin.quant.ternary import twn_ternarize
from ibert_plugin.wiring.checkpoint import _StubTask

SHAPES = {
    "roberta_base": dict(vocab=50265, layers=12, dim=768, ffn=3072, heads=12, max_positions=512),
    "minilm": dict(vocab=30522 + 1, layers=6, dim=384, ffn=1536, heads=12, max_positions=512),
}
LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")
EMBED = "encoder.sentence_encoder.embed_tokens.weight"
POS = "encoder.sentence_encoder.embed_positions.weight"
LM_HEAD = "encoder.lm_head."


def build_fp_model(shape, arch="roberta", extra=()):
    """fairseq ``roberta`` (or ``ibert_roberta`` with ``extra`` flags) with random weights and a 2-class head."""
    from fairseq import options
    from fairseq.models import ARCH_MODEL_REGISTRY

    import ibert_plugin  # noqa: F401  (registers ibert_roberta)

    parser = options.get_training_parser()
    argv = ["unused", "--task", "sentence_prediction", "--num-classes", "2", "--arch", arch, *extra,
            "--encoder-layers", str(shape["layers"]), "--encoder-embed-dim", str(shape["dim"]),
            "--encoder-ffn-embed-dim", str(shape["ffn"]), "--encoder-attention-heads", str(shape["heads"]),
            "--max-positions", str(shape["max_positions"])]
    args = options.parse_args_and_arch(parser, argv)
    torch.manual_seed(0)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, _StubTask(shape["vocab"], shape["max_positions"]))
    model.register_classification_head("sentence_classification_head", num_classes=2)
    return model.eval(), args


def _is_encoder_linear(name):
    return name.startswith("encoder.sentence_encoder.layers.") and name.endswith(LINEAR_SUFFIXES)


CLS_DENSE = "classification_heads.sentence_classification_head.dense.weight"


@torch.no_grad()
def quantize_ternary(sd, cls_dense=False):
    out = {}
    for name, w in sd.items():
        if _is_encoder_linear(name) or name == EMBED or (cls_dense and name == CLS_DENSE):
            rowwise = name == EMBED
            b, alpha = twn_ternarize(w.clamp(-2.5, 2.5), rowwise=rowwise)
            scale = alpha if rowwise else alpha.reshape(1).expand(w.shape[0])
            out[name] = (name.rsplit(".", 1)[0] + ".weight_quantizer", b, scale.float(), 2)
    return out


@torch.no_grad()
def quantize_int8(sd):
    out = {}
    for name, w in sd.items():
        if _is_encoder_linear(name) or name in (EMBED, POS):
            s = w.abs().amax(dim=1).clamp(min=1e-8) / 127
            out[name] = (name.rsplit(".", 1)[0] + ".weight_quantizer", torch.round(w / s[:, None]), s.float(), 8)
    return out


def measure(model_name):
    t0 = time.time()
    model, args = build_fp_model(SHAPES[model_name])
    sd = model.state_dict()
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    n_params = sum(p.numel() for p in model.parameters())
    fp32 = saved_bytes(sd)
    cfg = {"model": vars(args)}
    tern, int8 = quantize_ternary(sd), quantize_int8(sd)
    tern_cls = quantize_ternary(sd, cls_dense=True)

    def size(q, **kw):
        return saved_bytes(pack_state(sd, q, cfg, param_names=params, **kw))

    variants = {
        "int8": size(int8),
        "ternary": size(tern),
        "ternary+fp16-pos": size(tern, float16_positions=True),
        "ternary-lm-head": size(tern, omit_prefixes=(LM_HEAD,)),
        "ternary+fp16-pos-lm-head": size(tern, float16_positions=True, omit_prefixes=(LM_HEAD,)),
        "ternary-base3": size(tern, ternary_encoding="base3"),
        "ternary-base3+fp16-pos-lm-head": size(tern, ternary_encoding="base3", float16_positions=True,
                                               omit_prefixes=(LM_HEAD,)),
        "ternary+fp16-float-lm-head": size(tern, float16=True, omit_prefixes=(LM_HEAD,)),
        "ternary+cls-dense": size(tern_cls),
        "ternary+cls-dense-lm-head": size(tern_cls, omit_prefixes=(LM_HEAD,)),
        "ternary+cls-dense+fp16-pos-lm-head": size(tern_cls, float16_positions=True, omit_prefixes=(LM_HEAD,)),
    }
    # what `python -m ibert_plugin.export` writes for `ibert_roberta --quant-mode ternarybert --weight-bits 2`
    # (whatever that model quantizes: today also the head dense and the position embeddings)
    del int8, tern_cls
    qmodel, _ = build_fp_model(SHAPES[model_name], "ibert_roberta",
                               TERNARYBERT_W2A8.to_flags())
    variants["export:ibert_roberta-ternarybert"] = saved_bytes(pack_model(qmodel, cfg))
    variants["export:ibert_roberta-ternarybert-lm-head"] = saved_bytes(
        pack_model(qmodel, cfg, omit_prefixes=(LM_HEAD,)))
    del qmodel
    # where the float bytes of the default ternary file go
    fbreak = {}
    for name, t in sd.items():
        if name in tern or name == LM_HEAD + "weight":
            continue
        group = ("positions" if name == POS else "lm_head" if name.startswith(LM_HEAD)
                 else "cls_head" if name.startswith("classification_heads.") else "ln+bias")
        fbreak[group] = fbreak.get(group, 0) + t.numel() * 4
    return {
        "params": n_params,
        "fp32_bytes": fp32,
        "bytes": variants,
        "ratio": {k: round(fp32 / v, 2) for k, v in variants.items()},
        "ternary_float_bytes": fbreak,
        "meets_14.9x": {k: fp32 / v >= 14.9 for k, v in variants.items() if k.startswith("ternary")},
        "seconds": round(time.time() - t0, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    results = {}
    for name in args.models:
        r = measure(name)
        results[name] = r
        print(f"\n{name}: {r['params'] / 1e6:.1f} M params, FP32 state dict {r['fp32_bytes'] / 1e6:.2f} MB")
        print(f"  {'variant':42s} {'MB':>9s} {'ratio':>7s}")
        print(f"  {'fp32':42s} {r['fp32_bytes'] / 1e6:9.2f} {1.0:7.2f}")
        for k, v in r["bytes"].items():
            print(f"  {k:42s} {v / 1e6:9.2f} {r['ratio'][k]:7.2f}")
        print("  float32 tensors in 'ternary' (MB): "
              + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(r["ternary_float_bytes"].items())))
    emit({"benchmark": "compression", "unit": "bytes", "results": results}, sort_keys=True)


if __name__ == "__main__":
    main()
