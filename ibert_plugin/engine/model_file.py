"""IBERT-INT: the integer engine's model file (format version 3, ``docs/integer_model_format.md``).

One safetensors file. Its tensors are every tensor of the compiled :class:`intmodel.IntModel` (int8 weights, int64
biases and dyadic multipliers/shifts, float32 scales, the i-exp tables, the float classification head) under their
dotted field paths (``model.layers.3.qkv.weight``), plus the tokenizer as UTF-8 byte tensors (``vocab.tokenizer``,
``vocab.dictionary``). Its ``__metadata__`` holds ``format = "IBERT-INT"``, ``version = "3"``, ``header``: one JSON
document with the arch shape, bit-widths, route hints, label names, tokenization settings, the source checkpoint's
sha256 and ``model``: the IntModel tree, in which every dataclass is ``{"type": name, "fields": {...}}``, every
tensor ``{"tensor": key}`` and every int/float/bool/str/None itself; and ``file_sha256``: the sha256 of the whole
file with these 64 hex digits read as ``0`` (:func:`file_digest`), so that a changed byte anywhere (a
requantization constant or a label name in the JSON header as much as a weight) is refused on load.

The tree is written and read by walking ``dataclasses.fields``, so fields added to the compiled model are stored
without touching this module; a file whose field set differs from the running engine's is refused (re-convert).
Version 2 files (same checksum, the compiled model's older field names: ``tok_w``, ``in_m`` / ``in_e`` ...) are
read through :data:`V2_FIELDS`, a rename table applied to the JSON tree before decoding; the tensors and their
bytes are the same. Reading never imports fairseq or builds the QAT model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from . import EngineError
from .intmodel import LINEARS, IntModel
from .tokenizer import TextEncoder

FORMAT_NAME = "IBERT-INT"
FORMAT_VERSION = 3
#: Oldest version read: 2 (whole-file checksum; version 1 checksummed only the tensor payload).
OLDEST_READ_VERSION = 2
#: ``__metadata__`` key of the whole-file checksum (version 2; version 1 checksummed only the tensor payload).
CHECKSUM_KEY = "file_sha256"
_DIGEST_HEX = 64
#: Largest safetensors header we accept (the tokenizer lives in tensors, so real headers are a few hundred kB).
MAX_HEADER_BYTES = 64 << 20


class ModelFileError(EngineError):
    """A file that is not a readable IBERT-INT model (foreign, corrupt, truncated, newer version)."""


@dataclass
class ModelFile:
    """A loaded IBERT-INT file.

    Attributes:
        model: the compiled integer model, ready for :class:`engine.IntegerEngine`.
        text: tokenizer + dictionary + special tokens (None when the file was written without them).
        labels: class index -> label name (None: unknown).
        header: the parsed JSON header (``arch``, ``bits``, ``route_hints``, ``source``, ``task`` ...).
    """

    model: IntModel
    text: Optional[TextEncoder]
    labels: Optional[List[str]]
    header: Dict[str, Any]


# ------------------------------------------------------------------------------------------------------------------
# generic dataclass tree <-> (JSON, tensors)
# ------------------------------------------------------------------------------------------------------------------
def _encode(obj: Any, key: str, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        # clone: safetensors refuses tensors that share storage (expanded per-channel constants, views)
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, "fields": {f.name: _encode(getattr(obj, f.name), f"{key}.{f.name}", tensors)
                                                     for f in dataclasses.fields(obj) if f.init}}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [_encode(v, f"{key}.{i}", tensors)
                                                               for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{key}: dict keys must be strings")
        return {"dict": {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: cannot store a {type(obj).__name__} in an {FORMAT_NAME} file")


def _dataclass_types() -> Dict[str, type]:
    """The compiled model's record types: the dataclasses of the module that defines :class:`IntModel`."""
    mod = sys.modules[IntModel.__module__]
    return {n: o for n, o in vars(mod).items() if isinstance(o, type) and dataclasses.is_dataclass(o)}


