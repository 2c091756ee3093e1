"""Packed format: bit packing, exact round trip through the frozen path, weights_only loading, CLI errors."""
import pytest
import torch
from torch import nn

from ibert_plugin.quant.config import QuantConfig
from ibert_plugin.quant.packing import (
    FrozenWeightQuantizer,
    collect_quantized_weights,
    freeze_weight_quantizers,
    pack_model,
    pack_ternary,
    saved_bytes,
    unpack,
    unpack_ternary,
)
from ibert_plugin.quant.ternary import LATWeightQuantizer, TWNWeightQuantizer
from ibert_plugin.quant.weight import WeightQuantizer

Cfg = QuantConfig  # defaults: clip 2.5, LAT beta2/eps of fairseq's Adam


class Int8RowQuantizer(WeightQuantizer):
    """Minimal per-row symmetric 8-bit quantizer for the round-trip test (``S = max|w| / 127``)."""

    bits = 8

    def forward(self, weight):
        s = weight.detach().abs().amax(dim=1).clamp(min=1e-8) / 127
        return torch.round(weight.detach() / s[:, None]), s.float()


class QLinear(nn.Module):
    def __init__(self, i, o, quantizer):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) * 0.3)
        self.bias = nn.Parameter(torch.randn(o) * 0.1)
        self.weight_quantizer = quantizer

    def forward(self, x):
        w_int, s = self.weight_quantizer(self.weight)
        return x @ (w_int * s[:, None]).t() + self.bias


class Toy(nn.Module):
    def __init__(self, lat=False):
        super().__init__()
        self.embed = nn.Embedding(37, 8)
        self.embed.weight.data[5] = 0.0  # an all-zero row: alpha 0
        self.embed.weight_quantizer = TWNWeightQuantizer(Cfg(), rowwise=True)
        self.pos = nn.Parameter(torch.randn(6, 8))
        self.fc1 = QLinear(8, 16, LATWeightQuantizer(Cfg()) if lat else TWNWeightQuantizer(Cfg()))
        self.fc2 = QLinear(16, 8, Int8RowQuantizer())
        self.ln = nn.LayerNorm(8)
        self.register_buffer("act_max", torch.tensor([1.7]))
        self.register_buffer("shift", torch.tensor([3], dtype=torch.int64))
        self.head = nn.Linear(8, 37, bias=False)
        self.head.weight = self.embed.weight  # tied, like RoBERTa's LM head

    def forward(self, tokens):
        w_int, s = self.embed.weight_quantizer(self.embed.weight)
        emb = w_int * s[:, None]
        x = emb[tokens] + self.pos[: tokens.shape[1]]
        x = torch.clamp(self.fc2(torch.relu(self.fc1(self.ln(x)))), -self.act_max, self.act_max)
        # the tied head reads the *quantized* embedding (a reader of the latent weight would see w_int * alpha)
        return nn.functional.linear(x, emb)


