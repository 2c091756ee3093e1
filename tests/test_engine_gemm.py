"""GEMM routes (fbgemm extension, ORT MatMulInteger) and the start-up self-test.

The fbgemm tests skip where the extension does not build (the engine then falls back to ORT), except under
``IBERT_REQUIRE_FBGEMM=1`` (set by ``.ci/run``), where a missing extension fails them.
"""
import sys
from pathlib import Path

import pytest
import torch

from ibert_plugin.engine import gemm, kernels, selftest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_helpers as mh  # noqa: E402


def _fbgemm_or_skip():
    mod = kernels.load_fbgemm()
    if mod is None:
        why = f"fbgemm extension unavailable ({kernels.fbgemm_error()})"
        if gemm.fbgemm_required():
            pytest.fail(f"{gemm.REQUIRE_FBGEMM_ENV}=1 but {why}")
        pytest.skip(why)
    return mod


@pytest.fixture
def fbgemm():
    """The fbgemm extension; where it does not build, a failure under ``IBERT_REQUIRE_FBGEMM=1``, else a skip."""
    return _fbgemm_or_skip()


@pytest.mark.parametrize("env,outcome", [("1", pytest.fail.Exception), ("", pytest.skip.Exception),
                                         ("0", pytest.skip.Exception)])
def test_missing_fbgemm_fails_only_when_required(monkeypatch, env, outcome):
    monkeypatch.setenv(gemm.REQUIRE_FBGEMM_ENV, env)
    monkeypatch.setattr(kernels, "load_fbgemm", lambda verbose=False: None)
    with pytest.raises(outcome, match="fbgemm extension unavailable"):
        _fbgemm_or_skip()


def _ref(x, w):
    return x.to(torch.int64) @ w.to(torch.int64).t()


def test_selftest_exact_routes_pass():
    r = selftest.run(threads=1)
    assert r.ok["u8u8"] and r.ok["attention"] and r.exact_ok, r.summary()
    # AVX2 (with or without VNNI) is exact on the fast routes for |w| <= 64
    assert r.ok["u8s8"] and r.fast_ok, r.summary()
    if kernels.load_fbgemm() is not None or gemm.fbgemm_required():
        assert r.ok["fbgemm"], r.summary()
        assert r.fast_routes[0] in ("fbgemm16", "fbgemm")


ROUTE_CASES = [("u8u8", -128, 127), ("u8s8", -63, 63), ("u8s8", -1, 1), ("fbgemm", -64, 64), ("fbgemm", -1, 1)]


def _exact(lin, x, out=None):
    """The engine's view of a route: raw accumulators plus the zero-point correction folded into the bias."""
    y = lin(gemm.s8_to_u8(x), out=out)
    return y, y.to(torch.int64) + lin.zp_correction


@pytest.mark.parametrize("route,lo,hi", ROUTE_CASES)
def test_linear_routes_exact_random_and_adversarial(route, lo, hi, request):
    if route in gemm.FBGEMM_ROUTES:
        request.getfixturevalue("fbgemm")
    g = torch.Generator().manual_seed(0)
    K, N = 3072, 40
    w = torch.randint(lo, hi + 1, (N, K), generator=g)
    x = torch.randint(-128, 128, (9, K), generator=g)
    lin = gemm.make_linear(w, route, threads=1)
    assert torch.equal(_exact(lin, x)[1], _ref(x, w))
    for xv, wv in ((127, hi), (127, lo), (-128, lo)):
        x = torch.full((3, K), xv)
        w = torch.full((N, K), wv)
        lin = gemm.make_linear(w, route, threads=2)
        out = torch.empty(3, N, dtype=torch.int32)
        y, y_exact = _exact(lin, x, out=out)
        assert y is out
        assert torch.equal(y_exact, _ref(x, w))