def _decode(node: Any, key: str, tensors: Dict[str, torch.Tensor], types: Dict[str, type]) -> Any:
    if not isinstance(node, dict):
        return node
    if "tensor" in node:
        name = node["tensor"]
        if name not in tensors:
            raise ModelFileError(f"corrupt {FORMAT_NAME} file: tensor {name!r} is missing")
        return tensors[name]
    if "type" in node:
        cls = types.get(node["type"])
        if cls is None:
            raise ModelFileError(f"{key}: record type {node['type']!r} is unknown to this engine (re-run convert)")
        want = {f.name for f in dataclasses.fields(cls) if f.init}
        got = set(node.get("fields", {}))
        if got != want:
            raise ModelFileError(
                f"{key}: the file's {cls.__name__} fields differ from this engine's (missing "
                f"{sorted(want - got) or 'none'}, unknown {sorted(got - want) or 'none'}): re-run convert")
        return cls(**{k: _decode(v, f"{key}.{k}", tensors, types) for k, v in node["fields"].items()})
    if "list" in node:
        return [_decode(v, f"{key}.{i}", tensors, types) for i, v in enumerate(node["list"])]
    if "tuple" in node:
        return tuple(_decode(v, f"{key}.{i}", tensors, types) for i, v in enumerate(node["tuple"]))
    if "dict" in node:
        return {k: _decode(v, f"{key}.{k}", tensors, types) for k, v in node["dict"].items()}
    raise ModelFileError(f"corrupt {FORMAT_NAME} file: unreadable node at {key}")


# ------------------------------------------------------------------------------------------------------------------
# version 2 -> 3: the compiled model's field names
# ------------------------------------------------------------------------------------------------------------------
#: Per record type, version 3 field -> its version 2 name, or the (multiplier, shift) pair of version 2 fields that
#: became one :class:`intmodel.Dyadic`. Fields not listed kept their names.
V2_FIELDS: Dict[str, Dict[str, Any]] = {
    "IntModel": {"token_table": "tok_w", "position_table": "pos_w", "token_requant": ("emb_tok_m", "emb_tok_e"),
                 "position_requant": ("emb_pos_m", "emb_pos_e")},
    "IntLayer": {"out_proj": "o", "input_requant": ("in_m", "in_e"), "input_scale": "s_x",
                 "qkv_requant": ("qkv_m", "qkv_e"), "qkv_scales": "s_qkv", "exp_table": "lut",
                 "score_scale": "s_scores", "context_requant": ("ctx_m", "ctx_e"), "context_scale": "s_ctx",
                 "attn_residual_requant": ("ar_m", "ar_e"), "attn_identity_requant": ("ar_id_m", "ar_id_e"),
                 "fc1_input_requant": ("h_m", "h_e"), "fc1_input_scale": "s_h", "gelu_shift": "gelu_k",
                 "fc2_input_requant": ("g_m", "g_e"), "fc2_input_scale": "s_g",
                 "ffn_residual_requant": ("fr_m", "fr_e"), "ffn_identity_requant": ("fr_id_m", "fr_id_e")},
    "IntLinear": {"weight": "w_int", "acc_scale": "s_acc", "bias": "b_int"},
    "IntLN": {"bias": "b_int", "out_scale": "s_out"},
}


