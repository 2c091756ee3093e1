"""End to end: FP teacher -> TernaryBERT student (``--criterion ternary_distill``) -> packed export, exact reload.

Training goes through ``fairseq_cli.train`` *in process* (the same parser, ``--user-dir`` import and ``main`` as the
``fairseq-train`` script; subprocesses would re-import fairseq each time, ~10 s apiece on the shared CPU) on the
shared tiny dataset of ``model_helpers.make_tiny_glue``.
"""
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from model_helpers import PLUGIN_DIR, make_tiny_glue, random_batch

pytestmark = pytest.mark.slow  # end-to-end distillation training: left out by `make test-fast`

HEAD = "sentence_classification_head"


def _fairseq_train(data: Path, save_dir: Path, extra, max_update=3):
    from fairseq import checkpoint_utils, distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.logging import metrics
    from fairseq_cli import train

    argv = [
        str(data), "--user-dir", str(PLUGIN_DIR), "--cpu", "--task", "sentence_prediction", "--num-classes", "2",
        "--init-token", "0", "--separator-token", "2", "--max-positions", "64", "--arch", "ibert_roberta_tiny",
        "--criterion", "sentence_prediction", "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "1e-3",
        "--lr-scheduler", "polynomial_decay", "--warmup-updates", "0", "--total-num-update", str(max_update),
        "--max-update", str(max_update), "--batch-size", "16", "--save-dir", str(save_dir),
        "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "1", "--num-workers", "0",
        "--seed", "1", "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric",
        "--dropout", "0.1", "--attention-dropout", "0.1", *extra,
    ]
    if hasattr(checkpoint_utils.save_checkpoint, "best"):  # module-level state left by a previous in-process run
        del checkpoint_utils.save_checkpoint.best
    metrics.reset()
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), train.main)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb_e2e")
    data = make_tiny_glue(root, n_train=48, n_valid=16)
    _fairseq_train(data, root / "ck_fp", ["--quant-mode", "none"])
    teacher = root / "ck_fp" / "checkpoint_best.pt"
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab(level=logging.INFO)
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.setLevel(logging.INFO)
    root_logger.addHandler(handler)
    # Earlier in-process tools (hydra's logging.config.dictConfig) may have disabled fairseq's existing loggers.
    saved = []
    for name in ("fairseq", "fairseq.logging.progress_bar", "fairseq_cli.train"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.level, lg.propagate, lg.disabled))
        lg.setLevel(logging.INFO)
        lg.propagate, lg.disabled = True, False
    try:
        _fairseq_train(
            data, root / "ck_tb",
            ["--quant-mode", "ternarybert", "--weight-bits", "2", "--criterion", "ternary_distill",
             "--teacher-path", str(teacher), "--pred-distill", "--intermediate-distill",
             "--finetune-from-model", str(teacher)],
        )
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
        for lg, level, propagate, disabled in saved:
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
    return root, teacher, root / "ck_tb" / "checkpoint_last.pt", "\n".join(records)


def _logged_updates(log):
    """``[{loss, pred_loss, att_loss, rep_loss}, ...]`` per update from fairseq's train_inner lines."""
    rows = []
    for line in log.splitlines():
        if "num_updates=" in line and "pred_loss=" in line:
            fields = dict(re.findall(r"(\w+)=([^,\s]+)", line))
            rows.append({k: float(fields[k]) for k in ("loss", "pred_loss", "att_loss", "rep_loss")})
    return rows


def test_student_trains_with_finite_summing_decreasing_losses(trained):
    _, _, student, log = trained
    rows = _logged_updates(log)
    assert len(rows) == 3, log[-2000:]  # one line per update (--log-interval 1)
    for r in rows:
        assert all(math.isfinite(v) for v in r.values()), r
        assert r["att_loss"] >= 0 and r["rep_loss"] > 0 and r["pred_loss"] > 0
        # loss = pred + att + rep (no label loss by default), each logged to 3 decimals
        assert r["loss"] == pytest.approx(r["pred_loss"] + r["att_loss"] + r["rep_loss"], abs=2e-3)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rep_loss"] < rows[0]["rep_loss"]
    state = torch.load(student, map_location="cpu", weights_only=False)
    assert not any("teacher" in k for k in state["model"])
    assert state.get("criterion") is None or not state["criterion"]


