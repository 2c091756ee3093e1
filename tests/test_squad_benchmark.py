"""benchmarks/squad_accuracy.py: the per-question F1 its intervals resample, and the whole benchmark on a tiny model
(rows, predictions files, result JSON), with the post-training peers checked against the FP model they quantize."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole pipelines / subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("squad_accuracy", REPO / "benchmarks" / "squad_accuracy.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _article(title, questions):
    return {"title": title, "paragraphs": [{"context": "Paris is in France.", "qas": questions}]}


def _q(qid, answers, impossible=False):
    q = {"id": qid, "question": "where?", "answers": [{"text": t, "answer_start": 0} for t in answers]}
    if impossible:
        q["is_impossible"] = True
    return q


def _write_task(root: Path, task: str, version: str):
    (root / task).mkdir(parents=True)
    train = [_article(f"t{i}", [_q(f"t{i}q{j}", ["Paris"]) for j in range(3)]) for i in range(5)]
    dev = [_article(f"d{i}", [_q(f"d{i}a", ["Paris"]), _q(f"d{i}n", [], impossible=True)]) for i in range(4)]
    for name, arts in (("train.json", train), ("dev.json", dev)):
        (root / task / name).write_text(json.dumps({"version": version, "data": arts}))


def test_per_question_f1_scores_unanswerable_questions_as_the_official_v2_script(tmp_path):
    _write_task(tmp_path / "data", "SQUAD2", "v2.0")
    test = tmp_path / "data" / "SQUAD2" / "dev.json"
    pred = {"d0a": "Paris", "d0n": "", "d1a": "in Paris France", "d1n": "Paris", "d2a": "", "d2n": ""}
    (tmp_path / "p.json").write_text(json.dumps(pred))  # d3a, d3n missing: 0 each
    f1 = bench.per_question_f1(test, tmp_path / "p.json", version_2=True)
    assert f1 == pytest.approx([100.0, 100.0, 50.0, 0.0, 0.0, 100.0, 0.0, 0.0])


def test_per_question_f1_v1_takes_the_max_over_gold_answers(tmp_path):
    doc = {"version": "1.1", "data": [_article("a", [_q("x", ["the Eiffel Tower", "Paris"]), _q("y", ["France"]),
                                                      _q("z", ["Paris"])])]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    (tmp_path / "p.json").write_text(json.dumps({"x": "Paris", "y": "in France"}))
    assert bench.per_question_f1(tmp_path / "t.json", tmp_path / "p.json") == pytest.approx([100.0, 200 / 3, 0.0])


# ---------------------------------------------------------------------------------------------- the whole benchmark
TINY_BENCH = ["--arch", "tiny", "--quick", "--max-updates", "fp=6,ternary=2,int_ternary=2,ibert=2",
              "--recipe-arg=--tokenizer_dir=" + str(REPO / "data" / "minilm"), "--recipe-arg=--max_seq_length=48",
              "--recipe-arg=--doc_stride=16", "--recipe-arg=--eval_step=3", "--recipe-arg=--cpu",
              "--recipe-arg=--learning_rate=1e-3", "--recipe-arg=--per_gpu_batch_size=8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import os

    from squad_data import synthetic_squad

    root = tmp_path_factory.mktemp("bench")
    synthetic_squad(root / "data" / "SQUAD1" / "train.json", 6, 3, 4, seed=0)
    synthetic_squad(root / "data" / "SQUAD1" / "dev.json", 1, 2, 4, seed=1)
    synthetic_squad(root / "data" / "SQUAD1" / "test_subset.json", 2, 2, 4, seed=2)
    argv = ["--data-dir", str(root / "data"), "--output-dir", str(root / "out"), "--results-dir",
            str(root / "results"), *TINY_BENCH, "--engine-speed", "--engine-batches", "2", "--reps", "1",
            "--threads", "1"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main(argv)
    assert rc == 0, buf.getvalue()[-3000:]
    return root, json.loads(buf.getvalue().strip().splitlines()[-1])


def test_every_row_on_the_same_questions_with_gaps_and_files(tiny_run):
    root, res = tiny_run
    test_file = root / "data" / "SQUAD1" / "test_subset.json"
    ids = {q["id"] for a in json.loads(test_file.read_text())["data"] for p in a["paragraphs"] for q in p["qas"]}
    rows = set(res["rows"]) | set(res["unavailable"])
    assert rows == set(bench.ROWS)
    assert {"fp32", "ort_int8_dynamic", "torch_int8_dynamic", "w8a8_ptq", "int8_qat", "int8_qat_engine", "w2a8_twn",
            "int_ternary", "int_ternary_engine"} <= set(res["rows"])
    for row, r in res["rows"].items():
        preds = json.loads((root / "results" / "predictions" / f"{row}.json").read_text())
        assert set(preds) == ids and r["questions"] == len(ids), row
        if row != "fp32":
            lo, hi = r["gap_f1_ci95"]
            assert lo <= r["gap_f1"] <= hi, row
    for eng, qat in bench.ENGINE_OF.items():
        assert res["rows"][eng]["same_predictions_as_qat"] == len(ids)  # the engine reproduces its QAT model
        assert res["rows"][eng]["f1"] == res["rows"][qat]["f1"]
    assert res["data"]["test"]["sha256"] == bench.sha256(test_file) and res["data"]["test"]["file"] == \
        "SQUAD1/test_subset.json"
    assert res["command"].startswith("python benchmarks/squad_accuracy.py --data-dir")
    assert json.loads((root / "results" / "result.json").read_text()) == res
    assert [c["update"] for c in res["fp_selection_curve"]] == [3, 6] and "converged" in res["fp_convergence"]
    assert res["complete"] is True and res["pending"] == []


def test_table_renders_every_row_of_the_result_json(tiny_run, tmp_path, capsys):
    root, res = tiny_run
    assert bench.main(["--table", str(root / "results" / "result.json")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| row | EM | F1 |") and len(out) == 2 + len(res["rows"]) + len(res["unavailable"])
    fp = next(ln for ln in out if ln.startswith("| FP32 |"))
    assert f"| {res['rows']['fp32']['f1']:.2f} |" in fp
    eng = next(ln for ln in out if ln.startswith("| I-BERT INT8, integer engine |"))
    assert f"same predictions as its QAT model: {res['rows']['int8_qat_engine']['questions']} of" in eng
    (tmp_path / "bad.json").write_text("{}")
    assert bench.main(["--table", str(tmp_path / "bad.json")]) == 2
    assert capsys.readouterr().err.startswith("error: --table")


def test_fp_and_peer_rows_are_written_before_the_quantized_stages_and_marked_partial(tiny_run, tmp_path,
                                                                                    monkeypatch, capsys):
    """A run stopped after FP and the peers (the first ~2 hours of a CPU run) leaves a result.json that holds those
    rows and says it is partial; the quantized rows are pending, not missing silently."""
    import shutil

    root, _ = tiny_run
    shutil.copytree(root / "out", tmp_path / "out")
    shutil.copytree(root / "data", tmp_path / "data")
    summary = tmp_path / "out" / "runs" / "summary.json"
    done = json.loads(summary.read_text())
    done["stages"] = {"fp": done["stages"]["fp"]}  # the state after the FP stage
    summary.write_text(json.dumps(done))
    real = bench.recipe.run_squad
    calls = []

    def stop_after_fp(argv):
        stages = argv[argv.index("--stages") + 1]
        calls.append(stages)
        return real(argv) if stages == "fp" else 1  # as if the quantized stages were interrupted

    monkeypatch.setattr(bench.recipe, "run_squad", stop_after_fp)
    argv = ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"), "--results-dir",
            str(tmp_path / "results"), *TINY_BENCH]
    assert bench.main(argv) == 1
    assert calls == ["fp", "ternary,int_ternary,int_ternary_engine,ibert,engine"]
    res = json.loads((tmp_path / "results" / "result.json").read_text())
    assert res["complete"] is False
    assert set(res["pending"]) == {"int8_qat", "int8_qat_engine", "w2a8_twn", "int_ternary", "int_ternary_engine"}
    assert {"fp32", "ort_int8_dynamic", "torch_int8_dynamic", "w8a8_ptq"} <= set(res["rows"])
    assert res["targets"]["int8_qat"]["met"] is None
    assert "PARTIAL" in capsys.readouterr().out


def test_peers_differ_from_fp_only_through_quantization(tiny_run):
    """The peers' wiring (FloatEncoder -> ONNX export -> runtime -> the FP span head) is exact: ONNX Runtime FP32 on
    the exported encoder gives the FP model's logits to float rounding. The int8 peers then differ from FP by
    quantization error only: per-channel int8 weights and 8-bit dynamic activations perturb each matmul by about
    2^-8 of its range, which through the tiny model's 2 layers stays far below 0.1 of the logits' spread (a wiring
    error, such as a missing position offset or an unmasked padding row, moves them by their whole spread)."""
    import torch

    from ibert_plugin.squad.evaluate import model_logits
    from ibert_plugin.wiring.checkpoint_file import check_fairseq_checkpoint
    from integer_engine import FloatEncoder
    from peers import build_peers

    root, _ = tiny_run
    state = check_fairseq_checkpoint(str(root / "out" / "runs" / "fp" / "checkpoint_best.pt"))
    fp = bench.calibrated_model(state, {}, [], 1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 200, (4, 40), generator=g)
    tokens[:, 0] = 0
    tokens[2, 30:] = 1  # padding
    tokens[2, 29] = 2
    ref_s, ref_e = model_logits(fp, 1)(tokens)
    built = build_peers(FloatEncoder(fp), [tokens[i] for i in range(4)], tokens, 1,
                        only=["ort_fp32", "ort_int8_dynamic", "torch_int8"], log=lambda *_: None)
    head = fp.classification_heads["squad_span"]
    real = ~tokens.eq(1)
    spread = (ref_s[real].max() - ref_s[real].min()).item()
    for name, tol in (("ort_fp32", 1e-4 * max(1.0, spread)), ("ort_int8_dynamic", 0.1 * spread),
                      ("torch_int8", 0.1 * spread)):
        s, e = bench.peer_logits(built[name].run, head, 1)(tokens)
        assert (s[real] - ref_s[real]).abs().max().item() <= tol, name
        assert (e[real] - ref_e[real]).abs().max().item() <= tol, name
        if name != "ort_fp32":  # and it is quantized: not the FP logits
            assert (s[real] - ref_s[real]).abs().max().item() > 1e-5, name


def test_engine_speed_case_is_bit_exact_and_timed_against_fp32_and_peers(tiny_run):
    _, res = tiny_run
    speed = res["engine_speed"]
    assert speed["window"] == 48 and set(speed["cases"]) == {"int8_qat_engine_b2", "int_ternary_engine_b2"}
    for case in speed["cases"].values():
        assert case["bit_exact"] is True and case["batch"] == 2
        assert {"engine", "fp32_pytorch", "torch_int8", "ort_int8_dynamic"} <= set(case["seconds"])
        assert all(s["min"] <= s["median"] <= s["max"] for s in case["seconds"].values())


def test_missing_task_folder_or_report_file_is_one_error_line(tmp_path, capsys):
    from squad_data import synthetic_squad

    assert bench.main(["--data-dir", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--squad-dir" in err
    synthetic_squad(tmp_path / "SQUAD1" / "train.json", 1, 1, 2)
    synthetic_squad(tmp_path / "SQUAD1" / "dev.json", 1, 1, 2)
    rc = bench.main(["--data-dir", str(tmp_path), "--quick", "--arch", "tiny",
                     "--recipe-arg=--tokenizer_dir=" + str(REPO / "data" / "minilm")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "has no report file" in err and "test_subset.json" in err
    assert not list(tmp_path.glob("**/checkpoint*.pt"))  # refused before any training