def _upgrade_v2(node: Any) -> Any:
    if isinstance(node, dict) and "type" in node and isinstance(node.get("fields"), dict):
        old = {k: _upgrade_v2(v) for k, v in node["fields"].items()}
        renames = V2_FIELDS.get(node["type"], {})
        used = set()
        fields = {}
        for new, src in renames.items():
            names = src if isinstance(src, tuple) else (src,)
            if not all(n in old for n in names):
                continue  # left out: the field-set check of _decode names what is missing
            used.update(names)
            fields[new] = (old[src] if not isinstance(src, tuple) else
                           {"type": "Dyadic", "fields": {"multiplier": old[src[0]], "shift": old[src[1]]}})
        fields.update({k: v for k, v in old.items() if k not in used})
        return {**node, "fields": fields}
    if isinstance(node, dict):
        return {k: _upgrade_v2(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_upgrade_v2(v) for v in node]
    return node


def upgrade_v2_header(header: Dict[str, Any]) -> Dict[str, Any]:
    """A version 2 header with the version 3 names: the model tree through :data:`V2_FIELDS`, and the route hints'
    ``layers.{i}.o`` keys as ``layers.{i}.out_proj``. Tensor keys (the files' bytes) are unchanged."""
    out = dict(header, model=_upgrade_v2(header["model"]), version=FORMAT_VERSION, upgraded_from=2)
    if isinstance(header.get("route_hints"), dict):
        out["route_hints"] = {re.sub(r"\.o$", ".out_proj", k): v for k, v in header["route_hints"].items()}
    return out


# ------------------------------------------------------------------------------------------------------------------
# header content
# ------------------------------------------------------------------------------------------------------------------
def arch_of(im: IntModel) -> Dict[str, Any]:
    """Shape of the compiled model (all derived from its tensors)."""
    L0 = im.layers[0] if im.layers else None
    return {"layers": len(im.layers), "embed_dim": int(im.token_table.shape[1]),
            "vocab_size": int(im.token_table.shape[0]), "position_rows": int(im.position_table.shape[0]),
            "padding_idx": int(im.padding_idx), "heads": int(L0.heads) if L0 else None,
            "ffn_dim": int(L0.fc1.weight.shape[0]) if L0 else None,
            "num_classes": int(im.head["out_proj.weight"].shape[0]) if im.head else None}


def route_hints(im: IntModel) -> Dict[str, str]:
    """Fastest GEMM route per weight among those exact on every AVX2 CPU (``gemm.route_for``'s default); the engine
    re-picks at load among the routes its CPU self-test passed (``fbgemm8`` for full 8-bit weights on VNNI)."""
    from . import gemm

    return {f"layers.{i}.{k}": gemm.route_for(getattr(L, k).weight)
            for i, L in enumerate(im.layers) for k in LINEARS}


def _validate_shapes(im: IntModel, arch: Dict[str, Any]) -> None:
    """The shapes the engine's kernels rely on, checked against the header's arch."""
    D, V, P = arch["embed_dim"], arch["vocab_size"], arch["position_rows"]

    def need(cond, what):
        if not cond:
            raise ModelFileError(f"corrupt {FORMAT_NAME} file: {what}")

    need(tuple(im.token_table.shape) == (V, D) and im.token_table.dtype == torch.int8,
         f"token table is not int8 [{V}, {D}]")
    need(tuple(im.position_table.shape) == (P, D) and im.position_table.dtype == torch.int8,
         f"position table is not int8 [{P}, {D}]")
    need(len(im.layers) == arch["layers"], f"{len(im.layers)} layers, header says {arch['layers']}")
    need(0 <= im.padding_idx < min(V, P), "padding index outside the embedding tables")
    for i, L in enumerate(im.layers):
        F = arch["ffn_dim"]
        need(L.heads == arch["heads"] and D % L.heads == 0, f"layer {i}: {L.heads} heads for width {D}")
        for k, (n, kk) in {"qkv": (3 * D, D), "out_proj": (D, D), "fc1": (F, D), "fc2": (D, F)}.items():
            lin = getattr(L, k)
            need(tuple(lin.weight.shape) == (n, kk) and lin.weight.dtype == torch.int8,
                 f"layer {i} {k}: weight is not int8 [{n}, {kk}]")
            need(lin.bias.shape == (n,) and lin.acc_scale.shape == (n,), f"layer {i} {k}: bias/scale length != {n}")
    if im.head:
        C = arch["num_classes"]
        shapes = {"dense.weight": (D, D), "dense.bias": (D,), "out_proj.weight": (C, D), "out_proj.bias": (C,)}
        for k, s in shapes.items():
            t = im.head.get(k)
            need(t is not None and tuple(t.shape) == s and t.is_floating_point(), f"head {k} is not float {list(s)}")


def sha256_file(path: str, start: int = 0) -> str:
    """sha256 of ``path``'s bytes from ``start`` (streamed)."""
    h = hashlib.sha256()
    for chunk in _chunks(path, start):
        h.update(chunk)
    return h.hexdigest()


def _text_blobs(text: TextEncoder) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    def blob(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(s.encode("utf-8")), dtype=torch.uint8).clone()

    tensors = {"vocab.tokenizer": blob(text.tokenizer_json), "vocab.dictionary": blob("\n".join(text.symbols))}
    meta = {"bpe": text.bpe, "dictionary_size": len(text.symbols),
            "specials": {"bos": text.bos, "pad": text.pad, "eos": text.eos, "unk": text.unk},
            "init_token": text.init_token, "separator_token": text.separator_token,
            "max_positions": text.max_positions, "num_inputs": text.num_inputs}
    return tensors, meta


# ------------------------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------------------------
def save(path: str, im: IntModel, text: Optional[TextEncoder] = None, labels: Optional[List[str]] = None,
         source: Optional[Dict[str, Any]] = None, task: Optional[str] = None) -> Dict[str, Any]:
    """Write ``im`` (and its tokenizer, label names, provenance) as an IBERT-INT v2 file; returns the header.

    The file is written to a temporary name and renamed, so a failed write never leaves a partial model file.
    """
    from safetensors.torch import save as st_save

    tensors: Dict[str, torch.Tensor] = {}
    tree = _encode(im, "model", tensors)
    header: Dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "arch": arch_of(im),
                              "bits": {"weight": int(im.weight_bits), "ternary": bool(im.ternary),
                                       "activation": int(im.act_bits), "residual": int(im.residual_bits),
                                       "embedding_sum": int(im.embed_act_bits)},
                              "route_hints": route_hints(im), "labels": labels, "task": task, "source": source or {},
                              "text": None}
    if text is not None:
        if len(text.symbols) != header["arch"]["vocab_size"]:
            raise EngineError(f"dictionary has {len(text.symbols)} entries, the model's token table "
                              f"{header['arch']['vocab_size']}")
        blobs, header["text"] = _text_blobs(text)
        tensors.update(blobs)
    if labels is not None and header["arch"]["num_classes"] not in (None, len(labels)):
        raise EngineError(f"{len(labels)} label names for a {header['arch']['num_classes']}-class head")
    header["model"] = tree
    blob = bytearray(st_save(tensors, metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION),
                                                "header": json.dumps(header, separators=(",", ":")),
                                                CHECKSUM_KEY: "0" * _DIGEST_HEX}))
    prefix_len = 8 + struct.unpack("<Q", blob[:8])[0]
    prefix = bytes(blob[:prefix_len])
    at = _digest_at(prefix)
    if at is None:  # safetensors writes metadata as plain JSON strings: cannot happen short of a format change
        raise EngineError(f"cannot write {path}: the {CHECKSUM_KEY} placeholder is not where {FORMAT_NAME} puts it")
    blob[at: at + _DIGEST_HEX] = file_digest(prefix, at, [memoryview(blob)[prefix_len:]]).encode()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise EngineError(f"cannot write {path}: {exc.strerror}") from None
    return header