def test_fbgemm_acc16_ternary_exact_and_large_m(fbgemm):
    """int16 accumulation over K blocks of 128: exact for ternary weights at the u8 extremes and at batch-8 M.

    The acc16 blocking is AVX2-only: on AVX-512 the route refuses to pack and the self-test keeps the engine off it.
    """
    if fbgemm.has_avx512():
        with pytest.raises(RuntimeError, match="AVX2"):
            gemm.make_linear(torch.ones(64, 128, dtype=torch.int64), "fbgemm16")
        assert not selftest.run(threads=1).ok["fbgemm16"]
        return
    g = torch.Generator().manual_seed(5)
    for M, K, N in ((1024, 768, 96), (5, 3072, 33)):
        w = torch.randint(-1, 2, (N, K), generator=g)
        x = torch.randint(-128, 128, (M, K), generator=g)
        lin = gemm.make_linear(w, "fbgemm16")
        assert torch.equal(_exact(lin, x)[1], _ref(x, w))
        for xv, wv in ((127, 1), (127, -1), (-128, 1)):
            lin = gemm.make_linear(torch.full((N, K), wv), "fbgemm16")
            x, w = torch.full((M, K), xv), torch.full((N, K), wv)
            assert torch.equal(_exact(lin, x)[1], _ref(x, w))
    assert gemm.make_linear(torch.ones(768, 768, dtype=torch.int64), "fbgemm16").weight_bytes == 768 * 768


def test_fbgemm_packed_panel_one_byte_per_weight(fbgemm):
    """On AVX2 (roberta shapes are multiples of its blocking); AVX-512 blocking pads the panel by at most a third."""
    for N, K in ((2304, 768), (768, 3072)):
        nbytes = gemm.make_linear(torch.ones(N, K, dtype=torch.int64), "fbgemm").weight_bytes
        if fbgemm.has_avx512():
            assert N * K <= nbytes <= N * K * 4 // 3
        else:
            assert nbytes == N * K


def test_fbgemm_guards(fbgemm):
    with pytest.raises(ValueError, match="not allowed"):
        gemm.make_linear(torch.tensor([[65, 0]]), "fbgemm")
    with pytest.raises(ValueError, match="not allowed"):
        gemm.make_linear(torch.tensor([[2, 0]]), "fbgemm16")
    with pytest.raises(ValueError, match="not allowed"):
        gemm.make_linear(torch.tensor([[128, 0]]), "fbgemm8")
    with pytest.raises(ValueError, match="unknown ORT"):
        gemm.LinearGemm(torch.tensor([[1, 0]]), "fbgemm")


def test_fbgemm8_exact_where_the_selftest_passes(fbgemm):
    """Full-range 8-bit weights on fbgemm acc32: exact on VNNI CPUs (int32 ``vpdpbusd``); on the others int16 pair
    saturation (255 * 127 * 2 > 32767) makes the self-test reject the route."""
    r = selftest.run(threads=1)
    assert r.ok["fbgemm8"] == bool(fbgemm.has_vnni()), r.summary()
    if not r.ok["fbgemm8"]:
        assert "fbgemm8" not in r.fast_routes
        return
    assert "fbgemm8" in r.fast_routes
    g = torch.Generator().manual_seed(8)
    K, N = 3072, 48
    w = torch.randint(-127, 128, (N, K), generator=g)
    x = torch.randint(-128, 128, (17, K), generator=g)
    assert torch.equal(_exact(gemm.make_linear(w, "fbgemm8"), x)[1], _ref(x, w))
    for xv, wv in ((127, 127), (127, -127), (-128, 127), (-128, -127)):
        x, w = torch.full((3, K), xv), torch.full((N, K), wv)
        assert torch.equal(_exact(gemm.make_linear(w, "fbgemm8"), x)[1], _ref(x, w))


def _injected(**ok):
    base = dict(u8u8=True, u8s8=True, fbgemm=True, fbgemm16=True, fbgemm8=False, attention=True)
    return selftest.SelfTestResult(ok=dict(base, **ok))


def test_route_selection_follows_the_selftest_result():
    w8, w7, w2 = torch.tensor([[127, -127, 5]]), torch.tensor([[64, -63]]), torch.tensor([[1, -1, 0]])
    vnni = _injected(fbgemm16=False, fbgemm8=True)  # an AVX-512 VNNI CPU: no acc16 blocking, full-range acc32 exact
    assert vnni.fast_routes == ("fbgemm", "u8s8", "fbgemm8")
    assert [gemm.route_for(w, allowed=vnni.fast_routes) for w in (w8, w7, w2)] == ["fbgemm8", "fbgemm", "fbgemm"]
    avx2 = _injected()  # AVX2 without VNNI: full 8-bit weights stay on the exact u8u8 route
    assert [gemm.route_for(w, allowed=avx2.fast_routes) for w in (w8, w7, w2)] == ["u8u8", "fbgemm", "fbgemm16"]
    no_fbgemm = _injected(fbgemm=False, fbgemm16=False)
    assert [gemm.route_for(w, allowed=no_fbgemm.fast_routes) for w in (w8, w7, w2)] == ["u8u8", "u8s8", "u8s8"]


