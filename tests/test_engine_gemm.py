"""GEMM routes (ORT MatMulInteger) and the start-up self-test."""
import pytest
import torch

from ibert_plugin.engine import gemm, selftest


def _ref(x, w):
    return x.to(torch.int64) @ w.to(torch.int64).t()


def test_selftest_exact_routes_pass():
    r = selftest.run(threads=1)
    assert r.ok["u8u8"] and r.ok["attn_qk"] and r.ok["attn_pv"], r.summary()
    # AVX2 (with or without VNNI) is exact on the fast route for |w| <= 64
    assert "u8s8" in r.ok


@pytest.mark.parametrize("route,lo,hi", [("u8u8", -128, 127), ("u8s8", -63, 63), ("u8s8", -1, 1)])
def test_linear_routes_exact_random_and_adversarial(route, lo, hi):
    g = torch.Generator().manual_seed(0)
    K, N = 3072, 40
    w = torch.randint(lo, hi + 1, (N, K), generator=g)
    x = torch.randint(-128, 128, (9, K), generator=g)
    lin = gemm.LinearGemm(w, route, threads=1)
    assert torch.equal(lin(gemm.s8_to_u8(x)).to(torch.int64), _ref(x, w))
    x = torch.full((3, K), 127)
    w = torch.full((N, K), hi)
    lin = gemm.LinearGemm(w, route, threads=2)
    out = torch.empty(3, N, dtype=torch.int32)
    assert lin(gemm.s8_to_u8(x), out=out) is out
    assert torch.equal(out.to(torch.int64), _ref(x, w))


def test_route_choice_and_guard():
    assert gemm.route_for(torch.tensor([[63, -63]])) == "u8s8"
    assert gemm.route_for(torch.tensor([[1, -1, 0]])) == "u8s8"
    assert gemm.route_for(torch.tensor([[127, -3]])) == "u8u8"
    assert gemm.route_for(torch.tensor([[3, -3]]), allow_fast=False) == "u8u8"
    with pytest.raises(ValueError):
        gemm.LinearGemm(torch.tensor([[100, 0]]), "u8s8")


def test_batched_attention_exact():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-128, 128, (2, 3, 17, 8), generator=g)
    k = torch.randint(-128, 128, (2, 3, 8, 17), generator=g)
    p = torch.randint(0, 256, (2, 3, 17, 17), generator=g)
    y = gemm.BatchedGemm(128, threads=1)(gemm.s8_to_u8(q), gemm.s8_to_u8(k))
    assert torch.equal(y.to(torch.int64), q @ k)
    y = gemm.BatchedGemm(0, threads=1)(p.to(torch.uint8), gemm.s8_to_u8(k.transpose(-1, -2).contiguous()))
    assert torch.equal(y.to(torch.int64), p @ k.transpose(-1, -2))
