"""Packed storage for quantized (TernaryBERT / I-BERT) models: real 2-bit and 8-bit weights on disk.

TernaryBERT (Zhang et al., 2020, arXiv:2009.12812) reports a 14.9x smaller model, but its released code saves the
fake-quantized weights as float32 (issues #154/#156/#238). This module stores each quantized weight once, as its
integer codes plus its scale, and reloads it through a *frozen* weight quantizer, so that the reloaded fake-quant
model produces bit-identical logits.

Packed format (version 1; a ``dict`` saved with ``torch.save``, loadable with ``torch.load(weights_only=True)``
because it only holds plain tensors, dicts, lists, str, int, float, bool and None)::

    {
      "format": "ibert_plugin.packed", "version": 1,
      "cfg": {...},                    # fairseq cfg as a plain dict ("model" section rebuilds the network)
      "float_dtype": "float32" | "float16",
      "ternary_encoding": "2bit" | "base3",
      "quantized": {                   # one entry per quantized weight parameter
        "<param name>": {
          "encoding": "ternary2" | "base3" | "int8",
          "bits": int,                 # nominal bit-width of the quantizer (2 for TWN/LAT, 8 for sym ...)
          "shape": [rows, ...],
          "data": uint8 (ternary) or int8 (int8) 1-D tensor,
          "scale": float32, shape (1,) (one alpha for the layer) or (rows,) (one per row),
          "quantizer": "<module name of the weight quantizer>"
        }, ...},
      "tensors": {"<name>": tensor},   # every other parameter (float32, or float16 with the flag) and every
                                       # buffer in its own dtype (activation ranges, LayerNorm shifts ...)
      "tied": {"<name>": "<name it shares storage with>"},   # e.g. encoder.lm_head.weight -> embed_tokens
      "dropped": ["<name>"],          # weight-quantizer internals not needed by the frozen path (LAT's lat_v)
      "omitted": ["<name>"],          # tensors left out on request (e.g. the unused MLM head); re-initialised
    }

Ternary codes (``w_int`` in ``{-1, 0, 1}``, row-major, flattened):

* ``ternary2`` (default): 2 bits per weight, 4 per byte, little-endian inside the byte (weight ``i`` in bits
  ``2*(i % 4) .. 2*(i % 4) + 1`` of byte ``i // 4``); codes ``0b00 = 0``, ``0b01 = +1``, ``0b10 = -1``
  (``0b11`` invalid); the tail is padded with code 0.
* ``base3`` (``ternary_encoding="base3"``): 5 trits per byte, ``byte = sum_j (w_{5k+j} + 1) * 3^j`` (<= 242),
  1.6 bits per weight; the tail is padded with trit 0.

Integer weights (any quantizer whose ``w_int`` is not ternary, at most 8 bits): ``int8`` codes, row-major.

Scales are float32; when every row of a weight shares one scale (layer-wise ternary) a single value is stored and
broadcast back to ``(rows,)``. Reloading (:func:`unpack`; :func:`ibert_plugin.wiring.checkpoint.load_packed_model`
builds the fairseq model around it) rebuilds a state dict where each
quantized parameter holds ``w_int * scale`` (a latent float weight) and its weight quantizer is replaced by a
:class:`FrozenWeightQuantizer` whose ``w_int`` / ``scale`` buffers return the stored pair unchanged: re-quantizing
``w_int * alpha`` would not be bit-exact (``sum`` of ``k`` copies of ``alpha`` divided by ``k`` is not ``alpha`` in
float32), the frozen path is. The frozen model is for inference/evaluation; its quantized weights get no gradient.
"""
from __future__ import annotations

import argparse
import io
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .weight import WeightQuantizer

FORMAT_NAME = "ibert_plugin.packed"
FORMAT_VERSION = 1

_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int64)


