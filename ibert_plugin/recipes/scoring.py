"""Scoring a GLUE-format sentence-classification checkpoint sentence by sentence, and what ships of it.

* :func:`test_labels`: the labels of a task's held-out test split (``<glue_dir>/<TASK>/test_with_labels.tsv``);
* :func:`score_checkpoint`: per-sentence correctness (0/1) of a fairseq checkpoint on binarised splits, for the
  paired bootstrap (:mod:`ibert_plugin.stats`); :func:`cached_scores`: the same, cached by checkpoint path and
  modification time in a JSON file;
* :func:`dev_curve`: dev accuracy by update from fairseq's validation lines;
* :func:`fp_weights_file`, :func:`export_packed`, :func:`size_mb`: the file a model ships as (the FP32 state dict;
  the packed model of ``python -m ibert_plugin.export``) and its size.

Used by the demo and the benchmarks that reuse its stages. fairseq, torch and the GLUE reader are imported inside the
functions that need them (this module imports without fairseq).
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

from .stages import StageError, note, run_command

#: The classification head of a GLUE-format ``sentence_prediction`` checkpoint.
HEAD = "sentence_classification_head"


def test_labels(glue_dir: Path, task: str, label_dictionary) -> List[int]:
    """Class indices of ``task``'s held-out test split from ``test_with_labels.tsv`` (same rows, same order as
    ``test.tsv``, which the preprocessing binarised as the ``test`` split); ``label_dictionary``: the fairseq task's.
    A label that is not in the dictionary is a :class:`StageError`."""
    from ..assets import glue

    path = glue_dir / task / "test_with_labels.tsv"
    _, labels, _ = glue.read_split(path, glue.TASKS[task], "dev")
    out = []
    for i, lab in enumerate(labels):
        j = label_dictionary.index(lab)
        if j == label_dictionary.unk():
            raise StageError(f"{path}: label {lab!r} (row {i + 1}) is not in the label dictionary")
        out.append(j - label_dictionary.nspecial)
    return out


def score_checkpoint(checkpoint: Path, data_bin: Path, glue_dir: Path, task: str, splits: Sequence[str] = ("test",),
                     batch_size: int = 64, device=None, encoder=None) -> Dict[str, List[int]]:
    """Per-sentence correctness (0/1) of a fairseq checkpoint on binarised splits (``test``, ``valid``) of ``task``.

    The checkpoint is loaded with fairseq's ``load_model_ensemble_and_task`` and run in eval mode on the binarised
    splits through the task's collater (sentences batched by length), exactly what fairseq's validation does, but
    keeping each sentence's outcome for the paired bootstrap. The ``test`` split's labels come from
    :func:`test_labels` (``glue_dir``). ``device``: where the model runs (default CPU).

    ``encoder``: another encoder of the same checkpoint, ``encoder(src_tokens [B, T]) -> hidden states [B, T, D]``
    (a torch tensor or an array, e.g. a post-training int8 runtime of the exported FP model), whose output goes
    through the checkpoint's own float classification head instead of the model's forward.
    """
    import numpy as np
    import torch
    from fairseq import checkpoint_utils

    import ibert_plugin  # noqa: F401

    models, _cfg, fs_task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data_bin)})
    model = models[0].eval().to(device or "cpu")
    out = {}
    for split in splits:
        fs_task.load_dataset(split)
        ds = fs_task.dataset(split)
        if split == "test":
            targets = np.asarray(test_labels(glue_dir, task, fs_task.label_dictionary))
            if len(targets) != len(ds):
                raise StageError(f"test_with_labels.tsv has {len(targets)} rows, the binarised test split {len(ds)}")
        else:
            targets = None
        sizes = np.asarray(ds.sizes)
        order = np.argsort(sizes if sizes.ndim == 1 else sizes[0], kind="stable")
        preds = np.full(len(ds), -1, dtype=np.int64)
        gold = np.full(len(ds), -1, dtype=np.int64)
        with torch.no_grad():
            for s in range(0, len(ds), batch_size):
                batch = ds.collater([ds[int(i)] for i in order[s:s + batch_size]])
                net_input = {k: v.to(device or "cpu") for k, v in batch["net_input"].items()}
                if encoder is None:
                    logits, _ = model(**net_input, features_only=True, classification_head_name=HEAD)
                else:
                    hidden = encoder(net_input["src_tokens"])
                    hidden = hidden if isinstance(hidden, torch.Tensor) else torch.from_numpy(np.asarray(hidden))
                    logits = model.classification_heads[HEAD](hidden.float())
                ids = batch["id"].numpy()
                preds[ids] = logits.argmax(-1).cpu().numpy()
                if "target" in batch:
                    gold[ids] = batch["target"].view(-1).numpy()
        if targets is not None:
            gold = targets
        out[split] = (preds == gold).astype(int).tolist()
    return out


def cached_scores(checkpoint: Path, data_bin: Path, glue_dir: Path, task: str,
                  cache_file: Path) -> Dict[str, List[int]]:
    """:func:`score_checkpoint` on the test split, cached in ``cache_file`` (JSON) under the checkpoint's path and
    modification time: a checkpoint rewritten in place is scored again."""
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    key = f"{checkpoint}:{checkpoint.stat().st_mtime_ns}"
    if key not in cache:
        t0 = time.time()
        cache[key] = score_checkpoint(checkpoint, data_bin, glue_dir, task)
        note(f"scored {checkpoint} on the test split in {time.time() - t0:.0f} s")
        cache_file.write_text(json.dumps(cache))
    return cache[key]


def dev_curve(log_text: str) -> List[tuple]:
    """``[(num_updates, dev accuracy), ...]`` from fairseq's validation lines, in order."""
    out = []
    for line in log_text.splitlines():
        if "valid on 'valid' subset" not in line:
            continue
        acc = re.search(r"\|\s*accuracy\s+([0-9.]+)", line)
        upd = re.search(r"\|\s*num_updates\s+(\d+)", line)
        if acc and upd:
            out.append((int(upd.group(1)), float(acc.group(1))))
    return out


# ------------------------------------------------------------------------------------------------- shipped files
def size_mb(path: Path) -> float:
    """A file's size in MB (10^6 bytes)."""
    return path.stat().st_size / 1e6


def export_packed(checkpoint: Path, output: Path) -> Path:
    """The packed model of a quantized checkpoint (``python -m ibert_plugin.export --omit-lm-head``), written to
    ``output`` unless it is newer than the checkpoint."""
    if not output.exists() or output.stat().st_mtime < checkpoint.stat().st_mtime:
        run_command([sys.executable, "-m", "ibert_plugin.export", "--checkpoint", str(checkpoint), "--output",
                     str(output), "--omit-lm-head"], f"export {output.name}")
    return output


def fp_weights_file(checkpoint: Path, output: Path) -> Path:
    """The FP32 model as it would ship: the state dict alone (no optimizer state), written to ``output`` unless it is
    newer than the checkpoint."""
    import torch

    if not output.exists() or output.stat().st_mtime < checkpoint.stat().st_mtime:
        from ..wiring.checkpoint_file import read_checkpoint  # weights_only, fairseq's pickles allowed

        state = read_checkpoint(str(checkpoint))
        torch.save({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}, output)
    return output