def _digest_at(prefix: bytes) -> Optional[int]:
    """Offset in ``prefix`` (8-byte length + safetensors JSON header) of the 64 hex digits of
    ``"file_sha256":"..."``, or None unless it occurs exactly once (inside the ``header`` string every quote is
    escaped, so the embedded JSON cannot imitate it)."""
    found = [m.start(1) for m in _DIGEST_RE.finditer(prefix, 8)]
    return found[0] if len(found) == 1 else None


_DIGEST_RE = re.compile(rb'"' + CHECKSUM_KEY.encode() + rb'":"([0-9a-f]{' + str(_DIGEST_HEX).encode() + rb'})"')


def file_digest(prefix: bytes, at: int, rest: Iterable[bytes]) -> str:
    """The version-2 whole-file checksum: sha256 of ``prefix`` (8-byte length + safetensors JSON header) with the
    64 hex digits at ``at`` read as ``0``, followed by every byte of ``rest`` (the tensor payload, in chunks)."""
    h = hashlib.sha256()
    h.update(prefix[:at])
    h.update(b"0" * _DIGEST_HEX)
    h.update(prefix[at + _DIGEST_HEX:])
    for chunk in rest:
        h.update(chunk)
    return h.hexdigest()


def _chunks(path: str, start: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        yield from iter(lambda: f.read(1 << 20), b"")


def read_header(path: str, verify: bool = True) -> Tuple[Dict[str, Any], int]:
    """(JSON header, byte offset of the tensor payload) of an IBERT-INT file, with one clear error per failure.

    Args:
        path: the ``.int`` file.
        verify: check the whole-file checksum (``file_sha256``) before trusting any of the header.
    """
    if not os.path.isfile(path):
        raise ModelFileError(f"model file not found: {path}")
    not_ours = f"{path}: not an {FORMAT_NAME} model file"
    corrupt = f"corrupt {FORMAT_NAME} file {path}"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{not_ours} (only {size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER_BYTES or n < 2:
            raise ModelFileError(not_ours)
        raw = f.read(n)
    ours = raw[:1] == b"{" and FORMAT_NAME.encode() in raw
    if len(raw) < n:
        if ours:
            raise ModelFileError(f"{path}: truncated {FORMAT_NAME} file ({size} bytes, header alone needs {8 + n})")
        raise ModelFileError(not_ours)
    try:
        st_header = json.loads(raw.decode("utf-8"))
        meta = st_header.get("__metadata__") or {}
        ends = [v["data_offsets"][1] for k, v in st_header.items() if k != "__metadata__"]
        end = 8 + n + max(ends, default=0)
    except (UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError, IndexError):
        raise ModelFileError(f"{corrupt}: unreadable safetensors header" if ours else not_ours) from None
    if meta.get("format") != FORMAT_NAME:
        if ours and meta.get("format") is not None:
            raise ModelFileError(f"{corrupt}: format {meta.get('format')!r}")
        raise ModelFileError(f"{not_ours} (a safetensors file without the {FORMAT_NAME} header)")
    try:
        version = int(meta.get("version", ""))
    except (ValueError, TypeError):
        raise ModelFileError(f"{corrupt}: bad version {meta.get('version')!r}") from None
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path} is {FORMAT_NAME} version {version}, newer than this engine reads "
                             f"(up to {FORMAT_VERSION}): upgrade ibert_plugin")
    if version < 1:
        raise ModelFileError(f"{corrupt}: bad version {version}")
    if version < OLDEST_READ_VERSION:
        raise ModelFileError(f"{path} is {FORMAT_NAME} version {version}, whose header (constants, tokenizer, labels) "
                             f"is not checksummed: re-run python -m ibert_plugin.engine convert on its checkpoint")
    if end > size:
        raise ModelFileError(f"{path}: truncated {FORMAT_NAME} file ({size} bytes, its tensors need {end})")
    if verify:
        prefix = head + raw
        at = _digest_at(prefix)
        if at is None or meta.get(CHECKSUM_KEY) != prefix[at: at + _DIGEST_HEX].decode():
            raise ModelFileError(f"{corrupt}: no readable {CHECKSUM_KEY} checksum")
        if file_digest(prefix, at, _chunks(path, 8 + n)) != meta[CHECKSUM_KEY]:
            raise ModelFileError(f"{corrupt}: checksum mismatch (a byte of the file was changed)")
    try:
        header = json.loads(meta["header"])
        if not isinstance(header, dict) or not isinstance(header.get("model"), dict):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        raise ModelFileError(f"{corrupt}: unreadable JSON header") from None
    if version == 2:
        header = upgrade_v2_header(header)
    return header, 8 + n


def load(path: str, verify: bool = True) -> ModelFile:
    """Read an IBERT-INT file (no fairseq, no QAT model).

    Args:
        path: the ``.int`` file.
        verify: check the whole-file sha256 (``file_sha256``): any changed byte, header or tensors, is refused.

    Raises:
        ModelFileError: not an IBERT-INT file, truncated, corrupt (checksum), an older or newer format version, or
            a compiled-model layout this engine does not know.
    """
    from safetensors.torch import load_file

    header, start = read_header(path, verify)
    try:
        tensors = load_file(path)
    except Exception as exc:  # safetensors' own consistency checks (SafetensorError)
        raise ModelFileError(f"corrupt {FORMAT_NAME} file {path}: {str(exc).splitlines()[0]}") from None
    im = _decode(header["model"], "model", tensors, _dataclass_types())
    if not isinstance(im, IntModel):
        raise ModelFileError(f"corrupt {FORMAT_NAME} file {path}: the model record is not an IntModel")
    try:
        _validate_shapes(im, header["arch"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"corrupt {FORMAT_NAME} file {path}: incomplete arch/model ({exc})") from None
    text = None
    if header.get("text"):
        t = header["text"]
        try:
            symbols = bytes(tensors["vocab.dictionary"].numpy()).decode("utf-8").split("\n")
            tok_json = bytes(tensors["vocab.tokenizer"].numpy()).decode("utf-8")
            sp = t["specials"]
            text = TextEncoder(bpe=t["bpe"], tokenizer_json=tok_json, symbols=symbols, bos=sp["bos"], pad=sp["pad"],
                               eos=sp["eos"], unk=sp["unk"], init_token=t["init_token"],
                               separator_token=t["separator_token"], max_positions=t["max_positions"],
                               num_inputs=t["num_inputs"])
        except (KeyError, UnicodeDecodeError, TypeError) as exc:
            raise ModelFileError(f"corrupt {FORMAT_NAME} file {path}: unreadable vocabulary ({exc})") from None
        if len(symbols) != header["arch"]["vocab_size"]:
            raise ModelFileError(f"corrupt {FORMAT_NAME} file {path}: {len(symbols)} dictionary entries for a "
                                 f"{header['arch']['vocab_size']}-row token table")
    return ModelFile(model=im, text=text, labels=header.get("labels"), header=header)
