"""Start-up self-test of the integer GEMM routes on this CPU.

Each route is checked against an exact int64 reference on adversarial operands (all activations at the u8 extreme
times all weights at the route's extreme, K = 3072, where AVX2 ``vpmaddubsw`` saturation shows first) and on random
full-range data. The fast routes (fbgemm acc32 and ORT u8s8) are exact on AVX2 only for ``|w| <= 64``, fbgemm acc16
only for ternary weights; a route that fails (or an fbgemm extension that cannot be built) is not used, and the
engine falls back to the next exact route and says so. ``fbgemm8`` (fbgemm acc32 on full-range 8-bit weights) is
checked with all-255 activations times +-127 weights at K = 3072 plus random full-range operands: it passes on
AVX-512 VNNI CPUs (``vpdpbusd`` accumulates in int32) and fails on AVX2 ones, which keep full 8-bit weights on u8u8.
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
        return self.ok.get("u8u8", False) and self.ok.get("attn_qk", False) and self.ok.get("attn_pv", False)

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


def _check_attention(gen: torch.Generator, threads: Optional[int]) -> Dict[str, bool]:
    res = {}
    qk = gemm.BatchedGemm(128, threads=threads)
    pv = gemm.BatchedGemm(0, threads=threads)
    B, H, T, d = 2, 3, 128, 64
    # QK^T: s8 x s8 via u8 zp 128 both
    okq = True
    for q, k in ((torch.full((B, H, T, d), -128), torch.full((B, H, d, T), -128)),
                 (torch.full((B, H, T, d), 127), torch.full((B, H, d, T), -128)),
                 (torch.randint(-128, 128, (B, H, T, d), generator=gen), torch.randint(-128, 128, (B, H, d, T),
                                                                                       generator=gen))):
        y = qk(gemm.s8_to_u8(q), gemm.s8_to_u8(k))
        okq &= torch.equal(y.to(torch.int64), q.to(torch.int64) @ k.to(torch.int64))
    res["attn_qk"] = bool(okq)
    okp = True
    for p, v in ((torch.full((B, H, T, T), 255), torch.full((B, H, T, d), 127)),
                 (torch.full((B, H, T, T), 255), torch.full((B, H, T, d), -128)),
                 (torch.randint(0, 256, (B, H, T, T), generator=gen), torch.randint(-128, 128, (B, H, T, d),
                                                                                    generator=gen))):
        y = pv(p.to(torch.uint8).contiguous(), gemm.s8_to_u8(v))
        okp &= torch.equal(y.to(torch.int64), p.to(torch.int64) @ v.to(torch.int64))
    res["attn_pv"] = bool(okp)
    return res


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
    res.ok.update(_check_attention(gen, threads))
    if not res.fast_ok:
        res.notes.append("fast routes are not exact on this CPU: falling back to the exact u8u8 route")
        logger.warning("ibert engine self-test: %s", res.notes[-1])
    if not res.exact_ok:
        res.notes.append("exact u8u8 / attention routes FAILED: integer engine results are not trustworthy")
        logger.error("ibert engine self-test: %s", res.notes[-1])
    _CACHE[threads] = res
    return res


if __name__ == "__main__":  # pragma: no cover
    print("GEMM self-test:", run(force=True).summary())