# --------------------------------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------------------------------
def pack_ternary(w_int: torch.Tensor, encoding: str = "ternary2") -> torch.Tensor:
    """Pack ternary values (``{-1, 0, 1}``, any shape) into a 1-D uint8 tensor (see the module docstring)."""
    flat = w_int.detach().reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (flat.abs().max() > 1):
        raise ValueError("pack_ternary: values outside {-1, 0, 1}")
    if encoding == "ternary2":
        codes = torch.where(flat < 0, torch.full_like(flat, 2), flat)  # -1 -> 2, 0 -> 0, 1 -> 1
        pad = (-codes.numel()) % 4
        codes = torch.cat([codes, codes.new_zeros(pad)]).view(-1, 4)
        packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
        return packed.to(torch.uint8)
    if encoding == "base3":
        trits = flat + 1
        pad = (-trits.numel()) % 5
        trits = torch.cat([trits, trits.new_zeros(pad)]).view(-1, 5)
        return (trits * _POW3).sum(dim=1).to(torch.uint8)
    raise ValueError(f"unknown ternary encoding {encoding!r}")


def unpack_ternary(data: torch.Tensor, numel: int, encoding: str = "ternary2") -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: returns ``numel`` float32 values in ``{-1, 0, 1}``."""
    d = data.reshape(-1).to(torch.int64)
    if encoding == "ternary2":
        codes = torch.stack([(d >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)[:numel]
        if (codes == 3).any():
            raise ValueError("unpack_ternary: invalid code 0b11")
        vals = torch.where(codes == 2, torch.full_like(codes, -1), codes)
    elif encoding == "base3":
        trits = torch.stack([(d // p) % 3 for p in _POW3.tolist()], dim=1).reshape(-1)[:numel]
        vals = trits - 1
    else:
        raise ValueError(f"unknown ternary encoding {encoding!r}")
    return vals.to(torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# frozen quantizer
# --------------------------------------------------------------------------------------------------------------------
class FrozenWeightQuantizer(WeightQuantizer):
    """Returns a stored ``(w_int, scale)`` pair, ignoring the latent weight (reload path of packed models).

    Args:
        shape: weight shape. ``w_int`` buffer: float32 of that shape (exact integers, <= 8 bits).
        rows: ``scale`` buffer length (``out_features``), float32.

    The output carries no gradient to the weight: frozen models are for inference and evaluation.
    """

    def __init__(self, shape: Iterable[int], rows: Optional[int] = None):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        self.register_buffer("w_int", torch.zeros(shape))
        self.register_buffer("scale", torch.zeros(rows if rows is not None else shape[0]))

    def forward(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.w_int.to(weight.dtype), self.scale


def _get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(_get_module(model, parent_name), child, module)


def freeze_weight_quantizers(model: nn.Module, quantized: Dict[str, Dict[str, Any]]) -> nn.Module:
    """Replace each listed weight quantizer by a :class:`FrozenWeightQuantizer` (in place).

    Args:
        quantized: ``packed["quantized"]`` (needs ``quantizer`` and ``shape`` per entry).
    """
    for entry in quantized.values():
        shape = list(entry["shape"])
        _set_module(model, entry["quantizer"], FrozenWeightQuantizer(shape, shape[0]))
    return model


# --------------------------------------------------------------------------------------------------------------------
# model inspection
# --------------------------------------------------------------------------------------------------------------------
def find_weight_quantizers(model: nn.Module) -> Dict[str, str]:
    """``{param name: quantizer module name}`` for every module whose ``weight`` has a WeightQuantizer child."""
    found: Dict[str, str] = {}
    for mname, module in model.named_modules():
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if w is None:
            continue
        for cname, child in module.named_children():
            if isinstance(child, WeightQuantizer):
                pname = f"{mname}.weight" if mname else "weight"
                if pname in found:
                    raise ValueError(f"{pname} has two weight quantizers")
                found[pname] = f"{mname}.{cname}" if mname else cname
    return found


@torch.no_grad()
def collect_quantized_weights(model: nn.Module) -> Dict[str, Tuple[str, torch.Tensor, torch.Tensor, int]]:
    """Run every weight quantizer on its weight.

    Returns:
        ``{param name: (quantizer name, w_int, scale, bits)}`` with ``w_int`` exact integers (weight shape) and
        ``scale`` float32 ``(rows,)``.
    """
    out = {}
    for pname, qname in find_weight_quantizers(model).items():
        q = _get_module(model, qname)
        weight = _get_module(model, pname.rpartition(".")[0]).weight
        w_int, scale = q(weight)
        w_int, scale = w_int.detach(), scale.detach().reshape(-1)
        if scale.numel() == 1 and weight.shape[0] != 1:
            scale = scale.expand(weight.shape[0])
        bits = getattr(q, "bits", None) or getattr(q, "num_bits", None) or getattr(q, "weight_bits", None)
        if bits is None:
            bits = 2 if bool((w_int.abs() <= 1).all()) else 8
        out[pname] = (qname, w_int, scale, int(bits))
    return out


# --------------------------------------------------------------------------------------------------------------------
# pack / unpack
# --------------------------------------------------------------------------------------------------------------------
def plain_cfg(cfg: Any) -> Any:
    """A fairseq cfg (DictConfig / Namespace / dict, nested) as plain python containers (weights_only-safe)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            try:
                cfg = OmegaConf.to_container(cfg, resolve=True)
            except Exception:  # unresolvable interpolation: keep it as text
                cfg = OmegaConf.to_container(cfg, resolve=False)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, argparse.Namespace):
        cfg = vars(cfg)
    if isinstance(cfg, dict):
        return {str(k): plain_cfg(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [plain_cfg(v) for v in cfg]
    if cfg is None or isinstance(cfg, (bool, int, float, str)):
        return cfg
    return str(cfg)


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def pack_state(
    state_dict: Dict[str, torch.Tensor],
    quantized: Dict[str, Tuple[str, torch.Tensor, torch.Tensor, int]],
    cfg: Any = None,
    float16: bool = False,
    ternary_encoding: str = "ternary2",
    param_names: Optional[Iterable[str]] = None,
    float16_positions: bool = False,
    omit_prefixes: Iterable[str] = (),
) -> Dict[str, Any]:
    """Build the packed dict from a state dict and the quantized weights.

    Args:
        state_dict: the model's ``state_dict()`` (parameters and buffers).
        quantized: :func:`collect_quantized_weights` output.
        cfg: fairseq cfg (stored as a plain dict).
        float16: store float *parameters* (biases, LayerNorms, positions, heads) as float16; buffers keep their
            dtype (activation ranges stay float32).
        ternary_encoding: ``"ternary2"`` (2 bits, 4 per byte) or ``"base3"`` (5 trits per byte).
        param_names: names of the parameters (others are buffers); default: every floating tensor is a parameter.
        float16_positions: store only the learned position embeddings (``*embed_positions.weight``) as float16.
        omit_prefixes: leave out every tensor whose name starts with one of these (e.g. ``encoder.lm_head.``, unused
            by sentence classification); they are listed under ``"omitted"`` and re-initialised on reload.
    """
    if ternary_encoding not in ("ternary2", "base3"):
        raise ValueError(f"unknown ternary encoding {ternary_encoding!r}")
    params = set(param_names) if param_names is not None else None
    qentries: Dict[str, Any] = {}
    quantizer_prefixes = [qname + "." for (qname, _, _, _) in quantized.values()]
    for pname, (qname, w_int, scale, bits) in quantized.items():
        rows = w_int.shape[0]
        scale = scale.float().reshape(-1).cpu()
        if scale.numel() != rows:
            raise ValueError(f"{pname}: scale has {scale.numel()} entries for {rows} rows")
        stored_scale = scale[:1].clone() if bool((scale == scale[0]).all()) else scale.clone()
        if bool((w_int.abs() <= 1).all()):
            enc = ternary_encoding
            data = pack_ternary(w_int, enc)
        else:
            if float(w_int.abs().max()) > 127 or bits > 8:
                raise ValueError(f"{pname}: {bits}-bit weights do not fit int8")
            enc = "int8"
            data = w_int.detach().cpu().to(torch.int8).reshape(-1).clone()
        qentries[pname] = {
            "encoding": enc,
            "bits": int(bits),
            "shape": [int(s) for s in w_int.shape],
            "data": data,
            "scale": stored_scale,
            "quantizer": qname,
        }

    tensors: Dict[str, torch.Tensor] = {}
    tied: Dict[str, str] = {}
    dropped: List[str] = []
    omitted: List[str] = []
    omit_prefixes = tuple(omit_prefixes)
    seen: Dict[Any, str] = {}
    for name in qentries:  # quantized weights own their storage first (tied LM-head weight points at them)
        seen[_storage_key(state_dict[name])] = name
    for name, t in state_dict.items():
        if name in qentries:
            continue
        if any(name.startswith(p) for p in quantizer_prefixes):
            dropped.append(name)
            continue
        key = _storage_key(t)
        if key in seen:  # before omission: a tied weight costs nothing and must reload as the same tensor
            tied[name] = seen[key]
            continue
        if omit_prefixes and name.startswith(omit_prefixes):
            omitted.append(name)
            continue
        seen[key] = name
        t = t.detach().cpu()
        is_param = (name in params) if params is not None else t.is_floating_point()
        if t.is_floating_point() and is_param:
            half = float16 or (float16_positions and name.endswith("embed_positions.weight"))
            t = t.to(torch.float16 if half else torch.float32)
        tensors[name] = t.clone()
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "cfg": plain_cfg(cfg) if cfg is not None else {},
        "float_dtype": "float16" if float16 else "float32",
        "ternary_encoding": ternary_encoding,
        "quantized": qentries,
        "tensors": tensors,
        "tied": tied,
        "dropped": dropped,
        "omitted": omitted,
    }


def pack_model(model: nn.Module, cfg: Any = None, float16: bool = False, ternary_encoding: str = "ternary2",
               float16_positions: bool = False, omit_prefixes: Iterable[str] = ()):
    """Pack a (fake-quant) model: see :func:`pack_state`. Raises ValueError if it has no weight quantizer."""
    quantized = collect_quantized_weights(model)
    if not quantized:
        raise ValueError("model has no weight quantizer (not a quantized model)")
    if cfg is None:
        cfg = {"model": getattr(model, "args", None) or getattr(model, "cfg", None)}
    param_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    return pack_state(model.state_dict(), quantized, cfg, float16, ternary_encoding, param_names,
                      float16_positions=float16_positions, omit_prefixes=omit_prefixes)


def unpack(packed: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Rebuild the state dict of the *frozen* model (see :func:`freeze_weight_quantizers`).

    For each quantized weight ``P`` with quantizer ``Q``: ``P = w_int * scale[:, None]`` (float32),
    ``Q.w_int`` (float32 exact integers) and ``Q.scale`` (float32, ``(rows,)``). Float parameters come back as
    float32, buffers in their stored dtype, tied names share the tensor they are tied to.
    """
    if packed.get("format") != FORMAT_NAME:
        raise ValueError("not an ibert_plugin packed model")
    if int(packed.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"packed format version {packed['version']} is newer than this code ({FORMAT_VERSION})")
    sd: Dict[str, torch.Tensor] = {}
    for pname, e in packed["quantized"].items():
        shape = list(e["shape"])
        numel = 1
        for s in shape:
            numel *= s
        if e["encoding"] == "int8":
            w_int = e["data"].to(torch.float32).reshape(shape)
        else:
            w_int = unpack_ternary(e["data"], numel, e["encoding"]).reshape(shape)
        scale = e["scale"].to(torch.float32).reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(shape[0]).clone()
        sd[pname] = w_int * scale.reshape((-1,) + (1,) * (len(shape) - 1))
        sd[e["quantizer"] + ".w_int"] = w_int
        sd[e["quantizer"] + ".scale"] = scale
    for name, t in packed["tensors"].items():
        sd[name] = t.to(torch.float32) if t.dtype == torch.float16 else t
    for name, target in packed["tied"].items():
        sd[name] = sd[target]
    return sd


def fp32_state_bytes(model: nn.Module, exclude_weight_quantizers: bool = True) -> int:
    """Size of ``torch.save`` of the float32 state dict (the FP32 baseline), weight-quantizer internals excluded."""
    prefixes = tuple(q + "." for q in find_weight_quantizers(model).values()) if exclude_weight_quantizers else ()
    sd = {
        k: (v.float() if v.is_floating_point() else v)
        for k, v in model.state_dict().items()
        if not (prefixes and k.startswith(prefixes))
    }
    return saved_bytes(sd)


def saved_bytes(obj: Any) -> int:
    """Number of bytes ``torch.save(obj)`` writes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()