@pytest.mark.parametrize("fbgemm8_ok", [True, False])
def test_engine_takes_fbgemm8_for_8bit_weights_only_where_the_selftest_passed(monkeypatch, fbgemm8_ok, request):
    """The self-test's result injected into the engine; where the real self-test passes, also bit-exact."""
    from ibert_plugin.engine import convert, qat_compare

    if fbgemm8_ok:
        request.getfixturevalue("fbgemm")
    real = selftest.run(threads=1)
    monkeypatch.setattr(selftest, "run", lambda threads=None, **kw: selftest.SelfTestResult(
        ok=dict(real.ok, fbgemm8=fbgemm8_ok)))
    d = mh.make_dictionary()
    model = mh.build_model("ibert_roberta", d, extra=mh.TINY_DIMS + ["--quant-mode", "symmetric", "--weight-bits", "8"])
    mh.calibrate(model, mh.wide_batches(d, 1))
    eng = convert.from_model(model, threads=1)
    assert {r for lay in eng.routes for r in lay.values()} == {"fbgemm8" if fbgemm8_ok else "u8u8"}
    if not fbgemm8_ok or real.ok["fbgemm8"]:
        _, bad, _ = qat_compare.compare(eng, model, mh.random_batch(d, bsz=3, tgt_len=20, seed=2))
        assert not bad, bad


def test_route_choice_and_guard():
    assert gemm.route_for(torch.tensor([[63, -63]])) == "fbgemm"
    assert gemm.route_for(torch.tensor([[1, -1, 0]])) == "fbgemm16"
    assert gemm.route_for(torch.tensor([[1, -1, 0]]), allowed=("fbgemm", "u8s8")) == "fbgemm"
    assert gemm.route_for(torch.tensor([[63, -63]]), allowed=("u8s8",)) == "u8s8"
    assert gemm.route_for(torch.tensor([[63, -63]]), allowed=()) == "u8u8"
    assert gemm.route_for(torch.tensor([[127, -3]])) == "u8u8"
    assert gemm.route_for(torch.tensor([[127, -3]]), allowed=("fbgemm8",)) == "fbgemm8"
    assert gemm.route_for(torch.tensor([[63, -3]]), allowed=("fbgemm8", "fbgemm")) == "fbgemm"
    assert gemm.route_for(torch.tensor([[3, -3]]), allow_fast=False) == "u8u8"
    with pytest.raises(ValueError):
        gemm.LinearGemm(torch.tensor([[100, 0]]), "u8s8")


class _CorruptAttention:
    """The real kernel module with one wrong bit in ``attention_u8``'s chosen output (what a miscompiled SIMD path
    or a CPU the kernel's assumptions do not hold on would give)."""

    def __init__(self, real, which):
        self._real, self._which = real, which

    def __getattr__(self, name):
        return getattr(self._real, name)

    def attention_u8(self, *args):
        self._real.attention_u8(*args)
        t = {"out": args[12], "p": args[16], "k": args[14]}[self._which]
        t.view(-1)[t.numel() // 2] ^= 1


@pytest.mark.parametrize("which", ["out", "p", "k"])
def test_selftest_attention_check_fails_on_a_wrong_kernel(monkeypatch, which):
    """The attention self-test compares against int64 arithmetic: one flipped bit in the context, the
    probabilities or the keys fails it, and the engine then refuses to run."""
    from ibert_plugin.engine import EngineError, convert

    real = kernels.load()
    monkeypatch.setattr(selftest, "_CACHE", {})  # restored afterwards: later tests see the real kernel's result
    monkeypatch.setattr(kernels, "load", lambda verbose=False: _CorruptAttention(real, which))
    r = selftest.run(threads=1, force=True)
    assert r.ok["u8u8"] and not r.ok["attention"] and not r.exact_ok, r.summary()
    assert "attention kernel FAILED" in r.summary()
    d = mh.make_dictionary()
    model = mh.build_model("ibert_roberta", d, extra=mh.TINY_DIMS + ["--quant-mode", "symmetric"])
    mh.calibrate(model, mh.wide_batches(d, 1))
    with pytest.raises(EngineError, match="self-test failed"):
        convert.from_model(model, threads=1)
