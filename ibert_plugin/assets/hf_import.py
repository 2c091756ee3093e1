"""Convert a HuggingFace BERT / RoBERTa checkpoint into a fairseq ``roberta`` checkpoint.

Output (``OUTDIR``):

* ``model.pt``   -- fairseq checkpoint (``cfg`` + ``model`` + empty optimizer history) that loads with STRICT
  ``load_state_dict`` into fairseq's built-in ``roberta`` architecture with the dims in ``arch.json``, and works
  with ``fairseq-train --restore-file OUTDIR/model.pt --reset-optimizer --reset-dataloader --reset-meters``
  and with ``RobertaModel.from_pretrained(OUTDIR, "model.pt")``.
* ``dict.txt``   -- fairseq dictionary WITHOUT the 4 specials and WITHOUT the mask token (fairseq's
  ``sentence_prediction``/``masked_lm`` tasks append ``<mask>`` after loading it, so the embedding matrix has
  ``len(dict.txt) + 4 + 1`` rows with the mask row last).
* ``arch.json``  -- fairseq arch flags plus provenance (source, dropped tensors, head initialisation).
* tokenizer files copied from the source (``tokenizer.json``, ``vocab.txt``, ``tokenizer_config.json``,
  ``vocab.json``/``merges.txt``) for ``--bpe hf_wordpiece --wordpiece-vocab OUTDIR``.

Mapping: BERT ``[CLS],[PAD],[SEP],[UNK]`` become fairseq ``<s>,<pad>,</s>,<unk>``
(rows 0..3) and ``[MASK]`` the last row; BERT position ``p`` goes to fairseq row ``p + 2`` (learned positions start
at ``padding_idx + 1``) with ``token_type_embeddings[0]`` folded in, because RoBERTa has no segment embedding and
fairseq's single-segment inputs always used type 0; rows 0 and 1 of the position table are never addressed by
real tokens and are zero. Everything is post-LN. The BERT pooler has no encoder counterpart and is dropped.
A checkpoint without an MLM head (e.g. MiniLM) gets a freshly initialised ``encoder.lm_head`` (BERT init:
normal(0, initializer_range) dense, unit LayerNorm, zero bias; decoder tied to the embeddings as in fairseq).

LayerNorm eps: fairseq's LayerNorms use eps=1e-5 where BERT used 1e-12. That matters only where a LayerNorm's
input variance is small, i.e. the embedding LayerNorm (MiniLM's summed embeddings have variance ~0.004, so
eps=1e-5 moves the encoder output by ~1e-3). The importer therefore multiplies the token and position
embedding tables by ``embedding_scale`` (default 16, a power of two, so the product is exact in fp32): a
LayerNorm is invariant to the scale of its input except through eps, so this is an exact reparametrisation that
makes the eps term 256x smaller. The tied MLM decoder would see 16x larger weights, so the LM head's LayerNorm
weight and bias are divided by the same factor (exact again). The remaining difference from the in-layer
LayerNorms is ~6e-5 on real sentences (checked by tests/test_assets_hf_import.py). ``embedding_scale=1`` gives
the plain mapping.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .common import AssetError, atomic_path, log, sha256_file, stamp_ok, write_stamp, write_text_atomic

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
PREFIX = "encoder.sentence_encoder."
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


# --------------------------------------------------------------------------------------------------- reading
def _read_config(model_dir: Path) -> Dict:
    p = model_dir / "config.json"
    if not p.is_file():
        raise AssetError(f"{p} not found")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise AssetError(f"{p}: not a JSON config ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise AssetError(f"{p}: not a JSON object (an HF config.json maps names to values)")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "max_position_embeddings") if not isinstance(cfg.get(k), int)]
    mt = cfg.get("model_type")
    if mt not in ("bert", "roberta"):
        raise AssetError(f"{p}: model_type {mt!r} is not supported (bert or roberta)")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise AssetError(f"{p}: hidden_act {cfg.get('hidden_act')!r} unsupported (fairseq roberta uses erf gelu)")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise AssetError(f"{p}: position_embedding_type {cfg.get('position_embedding_type')!r} unsupported")
    if missing:
        raise AssetError(f"{p}: missing or non-integer {', '.join(missing)}")
    return cfg


def _read_weights(model_dir: Path):
    """Load the HF state dict (safetensors preferred) and strip the ``bert.``/``roberta.`` prefix."""
    import torch

    st, binf = model_dir / "model.safetensors", model_dir / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            sd = load_file(str(st))
        except Exception as exc:  # safetensors' SafetensorError (header too large, invalid JSON, truncated ...)
            raise AssetError(f"{st}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
        src = st
    elif binf.is_file():
        try:
            sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle / zip errors whose text is torch's weights_only essay
            raise AssetError(f"{binf}: not a readable torch state dict ({type(exc).__name__})") from None
        if not isinstance(sd, dict):
            raise AssetError(f"{binf}: holds a {type(sd).__name__}, not a state dict")
        src = binf
    else:
        raise AssetError(f"{model_dir}: neither model.safetensors nor pytorch_model.bin found")
    out = {}
    for k, v in sd.items():
        for pre in ("bert.", "roberta."):
            if k.startswith(pre):
                k = k[len(pre):]
                break
        # Old TF-converted BERT checkpoints name LayerNorm params gamma/beta.
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v.float()
    return out, src


def _read_vocab(model_dir: Path, model_type: str) -> List[str]:
    """Token strings indexed by HF id."""
    if model_type == "bert":
        vt = model_dir / "vocab.txt"
        if vt.is_file():
            # BERT vocab.txt: one token per line, id = line number (keep empty-looking tokens as they are).
            return vt.read_text(encoding="utf-8").rstrip("\n").split("\n")
        tj = model_dir / "tokenizer.json"
        if tj.is_file():
            vocab = json.loads(tj.read_text(encoding="utf-8"))["model"]["vocab"]
            return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        raise AssetError(f"{model_dir}: vocab.txt / tokenizer.json not found")
    vj = model_dir / "vocab.json"
    if not vj.is_file():
        raise AssetError(f"{model_dir}: vocab.json not found (RoBERTa)")
    vocab = json.loads(vj.read_text(encoding="utf-8"))
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def _special_names(model_dir: Path, model_type: str) -> Dict[str, str]:
    if model_type == "roberta":
        names = {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>"}
    else:
        names = {"cls": "[CLS]", "pad": "[PAD]", "sep": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        p = model_dir / fname
        if p.is_file():
            d = json.loads(p.read_text(encoding="utf-8"))
            for role in names:
                v = d.get(f"{role}_token")
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str):
                    names[role] = v
    return names


# --------------------------------------------------------------------------------------------------- mapping
def build_vocab_permutation(tokens: List[str], specials: Dict[str, str],
                            gpt2_encoder: Optional[Dict[str, int]] = None) -> Tuple[List[int], List[str]]:
    """Order of HF rows in the fairseq embedding, and the dict.txt symbols.

    Args:
        tokens: HF token strings by id.
        specials: role -> token string (cls, pad, sep, unk, mask).
        gpt2_encoder: For RoBERTa, GPT-2 ``encoder.json`` to turn byte-level BPE strings into the GPT-2 ids that
            fairseq's ``--bpe gpt2`` writes (fairseq RoBERTa dictionaries list ids, not strings).

    Returns:
        ``perm`` (fairseq row -> HF row; specials first, mask last) and the ``dict.txt`` symbols (rows 4..N-2).
    """
    index = {}
    for i, t in enumerate(tokens):
        index.setdefault(t, i)
    try:
        head = [index[specials[r]] for r in ("cls", "pad", "sep", "unk")]
        mask = index[specials["mask"]]
    except KeyError as e:
        raise AssetError(f"special token {e.args[0]!r} not in the vocabulary") from None
    skip = set(head) | {mask}
    body = [i for i in range(len(tokens)) if i not in skip]
    symbols = []
    for i in body:
        t = tokens[i]
        if gpt2_encoder is not None:
            if t not in gpt2_encoder:
                raise AssetError(f"RoBERTa token {t!r} (id {i}) not in GPT-2 encoder.json")
            t = str(gpt2_encoder[t])
        if not t or any(c.isspace() for c in t):
            raise AssetError(f"vocabulary token id {i} ({t!r}) is empty or contains whitespace; fairseq dict "
                             "cannot represent it")
        symbols.append(t)
    clash = set(symbols) & set(FAIRSEQ_SPECIALS + ("<mask>",))
    if clash:
        raise AssetError(f"vocabulary contains fairseq special symbols as ordinary tokens: {sorted(clash)}")
    if len(set(symbols)) != len(symbols):
        raise AssetError("vocabulary has duplicate tokens; fairseq dict.txt would reject it")
    return head + body + [mask], symbols


def map_state_dict(hf: Dict, cfg: Dict, perm: List[int], model_type: str,
                   embedding_scale: float = 1.0) -> Tuple[Dict, List[str], bool]:
    """Rename/reshape HF tensors to fairseq ``roberta`` keys.

    ``embedding_scale`` multiplies the token and position tables and divides the MLM head LayerNorm (see the
    module docstring); it is applied by :func:`import_hf`, which also handles freshly initialised heads.

    Returns:
        (fairseq tensors, dropped HF keys, whether an MLM head was found).
    """
    import torch

    used = set()

    def take(k):
        if k not in hf:
            raise AssetError(f"HF checkpoint lacks tensor {k!r}")
        used.add(k)
        return hf[k]

    out = {}
    idx = torch.tensor(perm, dtype=torch.long)
    word = take("embeddings.word_embeddings.weight")
    if word.shape[0] != len(perm):
        raise AssetError(f"word embeddings have {word.shape[0]} rows but the vocabulary has {len(perm)} tokens")
    out[PREFIX + "embed_tokens.weight"] = word[idx].clone()

    pos = take("embeddings.position_embeddings.weight")
    tt_key = "embeddings.token_type_embeddings.weight"
    tt0 = take(tt_key)[0] if tt_key in hf else torch.zeros(pos.shape[1])
    max_pos = int(cfg["max_position_embeddings"])
    if model_type == "bert":
        # fairseq learned positions start at padding_idx + 1 = 2: BERT position p -> row p + 2.
        table = torch.zeros(max_pos + 2, pos.shape[1])
        table[2:] = pos + tt0
    else:
        # HF RoBERTa already uses the fairseq layout (rows 0/1 unused, max_position_embeddings = 514).
        table = pos.clone() + tt0
        table[:2] = 0.0
    out[PREFIX + "embed_positions.weight"] = table
    out[PREFIX + "layernorm_embedding.weight"] = take("embeddings.LayerNorm.weight")
    out[PREFIX + "layernorm_embedding.bias"] = take("embeddings.LayerNorm.bias")

    names = {
        "attention.self.query": "self_attn.q_proj",
        "attention.self.key": "self_attn.k_proj",
        "attention.self.value": "self_attn.v_proj",
        "attention.output.dense": "self_attn.out_proj",
        "attention.output.LayerNorm": "self_attn_layer_norm",
        "intermediate.dense": "fc1",
        "output.dense": "fc2",
        "output.LayerNorm": "final_layer_norm",
    }
    for i in range(int(cfg["num_hidden_layers"])):
        for hk, fk in names.items():
            for p in ("weight", "bias"):
                out[f"{PREFIX}layers.{i}.{fk}.{p}"] = take(f"encoder.layer.{i}.{hk}.{p}")

    # MLM head, when the checkpoint has one (BertForMaskedLM: cls.predictions.*; RobertaForMaskedLM: lm_head.*).
    has_head = False
    for dense, ln, bias in (("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                             "cls.predictions.bias"),
                            ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias")):
        if f"{dense}.weight" in hf:
            out["encoder.lm_head.dense.weight"] = take(f"{dense}.weight")
            out["encoder.lm_head.dense.bias"] = take(f"{dense}.bias")
            out["encoder.lm_head.layer_norm.weight"] = take(f"{ln}.weight")
            out["encoder.lm_head.layer_norm.bias"] = take(f"{ln}.bias")
            out["encoder.lm_head.bias"] = take(bias)[idx].clone()
            has_head = True
            break
    for k in ("cls.predictions.decoder.weight", "lm_head.decoder.weight", "lm_head.decoder.bias",
              "cls.predictions.decoder.bias", "embeddings.position_ids"):
        if k in hf:  # tied to the embeddings / bookkeeping buffers: nothing to carry
            used.add(k)
    if embedding_scale != 1.0:
        out[PREFIX + "embed_tokens.weight"] *= embedding_scale
        out[PREFIX + "embed_positions.weight"] *= embedding_scale
        if has_head:
            out["encoder.lm_head.layer_norm.weight"] = out["encoder.lm_head.layer_norm.weight"] / embedding_scale
            out["encoder.lm_head.layer_norm.bias"] = out["encoder.lm_head.layer_norm.bias"] / embedding_scale
    dropped = sorted(k for k in hf if k not in used)
    return out, dropped, has_head


def _fairseq_args(out_dir: Path, cfg: Dict):
    """Parse a fairseq training command line for the matching ``roberta`` so cfg has every default."""
    from fairseq import options

    flags = arch_flags(cfg)
    argv = [str(out_dir), "--task", "masked_lm", "--criterion", "masked_lm", "--arch", "roberta",
            "--tokens-per-sample", str(flags["max_positions"]), "--optimizer", "adam"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return options.parse_args_and_arch(options.get_training_parser(), argv)


def arch_flags(cfg: Dict) -> Dict[str, int]:
    """fairseq ``roberta`` flags equivalent to an HF config."""
    max_pos = int(cfg["max_position_embeddings"])
    if cfg["model_type"] == "roberta":
        max_pos -= 2  # HF RoBERTa counts the two unused fairseq rows
    return {
        "encoder_layers": int(cfg["num_hidden_layers"]),
        "encoder_embed_dim": int(cfg["hidden_size"]),
        "encoder_ffn_embed_dim": int(cfg["intermediate_size"]),
        "encoder_attention_heads": int(cfg["num_attention_heads"]),
        "max_positions": max_pos,
    }


def _plain(v):
    """JSON/pickle-safe copy of an argparse value (tuples -> lists) so weights_only loading needs no globals."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