@pytest.mark.parametrize("encoding", ["ternary2", "base3"])
@pytest.mark.parametrize("n", [1, 4, 5, 7, 33])
def test_ternary_bit_packing_round_trip(encoding, n):
    g = torch.Generator().manual_seed(n)
    w = torch.randint(-1, 2, (n,), generator=g).float()
    data = pack_ternary(w, encoding)
    assert data.dtype == torch.uint8
    assert data.numel() == (-(-n // 4) if encoding == "ternary2" else -(-n // 5))
    assert torch.equal(unpack_ternary(data, n, encoding), w)


def test_ternary2_code_layout_is_documented_one():
    w = torch.tensor([0.0, 1.0, -1.0, 1.0, -1.0])
    data = pack_ternary(w)
    assert data.tolist() == [0b01_10_01_00, 0b10]
    assert pack_ternary(torch.tensor([-1.0, 0, 1, 1, 0]), "base3").tolist() == [0 + 3 + 18 + 54 + 81]


@pytest.mark.parametrize("lat", [False, True])
def test_pack_unpack_is_exact_through_frozen_quantizers(tmp_path, lat):
    torch.manual_seed(0)
    model = Toy(lat=lat)
    if lat:  # give LAT some curvature so it is not TWN
        model(torch.randint(0, 37, (2, 6))).pow(2).sum().backward()
        assert int(model.fc1.weight_quantizer.lat_steps) == 1
    model.eval()
    tokens = torch.randint(0, 37, (3, 6))
    with torch.no_grad():
        ref = model(tokens)
    packed = pack_model(model, cfg={"model": {"arch": "toy"}})
    path = tmp_path / "toy.packed.pt"
    torch.save(packed, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    q = loaded["quantized"]
    assert q["embed.weight"]["encoding"] == "ternary2" and q["embed.weight"]["scale"].shape == (37,)
    assert q["fc1.weight"]["encoding"] == "ternary2" and q["fc1.weight"]["scale"].shape == (1,)
    assert q["fc2.weight"]["encoding"] == "int8" and q["fc2.weight"]["data"].dtype == torch.int8
    assert loaded["tied"] == {"head.weight": "embed.weight"}
    assert ("fc1.weight_quantizer.lat_v" in loaded["dropped"]) == lat
    assert loaded["tensors"]["shift"].dtype == torch.int64

    sd = unpack(loaded)
    fresh = Toy(lat=lat)
    freeze_weight_quantizers(fresh, loaded["quantized"])
    assert isinstance(fresh.fc1.weight_quantizer, FrozenWeightQuantizer)
    fresh.load_state_dict(sd, strict=True)
    fresh.eval()
    with torch.no_grad():
        out = fresh(tokens)
    assert torch.equal(out, ref)  # atol = 0
    for name, (qname, w_int, scale, _) in collect_quantized_weights(model).items():
        w2, s2 = fresh.get_submodule(qname)(fresh.get_parameter(name))
        assert torch.equal(w2, w_int) and torch.equal(s2, scale)


def test_packed_is_smaller_and_fp16_flag(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    model.embed = nn.Embedding(4000, 64)
    model.embed.weight_quantizer = TWNWeightQuantizer(Cfg(), rowwise=True)
    model.head.weight = model.embed.weight
    model.pos = nn.Parameter(torch.randn(64, 64))
    fp32 = saved_bytes(model.state_dict())
    p32 = saved_bytes(pack_model(model))
    p16 = pack_model(model, float16=True)
    assert p16["tensors"]["pos"].dtype == torch.float16 and p16["tensors"]["act_max"].dtype == torch.float32
    b3 = saved_bytes(pack_model(model, ternary_encoding="base3"))
    assert saved_bytes(p16) < p32 and b3 < p32 < fp32 / 8


def test_not_quantized_model_is_rejected():
    with pytest.raises(ValueError, match="not a quantized model"):
        pack_model(nn.Linear(3, 3))


def _export(capsys, *args):
    from ibert_plugin.export import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_export_cli_missing_file(tmp_path, capsys):
    rc, out, err = _export(capsys, "--checkpoint", tmp_path / "nope.pt", "--output", tmp_path / "o.pt")
    assert rc == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: checkpoint not found")


def _foreign_files(tmp_path):
    """A truncated file, a torch file that is not a fairseq checkpoint, a torch file pickling an arbitrary class."""
    import pathlib

    files = {}
    files["corrupt"] = tmp_path / "corrupt.pt"
    files["corrupt"].write_bytes(b"PK\x03\x04 truncated zip, not a checkpoint")
    files["state_dict"] = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, files["state_dict"])
    files["pickle"] = tmp_path / "object.pt"
    torch.save({"model": {}, "args": pathlib.PurePosixPath("x")}, files["pickle"])
    return files


def test_export_cli_corrupt_or_foreign_checkpoint(tmp_path, capsys):
    for kind, bad in _foreign_files(tmp_path).items():
        rc, out, err = _export(capsys, "--checkpoint", bad, "--output", tmp_path / "o.pt")
        assert rc == 2 and err.strip().count("\n") == 0, (kind, err)
        assert err.startswith(f"error: {bad} is not a valid checkpoint"), (kind, err)
        assert "weights_only" not in err and "Traceback" not in err
        if kind == "pickle":
            assert "pathlib.PurePosixPath" in err
    assert not (tmp_path / "o.pt").exists()


def test_export_module_corrupt_file_is_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    p = subprocess.run([sys.executable, "-m", "ibert_plugin.export", "--checkpoint", str(bad), "--output",
                        str(tmp_path / "o.pt")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: {bad} is not a valid checkpoint (a text file starting "
                                             "'not a checkpoint'; a torch checkpoint is a zip archive written by "
                                             "torch.save)"], p.stderr