def test_distillation_moves_the_student_towards_the_teacher(trained):
    """Learned effect on held-out data: the trained student's distillation losses on the validation set are below
    those of the untrained student (the teacher's weights, ternarized)."""
    from fairseq import checkpoint_utils, tasks

    from ibert_plugin.criterions.distill import TernaryDistillConfig, TernaryDistillCriterion

    _, teacher, student, _ = trained
    state = checkpoint_utils.load_checkpoint_to_cpu(str(student))
    task = tasks.setup_task(state["cfg"].task)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(len(ds))])
    crit = TernaryDistillCriterion(
        TernaryDistillConfig(teacher_path=str(teacher), pred_distill=True, intermediate_distill=True), task)
    trained_model = task.build_model(state["cfg"].model)
    trained_model.load_state_dict(state["model"], strict=True)
    initial = task.build_model(state["cfg"].model)
    fp_state = torch.load(teacher, map_location="cpu", weights_only=False)["model"]
    initial.load_state_dict(fp_state, strict=True)

    def losses(model):
        model.eval()
        with torch.no_grad():
            _, n, out = crit(model, sample)
        return {k: float(out[k]) / n for k in ("pred_loss", "att_loss", "rep_loss")}

    before, after = losses(initial), losses(trained_model)
    assert after["rep_loss"] < 0.9 * before["rep_loss"], (before, after)
    assert after["rep_loss"] + after["att_loss"] + after["pred_loss"] < sum(before.values()), (before, after)


def test_export_packs_and_reloads_exactly(trained, capsys):
    from ibert_plugin.export import main
    from ibert_plugin.wiring.checkpoint import load_checkpoint_model, load_packed_model

    root, _, student, _ = trained
    out = root / "student.packed.pt"
    rc = main(["--checkpoint", str(student), "--output", str(out), "--verify"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert "ratio vs fp32" in stdout and "max |dlogit| = 0" in stdout
    packed = torch.load(out, map_location="cpu", weights_only=True)
    assert packed["quantized"]["encoder.sentence_encoder.layers.0.fc1.weight"]["encoding"] == "ternary2"
    model, _ = load_checkpoint_model(str(student))
    reloaded = load_packed_model(str(out))
    tokens = random_batch(model.encoder.dictionary, bsz=3, tgt_len=10)
    with torch.no_grad():
        assert torch.equal(model(tokens, classification_head_name=HEAD)[0],
                           reloaded(tokens, classification_head_name=HEAD)[0])


def test_export_rejects_fp_checkpoint(trained, capsys):
    from ibert_plugin.export import main

    root, teacher, _, _ = trained
    rc = main(["--checkpoint", str(teacher), "--output", str(root / "x.pt")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "not a quantized checkpoint" in err and err.strip().count("\n") == 0


def test_quantized_checkpoint_loads_as_fp_teacher(trained):
    """A ternarybert checkpoint used as --teacher-path is rebuilt in quant_mode none, frozen, out of the tree."""
    from fairseq import checkpoint_utils, tasks

    from ibert_plugin.criterions.distill import TernaryDistillConfig, TernaryDistillCriterion

    root, teacher_fp, student, _ = trained
    cfg = checkpoint_utils.load_checkpoint_to_cpu(str(student))["cfg"]
    task = tasks.setup_task(cfg.task)
    crit = TernaryDistillCriterion(
        TernaryDistillConfig(teacher_path=str(student), pred_distill=True, intermediate_distill=True), task)
    t = crit.teacher
    assert t.quant_config.quant_mode == "none" and not t.training
    assert all(not p.requires_grad for p in t.parameters())
    assert len(crit.state_dict()) == 0
    sd = torch.load(student, map_location="cpu", weights_only=False)["model"]
    for name, p in t.named_parameters():
        assert torch.equal(p, sd[name]), name  # the latent weights, used in full precision
