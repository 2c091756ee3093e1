"""Fault test (issue 24): SIGKILL of the whole run.py process tree at random instants, relaunch the same command,
and the resumed training ends with the same final checkpoint (model weights, optimizer state, update count) as an
uninterrupted run with the same seed.

What makes this hold: fairseq seeds every update with ``seed + num_updates`` (dropout) and every epoch's shuffle
with ``seed + epoch``, and checkpoint_last.pt stores the model, the optimizer, the LR scheduler and the position in
the epoch; a kill loses only the updates since the last save, which the relaunch recomputes identically. The copies
to checkpoint_last.pt / checkpoint_best.pt are atomic (``ibert_plugin.wiring.atomic_checkpoints``), so a kill during
a save never leaves a checkpoint the relaunch cannot load; the run-folder lock is released by the kill.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # whole pipelines / subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[1]
UPDATES = 24


def _argv(tiny_glue, out):
    return [sys.executable, str(REPO / "run.py"), "--task", "RTE", "--quant-mode", "none", "--arch", "tiny",
            "--lr", "1e-3", "--data-dir", str(tiny_glue), "--output-dir", str(out), "--cpu", "--max-update",
            str(UPDATES), "--", "--num-workers", "0", "--save-interval-updates", "3", "--no-epoch-checkpoints",
            "--log-interval", "50"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _final(out: Path):
    """checkpoint_last.pt of the (single) run folder: every relaunch resumed the same run."""
    (ck,) = out.glob("none/RTE-tiny/*/*_ckpt/checkpoint_last.pt")
    return torch.load(ck, map_location="cpu", weights_only=False)


def _saves(out: Path) -> int:
    """Checkpoint saves begun so far (fairseq logs "Saving checkpoint to ..." before writing)."""
    return sum(p.read_text(errors="replace").count("Saving checkpoint to") for p in out.glob("none/RTE-tiny/*/*.log"))


def _launch(argv, log):
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


@pytest.fixture(scope="module")
def reference(tiny_glue, tmp_path_factory):
    out = tmp_path_factory.mktemp("fault_ref")
    with open(out / "stdout.txt", "w") as log:
        rc = _launch(_argv(tiny_glue, out), log).wait(timeout=300)
    assert rc == 0, (out / "stdout.txt").read_text()[-3000:]
    return _final(out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_random_instants_then_resume_gives_the_same_checkpoint(reference, tiny_glue, tmp_path, seed):
    ref = reference
    rng = random.Random(seed)
    out = tmp_path / "out"
    argv = _argv(tiny_glue, out)
    kills = []
    with open(tmp_path / "stdout.txt", "a") as log:
        # a random instant of the training: a short random delay after a random checkpoint save has begun (so the
        # instants fall before, during and after the writes of checkpoint_last.pt / checkpoint_best.pt)
        target, delay = rng.randint(1, UPDATES // 3 - 2), rng.uniform(0.0, 0.4)
        proc = _launch(argv, log)
        end = time.time() + 300
        while _saves(out) < target and proc.poll() is None and time.time() < end:
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before the kill"
        os.killpg(proc.pid, signal.SIGKILL)  # run.py, fairseq-train and anything they started
        proc.wait()
        kills.append((target, round(delay, 2)))
        rc = _launch(argv, log).wait(timeout=300)
    assert rc == 0, (tmp_path / "stdout.txt").read_text()[-3000:]
    assert "resuming RTE" in (tmp_path / "stdout.txt").read_text()
    got = _final(out)
    assert got["optimizer_history"][-1]["num_updates"] == ref["optimizer_history"][-1]["num_updates"] == UPDATES
    assert got["model"].keys() == ref["model"].keys()
    diff = [k for k in ref["model"] if not torch.equal(ref["model"][k], got["model"][k])]
    assert not diff, f"kills (after save, +s) {kills}: weights differ from the uninterrupted run in {diff[:5]}"
    ro, go = ref["last_optimizer_state"]["state"], got["last_optimizer_state"]["state"]
    assert ro.keys() == go.keys()
    for k in ro:
        for name, t in ro[k].items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(go[k][name])), (k, name)
    assert got["extra_state"]["train_iterator"] == ref["extra_state"]["train_iterator"]
