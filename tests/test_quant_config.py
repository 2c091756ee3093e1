"""QuantConfig: validation, derived properties, fairseq-namespace parsing."""
import argparse

import pytest

from ibert_plugin.quant.config import QuantConfig


def test_defaults_are_ibert_bitwidths():
    c = QuantConfig()
    assert (c.act_bits, c.weight_bits, c.bias_bits, c.embed_bits, c.embed_act_bits) == (8, 8, 32, 8, 16)
    assert (c.residual_bits, c.softmax_out_bits, c.act_momentum, c.clip_val) == (22, 8, 0.95, 2.5)
    assert c.quant_mode == "none" and c.weight_method == "sym" and c.weight_per_channel
    assert c.act_range == "symmetric" and c.ternary_embedding == "row" and c.ternary_linear == "tensor"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight_bits=9), "weight_bits must be between 2 and 8, got 9"),
        (dict(weight_bits=1), "weight_bits must be between 2 and 8, got 1"),
        (dict(quant_mode="asymmetric"), "quant_mode must be one of"),
        (dict(force_dequant="relu"), "force_dequant must be one of"),
        (dict(weight_method="twn"), "needs weight_bits=2, got 8"),
        (dict(weight_method="lat", weight_bits=4), "needs weight_bits=2, got 4"),
        (dict(weight_method="xnor"), "weight_method must be one of"),
        (dict(act_bits=0), "act_bits must be between"),
        (dict(bias_bits=33), "bias_bits must be between"),
        (dict(residual_bits=25), "residual_bits must be between"),
        (dict(act_momentum=1.0), "act_momentum"),
        (dict(clip_val=0.0), "clip_val must be a positive number"),
        (dict(lat_beta2=0.0), "lat_beta2 must be in"),
        (dict(lat_beta2=1.0), "lat_beta2 must be in"),
        (dict(lat_eps=0.0), "lat_eps must be a positive number"),
        (dict(lat_iters=0), "lat_iters must be between"),
        (dict(act_range="percentile"), "act_range must be one of"),
        (dict(ternary_embedding="column"), "ternary_embedding must be one of"),
        (dict(ternary_linear="channel"), "ternary_linear must be one of"),
        (dict(weight_bits=8.0), "weight_bits must be between 2 and 8"),
    ],
)
def test_invalid_fields_raise_one_clear_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_frozen_and_replace_validates():
    c = QuantConfig(quant_mode="symmetric")
    with pytest.raises(Exception):
        c.weight_bits = 4  # frozen dataclass
    assert c.replace(weight_bits=4).weight_bits == 4
    with pytest.raises(ValueError):
        c.replace(weight_bits=12)
    assert hash(c) == hash(QuantConfig(quant_mode="symmetric"))


@pytest.mark.parametrize(
    "mode, fd, gelu, softmax, ln",
    [
        ("symmetric", "none", True, True, True),
        ("symmetric", "gelu", False, True, True),
        ("symmetric", "softmax", True, False, True),
        ("symmetric", "layernorm", True, True, False),
        ("symmetric", "nonlinear", False, False, False),
        ("none", "none", False, False, False),
        ("ternarybert", "none", False, False, False),
    ],
)
def test_integer_properties(mode, fd, gelu, softmax, ln):
    c = QuantConfig(quant_mode=mode, force_dequant=fd)
    assert (c.integer_gelu, c.integer_softmax, c.integer_layernorm) == (gelu, softmax, ln)


