"""Integer GEMMs with int32 accumulators: fbgemm (in torch's OpenMP pool) and ONNX Runtime ``MatMulInteger``.

Linear routes, fastest first (``route_for`` picks the fastest one that is exact for the weight and passed the
start-up self-test on this CPU):

* ``fbgemm16`` (ternary, ``|w| <= 1``): fbgemm with int16 accumulation over K blocks of 128, then int32. Exact because
  a block sums at most 128 * 255 * 1 = 32640.
* ``fbgemm`` (``|w| <= 64``, 7-bit or ternary weights): fbgemm acc32 (u8 x s8 ``vpmaddubsw`` pairs, exact while
  255 * 64 * 2 <= 32767).
* ``u8s8`` (``|w| <= 64``, ORT): used when the fbgemm extension cannot be built here.
* ``fbgemm8`` (any 8-bit weight): fbgemm acc32 on full-range weights, exact only where u8 x s8 products accumulate in
  int32 without int16 pair saturation (AVX-512 VNNI ``vpdpbusd``); used only where the self-test's full-range check
  (all-255 activations times +-127 weights at K = 3072, plus random) passes.
* ``u8u8`` (any 8-bit weight, ORT): exact 16-bit ``vpmaddwd`` kernels.

fbgemm returns the raw sums of the u8 operand (x + 128); ``zp_correction = -128 * colsum(w)`` is folded into the
bias by the engine, so every route yields ``x_s8 @ w`` exactly. fbgemm runs in the same OpenMP pool as the fused
kernels, so nothing spins against it; ORT's own pool is told to sleep between calls.

ORT details: one tiny ONNX graph per weight (the weight is an initializer, so ORT/MLAS pre-packs it once); activations
and outputs are torch tensors bound zero-copy through ``IOBinding``. Routes (``docs/engine.md``, "What runs"):

* ``u8u8`` (exact for any 8-bit weight): A = x_s8 + 128 as u8 (zp 128), B = w_s8 + 128 as u8 (zp 128). MLAS widens both
  to 16 bits (``vpmaddwd``), so ``Y = x_s8 @ w_s8`` exactly.
* ``u8s8`` (fast): A = x_s8 + 128 as u8 (zp 128), B = w_s8 (zp 0). On AVX2 without VNNI ``vpmaddubsw`` saturates pairs
  at int16, so this is exact only when ``|w| <= 64`` (7-bit or ternary weights); the start-up self-test checks it.
* attention is not a GEMM here: the engine runs it in the fused C++ kernel ``attention_u8`` (``kernels.cpp``; int32
  16-bit pair multiply-adds), which the start-up self-test checks.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

ROUTES = ("u8u8", "u8s8", "fbgemm", "fbgemm16", "fbgemm8")
FBGEMM_ROUTES = ("fbgemm", "fbgemm16", "fbgemm8")
#: Fast linear routes exact on any AVX2 CPU for small weights, fastest first (see the module docstring).
FAST_ROUTES = ("fbgemm16", "fbgemm", "u8s8")
#: Fast routes for full 8-bit weights, exact only on CPUs whose self-test shows it (VNNI).
FULL_RANGE_ROUTES = ("fbgemm8",)
# |w| bound for which the u8s8 route cannot saturate: 255 * 64 * 2 = 32640 <= 32767.
FAST_MAX_ABS = 64
#: Largest |w| each route is exact for (given the self-test passed).
ROUTE_MAX_ABS = {"fbgemm16": 1, "fbgemm": FAST_MAX_ABS, "u8s8": FAST_MAX_ABS, "fbgemm8": 128, "u8u8": 128}
#: Environment switch (set by ``.ci/run``): a missing fbgemm extension is an error, not a fallback to ORT.
REQUIRE_FBGEMM_ENV = "IBERT_REQUIRE_FBGEMM"

_DEFAULT_THREADS: Optional[int] = None


def default_threads() -> int:
    if _DEFAULT_THREADS is not None:
        return _DEFAULT_THREADS
    env = os.environ.get("IBERT_ENGINE_THREADS")
    return int(env) if env else max(1, torch.get_num_threads())


def fbgemm_required() -> bool:
    """True under ``IBERT_REQUIRE_FBGEMM=1``: CI must not silently lose the fbgemm routes."""
    return os.environ.get(REQUIRE_FBGEMM_ENV, "") == "1"


def set_default_threads(n: int) -> None:
    global _DEFAULT_THREADS
    _DEFAULT_THREADS = int(n)


def session_options(threads: Optional[int] = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or default_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Two pools (ORT's and torch's OpenMP) share the cores: ORT workers must sleep, not spin, between calls.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def _session(model: onnx.ModelProto, threads: Optional[int]) -> ort.InferenceSession:
    blob = model.SerializeToString()
    del model
    return ort.InferenceSession(blob, sess_options=session_options(threads), providers=["CPUExecutionProvider"])


def malloc_trim() -> None:
    """Give freed heap memory (model-building temporaries) back to the OS (glibc only; no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def route_for(w_int: torch.Tensor, allow_fast: bool = True, allowed=FAST_ROUTES) -> str:
    """Fastest exact route for an integer weight among ``allowed`` (the routes that passed the self-test).

    Preference fbgemm16, fbgemm, u8s8, fbgemm8, each only within its ``ROUTE_MAX_ABS`` (``max|w| <= 1``, 64, 64,
    128); otherwise (or with ``allow_fast=False``) the exact u8u8 route. The default ``allowed`` holds the routes
    exact on every AVX2 CPU, so full 8-bit weights get u8u8 unless the caller's self-test allowed fbgemm8.
    """
    if not allow_fast:
        return "u8u8"
    amax = int(w_int.abs().max()) if w_int.numel() else 0
    return next((r for r in FAST_ROUTES + FULL_RANGE_ROUTES if r in allowed and amax <= ROUTE_MAX_ABS[r]), "u8u8")


def make_linear(w_int: torch.Tensor, route: str, threads: Optional[int] = None):
    """The GEMM object of ``route`` for weight ``w_int`` [N, K]: ``LinearGemm`` (ORT) or ``FbgemmLinear``."""
    if route in FBGEMM_ROUTES:
        return FbgemmLinear(w_int, route)
    return LinearGemm(w_int, route, threads)


class FbgemmLinear:
    """``Y[M, N] = A_u8[M, K] @ W_int[N, K]^T`` (int32, raw u8 sums) through the fbgemm extension.

    ``Y + zp_correction`` equals ``x_s8 @ W^T`` for ``A_u8 = x_s8 + 128``. Only the packed panel stays resident.
    """

    def __init__(self, w_int: torch.Tensor, route: str = "fbgemm"):
        from . import kernels

        if route not in FBGEMM_ROUTES:
            raise ValueError(f"not an fbgemm route: {route!r}")
        fb = kernels.load_fbgemm()
        if fb is None:
            raise ValueError(f"fbgemm route unavailable: {kernels.fbgemm_error()}")
        w = w_int.detach()
        if w.dim() != 2:
            raise ValueError("weight must be [N, K]")
        w_min, w_max = (int(w.min()), int(w.max())) if w.numel() else (0, 0)
        if max(-w_min, w_max) > ROUTE_MAX_ABS[route] or w_max > 127:
            raise ValueError(f"weight range {w_min}..{w_max} not allowed on route {route}")
        self.N, self.K = w.shape
        self.route = route
        self.zp_correction = -128 * w.to(torch.int64).sum(dim=1)
        self._p = fb.PackedLinear(w.to(torch.int8).contiguous(), route == "fbgemm16")
        self.weight_bytes = int(self._p.packed_bytes)

    def __call__(self, a_u8: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        M = a_u8.numel() // self.K
        if out is None:
            out = torch.empty((M, self.N), dtype=torch.int32)
        self._p.run(a_u8, out)
        return out


class LinearGemm:
    """``Y[M, N] = x_s8[M, K] @ W_int[N, K]^T`` (int32) for one weight, A passed as u8 (x + 128)."""

    def __init__(self, w_int: torch.Tensor, route: str, threads: Optional[int] = None):
        if route not in ROUTES or route in FBGEMM_ROUTES:
            raise ValueError(f"unknown ORT GEMM route {route!r}")
        w = w_int.detach()
        if w.dim() != 2:
            raise ValueError("weight must be [N, K]")
        w_min, w_max = int(w.min()), int(w.max())
        if max(-w_min, w_max) > ROUTE_MAX_ABS[route] or w_max > 127:
            raise ValueError(f"weight range {w_min}..{w_max} not allowed on route {route}")
        self.N, self.K = w.shape
        self.route = route
        wt = w.to(torch.int8).t().contiguous()  # [K, N], one byte per weight (no wide temporaries)
        if route == "u8u8":
            b = numpy_helper.from_array(wt.numpy().view(np.uint8) ^ np.uint8(0x80), "B")  # w + 128
            b_zp = numpy_helper.from_array(np.array(128, dtype=np.uint8), "b_zp")
        else:
            b = numpy_helper.from_array(wt.numpy(), "B")
            b_zp = numpy_helper.from_array(np.array(0, dtype=np.int8), "b_zp")
        del wt
        a_zp = numpy_helper.from_array(np.array(128, dtype=np.uint8), "a_zp")
        node = helper.make_node("MatMulInteger", ["A", "B", "a_zp", "b_zp"], ["Y"])
        model = _model([node], [helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", self.K])],
                       [helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", self.N])], [b, a_zp, b_zp])
        self.sess = _session(model, threads)
        self.weight_bytes = self.N * self.K  # one byte per weight (ORT also keeps a repacked copy)
        self.zp_correction = torch.zeros(self.N, dtype=torch.int64)  # ORT subtracts the zero points itself

    def __call__(self, a_u8: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        assert a_u8.dtype == torch.uint8 and a_u8.is_contiguous() and a_u8.shape[-1] == self.K
        M = a_u8.numel() // self.K
        if out is None:
            out = torch.empty((M, self.N), dtype=torch.int32)
        io = self.sess.io_binding()
        io.bind_input("A", "cpu", 0, np.uint8, (M, self.K), _ptr(a_u8))
        io.bind_output("Y", "cpu", 0, np.int32, (M, self.N), _ptr(out))
        self.sess.run_with_iobinding(io)
        return out


def s8_to_u8(x: torch.Tensor) -> torch.Tensor:
    """int-valued tensor in [-128, 127] -> u8 holding x + 128."""
    return (x.to(torch.int16) + 128).to(torch.uint8).contiguous()
