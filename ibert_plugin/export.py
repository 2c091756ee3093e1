"""Export a quantized fairseq checkpoint to the packed format (2-bit ternary / int8 weights).

Usage::

    python -m ibert_plugin.export --checkpoint ck/checkpoint_best.pt --output model.packed.pt \
        [--fp16-float-tensors] [--fp16-positions] [--omit-lm-head] [--ternary-encoding {ternary2,base3}] [--verify]

Fairseq wiring layer (imports fairseq through :mod:`ibert_plugin.wiring.checkpoint`). The format is described in
:mod:`ibert_plugin.quant.packing` and ``docs/packed_format.md`` (TernaryBERT,
Zhang et al. 2020, arXiv:2009.12812, reports the same packed 2-bit size, 14.9x, but releases only float32 saves).
Prints the input checkpoint size, the FP32 state-dict size (parameters and buffers as float32, no optimizer state,
weight-quantizer internals excluded), the packed size and the ratios. Errors (missing file, a corrupt or
foreign file: "not a valid checkpoint", a non-quantized checkpoint) print one line on stderr and exit with status 2.
"""
import argparse
import os
import sys
from typing import List, Optional


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ibert_plugin.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="quantized fairseq checkpoint (.pt)")
    parser.add_argument("--output", required=True, help="packed output file")
    parser.add_argument("--fp16-float-tensors", action="store_true",
                        help="store float parameters (biases, LayerNorms, positions, heads) as float16")
    parser.add_argument("--ternary-encoding", choices=["ternary2", "base3"], default="ternary2",
                        help="ternary weights: 2 bits (4 per byte) or base-3 (5 trits per byte, 1.6 bits)")
    parser.add_argument("--fp16-positions", action="store_true",
                        help="store only the learned position embeddings as float16")
    parser.add_argument("--omit-lm-head", action="store_true",
                        help="leave out the MLM head (encoder.lm_head.*; unused by sentence classification; "
                             "re-initialised on reload)")
    parser.add_argument("--verify", action="store_true",
                        help="reload the packed file and check the logits equal the checkpoint's (fp32 only)")
    args = parser.parse_args(argv)

    if not os.path.isfile(args.checkpoint):
        return _fail(f"checkpoint not found: {args.checkpoint}")

    from .wiring.checkpoint_file import CheckpointError, check_fairseq_checkpoint

    try:  # corrupt or foreign file: one line, before fairseq is even imported
        check_fairseq_checkpoint(args.checkpoint)
    except CheckpointError as e:
        return _fail(str(e))

    import torch

    from .quant import packing
    from .wiring.checkpoint import load_checkpoint_model, load_packed_model

    try:
        model, cfg = load_checkpoint_model(args.checkpoint)
    except Exception as e:  # one clear line instead of fairseq's chained traceback
        return _fail(f"cannot load {args.checkpoint}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    qcfg = getattr(model, "quant_config", None)
    mode = getattr(qcfg, "quant_mode", None)
    if mode in (None, "none") or not packing.find_weight_quantizers(model):
        return _fail(f"{args.checkpoint} is not a quantized checkpoint (quant_mode={mode or 'n/a'}); "
                     "nothing to pack (train with --quant-mode ternarybert or symmetric first)")

    packed = packing.pack_model(
        model, cfg, float16=args.fp16_float_tensors, ternary_encoding=args.ternary_encoding,
        float16_positions=args.fp16_positions, omit_prefixes=("encoder.lm_head.",) if args.omit_lm_head else (),
    )
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    torch.save(packed, args.output)

    ckpt_bytes = os.path.getsize(args.checkpoint)
    fp32_bytes = packing.fp32_state_bytes(model)
    packed_bytes = os.path.getsize(args.output)
    counts = {}
    for e in packed["quantized"].values():
        counts[e["encoding"]] = counts.get(e["encoding"], 0) + 1
    print(f"quant_mode       : {mode}  (weights: {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})")
    print(f"input checkpoint : {_mb(ckpt_bytes)}  ({args.checkpoint})")
    print(f"fp32 state dict  : {_mb(fp32_bytes)}")
    print(f"packed           : {_mb(packed_bytes)}  ({args.output})")
    print(f"ratio vs fp32    : {fp32_bytes / packed_bytes:.2f}x")
    print(f"ratio vs input   : {ckpt_bytes / packed_bytes:.2f}x")

    if args.verify:
        reloaded = load_packed_model(args.output)
        vocab = model.encoder.sentence_encoder.embed_tokens.weight.shape[0]
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(4, vocab, (2, 16), generator=g)
        tokens[:, 0] = 0
        tokens[:, -1] = 2
        same = True
        for head in model.classification_heads.keys():
            with torch.no_grad():
                a = model(tokens, classification_head_name=head)[0]
                b = reloaded(tokens, classification_head_name=head)[0]
            same &= bool(torch.equal(a, b))
            print(f"verify {head}: max |dlogit| = {(a - b).abs().max().item():.3g}")
        if not same and not (args.fp16_float_tensors or args.fp16_positions):
            return _fail("verification failed: reloaded logits differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