def test_from_namespace_reads_fairseq_names_and_defaults():
    ns = argparse.Namespace(quant_mode="ternarybert", force_dequant="none", weight_bits=2, weight_quant_method=None,
                            input_bits=8, clip_val=2.0, act_range="minmax", unrelated=1)
    c = QuantConfig.from_namespace(ns)
    assert (c.quant_mode, c.weight_bits, c.weight_method, c.clip_val, c.act_range) == (
        "ternarybert", 2, "twn", 2.0, "minmax")
    c = QuantConfig.from_namespace(argparse.Namespace(quant_mode="symmetric", weight_bits=7))
    assert c.weight_method == "sym" and c.weight_bits == 7 and c.act_bits == 8
    assert QuantConfig.from_namespace(argparse.Namespace()) == QuantConfig()
    c = QuantConfig.from_namespace(argparse.Namespace(weight_bits=2, weight_quant_method="lat", input_bits=6))
    assert c.weight_method == "lat" and c.act_bits == 6
    with pytest.raises(ValueError, match="needs weight_bits=2"):
        QuantConfig.from_namespace(argparse.Namespace(weight_bits=8, weight_quant_method="twn"))
    c = QuantConfig.from_namespace(argparse.Namespace(weight_bits=2, ternary_linear="row"))
    assert c.ternary_linear == "row" and c.linear_rowwise
    # the granularity only concerns the ternary methods: sym keeps its own per-channel switch
    assert not QuantConfig(weight_bits=8, ternary_linear="row").linear_rowwise


def test_presets_are_the_four_models():
    from ibert_plugin.quant import config as C

    assert (C.IBERT_W8A8.quant_mode, C.IBERT_W8A8.weight_bits, C.IBERT_W8A8.weight_method) == ("symmetric", 8, "sym")
    assert (C.IBERT_W7A8.quant_mode, C.IBERT_W7A8.weight_bits, C.IBERT_W7A8.weight_method) == ("symmetric", 7, "sym")
    assert C.IBERT_W8A8.integer_gelu and C.IBERT_W8A8.integer_softmax and C.IBERT_W8A8.integer_layernorm
    t = C.TERNARYBERT_W2A8
    assert (t.quant_mode, t.weight_bits, t.weight_method, t.act_bits) == ("ternarybert", 2, "twn", 8)
    assert not t.integer_gelu
    i = C.INT_TERNARY_W2
    assert (i.quant_mode, i.weight_bits, i.weight_method) == ("symmetric", 2, "twn") and i.integer_layernorm
    assert list(C.PRESETS.values()) == [C.IBERT_W8A8, C.IBERT_W7A8, C.TERNARYBERT_W2A8, C.INT_TERNARY_W2]
    with pytest.raises(Exception):  # frozen: a shared preset cannot be changed under another user
        C.IBERT_W8A8.weight_bits = 4


@pytest.mark.parametrize("name, changes", [
    ("IBERT_W8A8", {}), ("IBERT_W7A8", {}), ("TERNARYBERT_W2A8", {}), ("INT_TERNARY_W2", {}),
    ("TERNARYBERT_W2A8", dict(weight_method="lat", clip_val=10.0, act_bits=6, ternary_linear="row")),
    ("IBERT_W8A8", dict(force_dequant="gelu", ln_var_bits=32, nonlinear_constants="refit")),
])
def test_to_flags_parse_back_to_the_same_config_through_fairseq(name, changes):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import model_helpers as mh
    from ibert_plugin.quant.config import PRESETS

    cfg = PRESETS[name].replace(**changes)
    args = mh.parse_model_args("ibert_roberta", mh.TINY_DIMS + cfg.to_flags())
    assert QuantConfig.from_namespace(args) == cfg


def test_to_flags_spells_the_given_fields_in_their_order():
    import dataclasses

    from ibert_plugin.quant import config as C

    cfg = C.TERNARYBERT_W2A8.replace(weight_method="lat", clip_val=10.0, act_bits=6, ternary_linear="row")
    assert cfg.to_flags(["ternary_linear", "clip_val", "quant_mode"]) == [
        "--ternary-linear", "row", "--clip-val", "10", "--quant-mode", "ternarybert"]
    # a field at its default is spelled when asked for, and left out of the default spelling
    assert C.IBERT_W8A8.to_flags(["force_dequant", "act_bits"]) == ["--force-dequant", "none", "--input-bits", "8"]
    assert C.IBERT_W8A8.to_flags() == ["--quant-mode", "symmetric", "--weight-bits", "8",
                                       "--weight-quant-method", "sym"]
    assert set(C.MODEL_FLAGS) <= {f.name for f in dataclasses.fields(QuantConfig)}
    with pytest.raises(KeyError):
        cfg.to_flags(["lat_beta2"])  # an optimizer setting, not a model flag
