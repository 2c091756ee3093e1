"""Rebuild GPT-2's ``encoder.json`` / ``vocab.bpe`` from whisper's ``gpt2.tiktoken``.

The output is byte-identical to OpenAI's files (checked by sha256), so fairseq's ``--bpe gpt2
--gpt2-encoder-json ... --gpt2-vocab-bpe ...`` behaves exactly as with the downloaded originals. A fairseq
``dict.txt`` with one ``"<id> 1"`` line per GPT-2 id is written next to them: fairseq's real RoBERTa dict is
not available offline, and an identity-ordered one gives every data set the same vocabulary.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Dict, List, Tuple

from .common import AssetError, log, sha256_file, stamp_ok, write_stamp, write_text_atomic

ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_ID = 50256


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def read_tiktoken(path: Path) -> Dict[bytes, int]:
    """Parse ``base64(token) rank`` lines."""
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _split_for(token: bytes, ranks: Dict[bytes, int]) -> Tuple[bytes, bytes]:
    """Find the final merge that produced ``token``: replay BPE using only merges ranked below it."""
    limit = ranks[token]
    parts: List[bytes] = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = -1, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_i, best_rank = i, r
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise AssetError(f"gpt2.tiktoken: cannot recover the merge for token rank {limit} ({len(parts)} parts)")
    return parts[0], parts[1]


def convert(tiktoken_path: Path) -> Tuple[str, str]:
    """Convert ``gpt2.tiktoken`` to the texts of ``encoder.json`` and ``vocab.bpe``."""
    ranks = read_tiktoken(tiktoken_path)
    b2u = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    encoder = {s(tok): rank for tok, rank in ordered}
    encoder["<|endoftext|>"] = EOT_ID
    # json.dumps defaults (", " / ": " separators, ensure_ascii) reproduce OpenAI's bytes exactly.
    encoder_text = json.dumps(encoder)
    merges = ["#version: 0.2"]
    for tok, _ in ordered:
        if len(tok) > 1:
            a, b = _split_for(tok, ranks)
            merges.append(f"{s(a)} {s(b)}")
    # Trailing newline matters: fairseq reads merges with read().split("\n")[1:-1].
    return encoder_text, "\n".join(merges) + "\n"


def build_gpt2_bpe(whisper_dir: Path, out_dir: Path) -> Path:
    """Write ``encoder.json``, ``vocab.bpe`` and ``dict.txt`` into ``out_dir`` (skip if already verified).

    Args:
        whisper_dir: Directory of the installed ``whisper`` package.
        out_dir: Output directory, e.g. ``<data>/gpt2_bpe``.

    Raises:
        AssetError: missing source file or a hash mismatch.
    """
    key = {"source": "openai-whisper==20250625:whisper/assets/gpt2.tiktoken",
           "encoder.json": ENCODER_JSON_SHA256, "vocab.bpe": VOCAB_BPE_SHA256}
    if stamp_ok(out_dir, "gpt2_bpe", key):
        log(f"gpt2_bpe: up to date in {out_dir}")
        return out_dir
    src = whisper_dir / "assets" / "gpt2.tiktoken"
    if not src.is_file():
        raise AssetError(f"{src} not found (is openai-whisper==20250625 installed?)")
    got = sha256_file(src)
    if got != TIKTOKEN_SHA256:
        raise AssetError(f"{src}: sha256 {got} != expected {TIKTOKEN_SHA256}")
    log("gpt2_bpe: converting gpt2.tiktoken -> encoder.json + vocab.bpe")
    enc, bpe = convert(src)
    for name, text, want in (("encoder.json", enc, ENCODER_JSON_SHA256), ("vocab.bpe", bpe, VOCAB_BPE_SHA256)):
        import hashlib

        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest != want:
            raise AssetError(f"gpt2_bpe: converted {name} has sha256 {digest}, expected {want}")
        write_text_atomic(out_dir / name, text)
    write_text_atomic(out_dir / "dict.txt", "".join(f"{i} 1\n" for i in range(EOT_ID + 1)))
    write_stamp(out_dir, "gpt2_bpe", ["encoder.json", "vocab.bpe", "dict.txt"], key)
    log(f"gpt2_bpe: wrote {out_dir}/encoder.json, vocab.bpe, dict.txt (hashes verified)")
    return out_dir
