"""Deployment peers of the integer engine, built from the same FP32 weights: torch dynamic int8, ONNX Runtime (FP32,
dynamic int8, static QDQ int8) and OpenVINO (FP32, NNCF static int8).

Every peer starts from the plain FP32 encoder of ``integer_engine.FloatEncoder`` (the QAT model's float weights),
takes token ids ``[B, T]`` (int64, padded with the model's padding index) and returns the final hidden states
``[B, T, D]``. How each is built is what a deployment engineer would do with the library's documented one-call
post-training route:

* ``torch_int8``: ``torch.ao.quantization.quantize_dynamic(fp32, {nn.Linear}, torch.qint8)`` (fbgemm engine): int8
  linears with per-tensor dynamic activations, everything else in float.
* ``ort_fp32``: ``torch.onnx.export(..., opset 17, dynamo=False)`` with dynamic batch / time axes, CPU EP,
  ``ORT_ENABLE_ALL``.
* ``ort_int8_dynamic``: ``onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8)`` on that
  graph (MatMulInteger / DynamicQuantizeLinear).
* ``ort_int8_static``: ``quantize_static`` (QDQ, per-channel s8 weights, u8 activations, MinMax calibration on the
  calibration rows).
* ``ov_fp32``: ``openvino.Core().read_model(onnx)``, ``compile_model("CPU")`` with ``INFERENCE_PRECISION_HINT=f32``.
* ``ov_int8``: ``nncf.quantize(model, nncf.Dataset(rows), model_type=nncf.ModelType.TRANSFORMER)`` (static
  post-training quantization, no training), compiled like ``ov_fp32`` but at its default precision.

Only the engine is integer-only: the peers keep GELU, softmax and LayerNorm in float. Threads: torch's pool, ORT's
intra-op pool and OpenVINO's ``INFERENCE_NUM_THREADS`` are all set to the benchmark's ``threads``; ORT's workers
are told not to spin between calls (``allow_spinning 0``), since the contenders run interleaved in one process and
a spinning pool would steal the cores of whichever contender runs next.

``openvino`` / ``nncf`` are an optional benchmark extra (``requirements-bench.txt``), never a runtime dependency:
without them the OpenVINO peers are reported as unavailable, with the reason.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ibert_plugin.engine import gemm

#: Peer names in the order they are built and reported.
PEERS = ("torch_int8", "ort_fp32", "ort_int8_dynamic", "ort_int8_static", "ov_fp32", "ov_int8")
#: Peers that are int8 (what the engine's ratios are about); the FP32 ones are context.
INT8_PEERS = ("torch_int8", "ort_int8_dynamic", "ort_int8_static", "ov_int8")


@dataclass
class Peer:
    """One contender: ``run(tokens)`` plus what the JSON says about it."""

    name: str
    library: str
    version: str
    route: str
    run: Optional[Callable[[torch.Tensor], object]] = None
    error: Optional[str] = None
    build_s: float = 0.0
    extra: Dict[str, object] = field(default_factory=dict)

    def describe(self) -> Dict[str, object]:
        d = dict(name=self.name, library=self.library, version=self.version, route=self.route,
                 available=self.run is not None, build_s=round(self.build_s, 1), **self.extra)
        if self.error:
            d["error"] = self.error
        return d


def _version(mod_name: str) -> str:
    try:
        mod = __import__(mod_name)
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # noqa: BLE001  (not installed: reported as unavailable by the builder)
        return "not installed"


def hidden_states(out):
    """A peer's ``run(tokens)`` output as hidden states: a torch tensor or an array as it is, an OpenVINO result's
    first (only) output."""
    import numpy as np

    return out if isinstance(out, (torch.Tensor, np.ndarray)) else out[0]


def export_onnx(fp: nn.Module, example: torch.Tensor, path: str) -> str:
    """``fp`` (tokens -> hidden states) as ONNX opset 17 with dynamic batch and time axes."""
    with torch.no_grad():
        torch.onnx.export(fp, (example,), path, input_names=["tokens"], output_names=["hidden"], opset_version=17,
                          dynamic_axes={"tokens": {0: "batch", 1: "time"}, "hidden": {0: "batch", 1: "time"}},
                          dynamo=False)
    return path


class _Rows:
    """ORT calibration reader over token rows (each [1, T])."""

    def __init__(self, rows):
        self._it = iter([{"tokens": r.reshape(1, -1).numpy()} for r in rows])

    def get_next(self):
        return next(self._it, None)


def build_peers(fp: nn.Module, calib_rows: List[torch.Tensor], example: torch.Tensor, threads: int,
                only: Optional[List[str]] = None, log=print) -> Dict[str, Peer]:
    """Every peer in ``only`` (default all of :data:`PEERS`) built from ``fp``; a peer that cannot be built comes
    back with ``run=None`` and ``error`` set (reported in the JSON, never silently dropped).

    Args:
        fp: the FP32 encoder (``integer_engine.FloatEncoder``).
        calib_rows: unpadded token rows (int64 [T]) for the static quantizers' calibration.
        example: a token batch [B, T] for the ONNX export trace.
        threads: intra-op threads of every runtime.
        only: peer names to build.
        log: progress printer.
    """
    import time

    only = list(PEERS if only is None else only)
    tmp = tempfile.mkdtemp(prefix="ibert_peers_")
    peers: Dict[str, Peer] = {}
    onnx_fp = os.path.join(tmp, "fp32.onnx")

    def attempt(peer: Peer, build: Callable[[], Callable]):
        t0 = time.perf_counter()
        try:
            peer.run = build()
        except Exception as exc:  # noqa: BLE001  (a peer that fails is reported, the benchmark goes on)
            peer.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            print(f"warning: peer {peer.name} unavailable: {peer.error}", file=sys.stderr)
            if os.environ.get("IBERT_BENCH_DEBUG"):
                traceback.print_exc()
        peer.build_s = time.perf_counter() - t0
        peers[peer.name] = peer
        log(f"  peer {peer.name:17s} {'ok' if peer.run else 'UNAVAILABLE'} ({peer.build_s:.1f} s)")

    tv = torch.__version__
    if "torch_int8" in only:
        def b_torch():
            torch.backends.quantized.engine = "fbgemm"
            q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp), {nn.Linear}, dtype=torch.qint8).eval()
            return lambda t: q(t)
        attempt(Peer("torch_int8", "torch", tv, "torch.ao.quantization.quantize_dynamic qint8 nn.Linear "
                     "(fbgemm, per-tensor dynamic activations; GELU/softmax/LN float)"), b_torch)

    need_onnx = [n for n in only if n.startswith(("ort", "ov"))]
    onnx_err = None
    if need_onnx:
        try:
            export_onnx(fp, example, onnx_fp)
        except Exception as exc:  # noqa: BLE001
            onnx_err = f"ONNX export failed: {type(exc).__name__}: {exc}"[:300]
    ov_ver, ort_ver = _version("openvino"), _version("onnxruntime")

    def needs_onnx(build):
        def wrapped():
            if onnx_err:
                raise RuntimeError(onnx_err)
            return build()
        return wrapped

    def ort_session(path):
        import onnxruntime as ort

        # the engine's ORT settings (ORT_ENABLE_ALL, sequential, workers sleep between calls)
        s = ort.InferenceSession(path, sess_options=gemm.session_options(threads), providers=["CPUExecutionProvider"])
        return lambda t: s.run(None, {"tokens": t.numpy()})[0]

    if "ort_fp32" in only:
        attempt(Peer("ort_fp32", "onnxruntime", ort_ver, "torch.onnx.export opset 17 -> CPU EP, ORT_ENABLE_ALL"),
                needs_onnx(lambda: ort_session(onnx_fp)))
    if "ort_int8_dynamic" in only:
        def b_dyn():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            out = os.path.join(tmp, "int8_dynamic.onnx")
            quantize_dynamic(onnx_fp, out, per_channel=True, weight_type=QuantType.QInt8)
            return ort_session(out)
        attempt(Peer("ort_int8_dynamic", "onnxruntime", ort_ver, "onnxruntime.quantization.quantize_dynamic "
                     "(per-channel QInt8 weights, dynamic u8 activations; MatMulInteger)"), needs_onnx(b_dyn))
    if "ort_int8_static" in only:
        def b_static():
            from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

            out = os.path.join(tmp, "int8_static.onnx")
            quantize_static(onnx_fp, out, _Rows(calib_rows), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["MatMul", "Gemm"])
            return ort_session(out)
        attempt(Peer("ort_int8_static", "onnxruntime", ort_ver, f"onnxruntime.quantization.quantize_static QDQ "
                     f"(per-channel s8 weights, u8 activations, MinMax on {len(calib_rows)} rows)"),
                needs_onnx(b_static))

    def ov_compiled(model, f32: bool):
        import openvino as ov

        cfg = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if f32:
            cfg["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = ov.Core().compile_model(model, "CPU", cfg)
        req = compiled.create_infer_request()
        return lambda t: req.infer({0: t.numpy()})

    if "ov_fp32" in only:
        def b_ovfp():
            import openvino as ov

            return ov_compiled(ov.Core().read_model(onnx_fp), True)
        attempt(Peer("ov_fp32", "openvino", ov_ver, "openvino read_model(onnx) -> CPU, INFERENCE_PRECISION_HINT=f32"),
                needs_onnx(b_ovfp))
    if "ov_int8" in only:
        def b_ovint():
            import nncf
            import openvino as ov

            model = ov.Core().read_model(onnx_fp)
            data = nncf.Dataset([r.reshape(1, -1).numpy() for r in calib_rows], lambda a: {"tokens": a})
            q = nncf.quantize(model, data, subset_size=len(calib_rows), model_type=nncf.ModelType.TRANSFORMER)
            return ov_compiled(q, False)
        attempt(Peer("ov_int8", "openvino+nncf", f"{ov_ver} / nncf {_version('nncf')}",
                     f"nncf.quantize static PTQ (model_type TRANSFORMER, {len(calib_rows)} calibration rows, no "
                     f"training) -> CPU, default precision"), needs_onnx(b_ovint))
    shutil.rmtree(tmp, ignore_errors=True)  # sessions and compiled models hold their own copies
    return peers
