"""benchmarks/squad_ptq_ablation.py: variant specs -> the quantization configs they claim, and bad input."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from ibert_plugin.quant.config import QuantConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("squad_ptq_ablation", REPO / "benchmarks" / "squad_ptq_ablation.py")
abl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(abl)


def _cfg(spec):
    return QuantConfig.from_namespace(argparse.Namespace(**abl.parse_variant(spec)))


def test_variants_build_the_configs_they_name():
    assert _cfg("fp").quant_mode == "none"
    t = _cfg("T8:10")
    assert (t.quant_mode, t.weight_bits, t.weight_method, t.act_bits, t.clip_val) == ("ternarybert", 8, "sym", 8, 10.0)
    t2 = _cfg("T2:2.5")
    assert (t2.weight_bits, t2.weight_method, t2.clip_val) == (2, "twn", 2.5) and t2.ternary_linear == "tensor"
    t2r = _cfg("T2r:10")
    assert (t2r.weight_method, t2r.clip_val, t2r.ternary_linear, t2r.linear_rowwise) == ("twn", 10.0, "row", True)
    i = _cfg("8:gelu@32")
    assert (i.quant_mode, i.weight_bits, i.force_dequant, i.ln_var_bits) == ("symmetric", 8, "gelu", 32)
    assert _cfg("7").ln_var_bits == QuantConfig().ln_var_bits == 52 and _cfg("7").force_dequant == "none"


@pytest.mark.parametrize("spec", ["T4:1", "Tx", "T8r:10", "8:bogus", "eight", "8@x"])
def test_bad_variant_is_one_error_line(spec):
    with pytest.raises(SystemExit, match="error: variant"):
        abl.parse_variant(spec)


def test_missing_checkpoint_is_an_error_not_a_traceback(tmp_path, capsys):
    rc = abl.main(["--checkpoint", str(tmp_path / "none.pt"), "--train-file", str(tmp_path / "t.json"),
                   "--variants", "fp"])
    assert rc == 2 and capsys.readouterr().err.startswith("error: ")


def test_a_file_that_is_not_a_checkpoint_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    train = tmp_path / "t.json"
    train.write_text('{"version": "1.1", "data": []}')
    rc = abl.main(["--checkpoint", str(bad), "--train-file", str(train), "--variants", "fp"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