# --------------------------------------------------------------------------------------------------- main
def import_hf(model_dir: os.PathLike, output_dir: os.PathLike, *, gpt2_encoder_json: Optional[os.PathLike] = None,
              seed: int = 0, embedding_scale: float = 16.0, force: bool = False) -> Dict:
    """Convert an HF BERT/RoBERTa checkpoint directory into a fairseq ``roberta`` checkpoint directory.

    Args:
        model_dir: HF directory with ``config.json``, ``model.safetensors`` or ``pytorch_model.bin`` and the
            tokenizer files.
        output_dir: Destination; receives ``model.pt``, ``dict.txt``, ``arch.json`` and the tokenizer files.
        gpt2_encoder_json: RoBERTa only: GPT-2 ``encoder.json`` (default ``<data>/gpt2_bpe/encoder.json``
            next to ``output_dir``'s parent is NOT guessed: pass it) to write a GPT-2-id ``dict.txt``.
        seed: Seed of the fresh MLM-head initialisation when the source has none.
        embedding_scale: Exact reparametrisation factor for the embedding tables (module docstring); use a
            power of two. 1 gives the plain mapping.
        force: Rebuild even if a matching stamp is present.

    Returns:
        The ``arch.json`` content.

    Raises:
        AssetError: unsupported or inconsistent input.
    """
    import torch
    from omegaconf import OmegaConf

    model_dir, out_dir = Path(model_dir).resolve(), Path(output_dir).resolve()
    if not model_dir.is_dir():
        raise AssetError(f"model dir {model_dir} not found")
    cfg = _read_config(model_dir)
    weights_file = model_dir / ("model.safetensors" if (model_dir / "model.safetensors").is_file()
                                else "pytorch_model.bin")
    key = {"source": str(model_dir), "weights_sha256": sha256_file(weights_file) if weights_file.is_file() else None,
           "seed": seed, "embedding_scale": embedding_scale, "format": 1}
    if not force and stamp_ok(out_dir, "import_hf", key):
        log(f"import-hf: up to date in {out_dir}")
        return json.loads((out_dir / "arch.json").read_text())

    mt = cfg["model_type"]
    log(f"import-hf: reading {model_dir} ({mt})")
    hf, src = _read_weights(model_dir)
    tokens = _read_vocab(model_dir, mt)
    specials = _special_names(model_dir, mt)
    gpt2 = None
    if mt == "roberta":
        if gpt2_encoder_json is None:
            raise AssetError("RoBERTa import needs --gpt2-encoder-json (e.g. <data>/gpt2_bpe/encoder.json) to "
                             "write a GPT-2-id dict.txt")
        gpt2 = json.loads(Path(gpt2_encoder_json).read_text(encoding="utf-8"))
    perm, symbols = build_vocab_permutation(tokens, specials, gpt2)
    if embedding_scale <= 0:
        raise AssetError(f"embedding_scale must be > 0 (got {embedding_scale})")
    mapped, dropped, has_head = map_state_dict(hf, cfg, perm, mt, embedding_scale)

    out_dir.mkdir(parents=True, exist_ok=True)
    # dict.txt first: the masked_lm task below loads it to size the embedding (len + 4 specials + <mask>).
    write_text_atomic(out_dir / "dict.txt", "".join(f"{s} 1\n" for s in symbols))

    import warnings

    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    with warnings.catch_warnings():
        # hydra's deprecation chatter from convert_namespace_to_omegaconf is noise for a conversion tool.
        warnings.simplefilter("ignore")
        args = _fairseq_args(out_dir, cfg)
        fcfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(fcfg.task)
    if len(task.source_dictionary) != len(perm):
        raise AssetError(f"fairseq dictionary has {len(task.source_dictionary)} symbols, expected {len(perm)}")
    torch.manual_seed(seed)
    model = task.build_model(fcfg.model)
    model.eval()
    sd = model.state_dict()
    init = float(cfg.get("initializer_range", 0.02))
    if not has_head:
        # No MLM head in the source (MiniLM): BERT-style fresh init; decoder weight stays tied to embed_tokens.
        g = torch.Generator().manual_seed(seed)
        d = int(cfg["hidden_size"])
        mapped["encoder.lm_head.dense.weight"] = torch.randn(d, d, generator=g) * init
        mapped["encoder.lm_head.dense.bias"] = torch.zeros(d)
        # 1/embedding_scale compensates the scaled (tied) decoder weight so logits keep a normal range.
        mapped["encoder.lm_head.layer_norm.weight"] = torch.full((d,), 1.0 / embedding_scale)
        mapped["encoder.lm_head.layer_norm.bias"] = torch.zeros(d)
        mapped["encoder.lm_head.bias"] = torch.zeros(len(perm))
    mapped["encoder.lm_head.weight"] = mapped[PREFIX + "embed_tokens.weight"]  # tied, as fairseq saves it
    for k, v in sd.items():  # non-parameter buffers (e.g. "version") keep the model's own values
        if k not in mapped and not k.endswith("version"):
            raise AssetError(f"no source tensor for fairseq key {k}")
        mapped.setdefault(k, v)
    extra = sorted(set(mapped) - set(sd))
    if extra:
        raise AssetError(f"mapped keys unknown to fairseq roberta: {extra[:5]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(mapped[k].shape):
            raise AssetError(f"{k}: shape {tuple(mapped[k].shape)} != fairseq {tuple(v.shape)}")
    model.load_state_dict(mapped, strict=True)  # proves strict loadability before anything is written

    cfg_container = OmegaConf.to_container(fcfg, resolve=True, enum_to_str=True)
    # fairseq stores legacy (argparse) model args as a Namespace; a plain dict with _name loads the same way
    # through load_checkpoint_to_cpu/build_model and needs no pickle allow-listing under weights_only=True.
    model_args = vars(cfg_container["model"]) if isinstance(cfg_container["model"], argparse.Namespace) \
        else dict(cfg_container["model"])
    cfg_container["model"] = {k: _plain(v) for k, v in model_args.items()}
    cfg_container["model"]["_name"] = "roberta"
    state = {
        "args": None,
        "cfg": cfg_container,
        "model": {k: v.contiguous() for k, v in model.state_dict().items()},
        "criterion": None,
        "optimizer_history": [{"criterion_name": "MaskedLmLoss", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 0}],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True},
                        "previous_training_time": 0.0},
        "last_optimizer_state": None,
    }
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save(state, str(tmp))

    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(model_dir / name, tmp)
            copied.append(name)
    flags = arch_flags(cfg)
    info = {
        "arch": "roberta",
        **flags,
        "encoder_normalize_before": False,
        "fairseq_args": " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items()),
        "source": str(model_dir),
        "source_weights": src.name,
        "source_model_type": mt,
        "vocab_size": len(perm),
        "dict_txt_symbols": len(symbols),
        "special_map": {"<s>": specials["cls"], "<pad>": specials["pad"], "</s>": specials["sep"],
                        "<unk>": specials["unk"], "<mask> (last row)": specials["mask"]},
        "lowercase": bool(json.loads((model_dir / "tokenizer_config.json").read_text()).get("do_lower_case", True))
        if (model_dir / "tokenizer_config.json").is_file() else None,
        "bpe": "hf_wordpiece" if mt == "bert" else "gpt2",
        "lm_head": "from source" if has_head else
        f"fresh init (source has no MLM head): dense ~ N(0, {init}) seed {seed}, LayerNorm weight "
        f"1/embedding_scale and bias 0, output bias 0, decoder tied to embed_tokens",
        "embedding_scale": embedding_scale,
        "dropped_source_tensors": dropped,
        "layer_norm_eps": {"source": cfg.get("layer_norm_eps"), "fairseq": 1e-5},
        "tokenizer_files": copied,
    }
    write_text_atomic(out_dir / "arch.json", json.dumps(info, indent=2) + "\n")
    write_stamp(out_dir, "import_hf", ["model.pt", "dict.txt", "arch.json", *copied], key)
    log(f"import-hf: wrote {out_dir}/model.pt ({len(perm)} rows, {len(symbols)} dict.txt symbols); "
        f"dropped {dropped}; lm_head: {info['lm_head'].split(':')[0]}")
    return info
