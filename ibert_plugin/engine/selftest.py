"""Start-up self-test of the integer GEMM routes and the fused attention kernel on this CPU.

Each route is checked against an exact int64 reference on adversarial operands (all activations at the u8 extreme
times all weights at the route's extreme, K = 3072, where AVX2 ``vpmaddubsw`` saturation shows first) and on random
full-range data. The fast routes (fbgemm acc32 and ORT u8s8) are exact on AVX2 only for ``|w| <= 64``, fbgemm acc16
only for ternary weights; a route that fails (or an fbgemm extension that cannot be built) is not used, and the
engine falls back to the next exact route and says so. ``fbgemm8`` (fbgemm acc32 on full-range 8-bit weights) is
checked with all-255 activations times +-127 weights at K = 3072 plus random full-range operands: it passes on
AVX-512 VNNI CPUs (``vpdpbusd`` accumulates in int32) and fails on AVX2 ones, which keep full 8-bit weights on u8u8.
The fused ``attention_u8`` kernel (the engine's only attention path) is checked against int64 arithmetic; the engine
refuses to run when it or the exact ``u8u8`` route fails.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import gemm

logger = logging.getLogger(__name__)


@dataclass
class SelfTestResult:
    ok: Dict[str, bool] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def fast_ok(self) -> bool:
        return bool(self.fast_routes)

    @property
    def fast_routes(self) -> tuple:
        """Fast linear routes that passed (``fbgemm8`` included), for :func:`gemm.route_for`'s ``allowed``."""
        return tuple(r for r in gemm.FAST_ROUTES + gemm.FULL_RANGE_ROUTES if self.ok.get(r, False))

    @property
    def exact_ok(self) -> bool:
        return self.ok.get("u8u8", False) and self.ok.get("attention", False)

    def summary(self) -> str:
        s = ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in self.ok.items())
        return s + ("" if not self.notes else " (" + "; ".join(self.notes) + ")")


def _ref(x_s8: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x_s8.to(torch.int64) @ w.to(torch.int64).t())


def _check_linear(route: str, w_max: int, K: int, N: int, gen: torch.Generator, threads: Optional[int]) -> bool:
    """Weights in [-w_max, w_max] (w_max = 128 means the full s8 range [-128, 127])."""
    w_hi, w_lo = min(w_max, 127), -w_max
    ok = True
    cases = []
    # adversarial: all-255 u8 activations (x = 127) and all -128 u8 (x = -128) times all +-w_max weights
    for xv in (127, -128):
        for wv in (w_hi, w_lo):
            cases.append((torch.full((4, K), xv, dtype=torch.int64), torch.full((N, K), wv, dtype=torch.int64)))
    # alternating signs inside pairs, and random full range
    x = torch.full((4, K), 127, dtype=torch.int64)
    w = torch.full((N, K), w_hi, dtype=torch.int64)
    w[:, 1::2] = w_lo
    cases.append((x, w))
    cases.append((torch.randint(-128, 128, (37, K), generator=gen),
                  torch.randint(w_lo, w_hi + 1, (N, K), generator=gen)))
    for x, w in cases:
        try:
            g = gemm.make_linear(w, route, threads=threads)
        except (ValueError, RuntimeError) as e:  # e.g. the acc16 blocking is AVX2-only
            logger.info("self-test: route %s unavailable: %s", route, e)
            return False
        y = g(gemm.s8_to_u8(x)).to(torch.int64) + g.zp_correction  # the bias fold the engine applies
        if not torch.equal(y, _ref(x, w)):
            ok = False
            break
    return ok


def _requant8(z: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """int64 ``clamp(floor((z m + 2^(e-1)) / 2^e), -127, 127)``: the kernel's q/k/v and attn_act requantization."""
    return ((z * m + (torch.ones_like(e) << (e - 1))) >> e).clamp(-127, 127)


def _check_attention(gen: torch.Generator, threads: Optional[int]) -> bool:
    """The fused ``attention_u8`` kernel (the engine's whole self-attention) against int64 arithmetic.

    Its SIMD parts are what can differ between CPUs: the q/k/v requantization, ``q k^T`` and ``p v`` (16-bit pair
    multiply-adds into int32). Checked on saturated operands (q, k, v all at +-127: the largest scores and contexts,
    ``head_dim 127^2`` and ``T 255 127``) and on random ones, T = 130 (past the 128-lane tiles, odd pairs), with a
    padded batch row and enough work for the 2-thread path. Scores are checked through the probabilities: the
    kernel's ``p`` must equal ``softmax_u8`` of the int64 scores (the same i-softmax rows, run on exact scores), and
    its context output the int64 ``p v`` requantized.
    """
    from ..quant.nonlinear import exp_lut
    from . import kernels

    try:
        K = kernels.load()
    except Exception as e:  # noqa: BLE001  (a kernel that does not build is a failed self-test, said in the log)
        logger.error("self-test: attention kernel unavailable: %s", e)
        return False
    B, H, T, dh = 2, 2, 130, 64
    D = H * dh
    lut = exp_lut(torch.tensor([3.1e-4]))
    pad = torch.zeros(B, T, dtype=torch.uint8)
    pad[1, T - 37:] = 1
    m = torch.randint(2 ** 19, 2 ** 20, (3 * D,), generator=gen)
    e = torch.randint(27, 31, (3 * D,), generator=gen)
    bias = torch.randint(-1000, 1000, (3 * D,), generator=gen)
    ctx_m, ctx_e = 2 ** 19 + 12345, 31
    sat = torch.where(torch.arange(B * T)[:, None] % 3 == 0, -1, 1) * torch.ones(1, 3 * D, dtype=torch.int64)
    sat[:, 1::2] *= -1
    ok = True
    for acc in ((sat * 2 ** 30).to(torch.int32),
                torch.randint(-2 ** 16, 2 ** 16, (B * T, 3 * D), generator=gen, dtype=torch.int32)):
        out = torch.empty(B * T, D, dtype=torch.uint8)
        q_u8, k_u8, v_u8 = (torch.empty(B, H, T, dh, dtype=torch.uint8) for _ in range(3))
        p_u8 = torch.empty(B, H, T, T, dtype=torch.uint8)
        n0 = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)
            K.attention_u8(acc, bias, m, e, 127, B, T, H, pad, lut, ctx_m, ctx_e, out, q_u8, k_u8, v_u8, p_u8)
        finally:
            torch.set_num_threads(n0)
        qkv = _requant8(acc.to(torch.int64) + bias, m, e).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-1, -2)
        p_ref = torch.empty_like(p_u8)
        K.softmax_u8(scores.to(torch.int32).contiguous(), pad, lut, p_ref)
        ctx = (p_u8.to(torch.int64) @ v).permute(0, 2, 1, 3).reshape(B * T, D)
        want = _requant8(ctx, torch.tensor(ctx_m), torch.tensor(ctx_e)) + 128
        ok &= all(torch.equal(got.to(torch.int64) - 128, ref) for got, ref in ((q_u8, q), (k_u8, k), (v_u8, v)))
        ok &= torch.equal(p_u8, p_ref) and torch.equal(out.to(torch.int64), want)
    return bool(ok)


_CACHE: Dict[Optional[int], SelfTestResult] = {}


def run(threads: Optional[int] = None, K: int = 3072, force: bool = False) -> SelfTestResult:
    """Run (once per thread count, cached) the GEMM self-test."""
    if not force and threads in _CACHE:
        return _CACHE[threads]
    gen = torch.Generator().manual_seed(1234)
    res = SelfTestResult()
    res.ok["u8u8"] = _check_linear("u8u8", 128, K, 64, gen, threads) and _check_linear("u8u8", 127, 768, 48, gen,
                                                                                        threads)
    # fast route: 7-bit weights (|w| <= 63, and the +-64 edge) and ternary
    res.ok["u8s8"] = (_check_linear("u8s8", 63, K, 64, gen, threads) and _check_linear("u8s8", 64, K, 32, gen, threads)
                      and _check_linear("u8s8", 1, K, 32, gen, threads))
    from . import kernels

    if kernels.load_fbgemm() is not None:
        res.ok["fbgemm"] = (_check_linear("fbgemm", 64, K, 64, gen, threads)
                            and _check_linear("fbgemm", 63, 768, 40, gen, threads)
                            and _check_linear("fbgemm", 1, K, 32, gen, threads))
        res.ok["fbgemm16"] = (_check_linear("fbgemm16", 1, K, 64, gen, threads)
                              and _check_linear("fbgemm16", 1, 768, 40, gen, threads))
        # full-range 8-bit weights: all-255 activations times +-127 weights at K, alternating pairs, random
        res.ok["fbgemm8"] = (_check_linear("fbgemm8", 127, K, 64, gen, threads)
                             and _check_linear("fbgemm8", 128, 768, 40, gen, threads))
    else:
        res.ok["fbgemm"] = res.ok["fbgemm16"] = res.ok["fbgemm8"] = False
        res.notes.append(f"fbgemm extension unavailable ({kernels.fbgemm_error()}): using ORT routes")
        logger.warning("ibert engine self-test: %s", res.notes[-1])
    res.ok["attention"] = _check_attention(gen, threads)
    if not res.fast_ok:
        res.notes.append("fast routes are not exact on this CPU: falling back to the exact u8u8 route")
        logger.warning("ibert engine self-test: %s", res.notes[-1])
    if not res.exact_ok:
        res.notes.append("exact u8u8 route / fused attention kernel FAILED: integer engine results are not trustworthy")
        logger.error("ibert engine self-test: %s", res.notes[-1])
    _CACHE[threads] = res
    return res


if __name__ == "__main__":  # pragma: no cover
    print("GEMM self-test:", run(force=True).summary())
