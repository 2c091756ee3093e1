"""Integer-only audit: prove that a model's symmetric-mode forward keeps every quantized value an exact integer.

I-BERT's claim is an *integer-only* inference graph (Kim et al. 2021, §3); upstream code never checks it. This
audit instruments every module of the quantization types (:data:`~ibert_plugin.quant.modules.QUANT_MODULE_TYPES`)
of *any* model with forward hooks and runs one forward pass. For every ``(q, S)`` carrier entering or leaving such a
module it checks that

* ``q`` is finite and integer-valued (``q == round(q)`` exactly) and exactly representable in its dtype
  (``|q| <= 2^24`` in float32, ``2^53`` in float64),
* ``q`` lies in the module's declared bit range (e.g. ``[-127, 127]`` out of an 8-bit QuantAct, ``[0, 255]`` out of
  the softmax, 8-bit inputs into QuantLinear, 22-bit into IntLayerNorm, ``|q| < 2^51`` into requantization),
* ``S`` is finite, nonzero and of shape ``(1,)`` or ``(C,)``;

and, in symmetric mode, that no float-only op sits between quantizers: a module that needs a quantized input
(QuantLinear; i-GELU, i-softmax, i-LayerNorm when integer) receiving a scale-less real tensor is reported, and so is
a QuantAct receiving a real tensor that is neither a model input nor the output of a float (force-dequantized)
module. Once a force-dequantized module has run, later real inputs to QuantActs are recorded as notes instead: a
``force_dequant`` model is not integer-only by construction.

This is a debugging tool: it synchronises with the host freely (``.item()``), unlike the modules themselves.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from torch import nn

from .modules import (
    QUANT_MODULE_TYPES,
    DynamicActQuant,
    IntGELU,
    IntLayerNorm,
    IntSoftmax,
    QuantAct,
    QuantEmbedding,
    QuantLinear,
)
from .primitives import qmax

__all__ = ["Violation", "AuditReport", "integer_audit"]

_EXACT = {torch.float16: 2**11, torch.bfloat16: 2**8, torch.float32: 2**24, torch.float64: 2**53}
REQUANT_DOMAIN = 2**51  # |z| bound of requant (exact split int64 arithmetic, primitives.REQUANT_Z_BITS)


@dataclass
class Violation:
    """One failed check: the module's qualified name, its class, the tensor concerned and a message."""

    module: str
    kind: str
    tensor: str
    message: str

    def __str__(self) -> str:
        return f"{self.module} ({self.kind}) {self.tensor}: {self.message}"


@dataclass
class AuditReport:
    """Result of :func:`integer_audit`.

    Attributes:
        violations: failed checks.
        checked: number of quantized tensors (and scale-less inputs) checked.
        modules: number of instrumented module calls.
        notes: informational findings (float fallbacks under ``force_dequant``).
    """

    violations: List[Violation] = field(default_factory=list)
    checked: int = 0
    modules: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when there is no violation and at least one tensor was checked."""
        return not self.violations and self.checked > 0

    def assert_clean(self) -> None:
        """Raise ``AssertionError`` listing the violations (or saying nothing was checked)."""
        if self.violations:
            lines = "\n  ".join(str(v) for v in self.violations[:50])
            more = f"\n  ... and {len(self.violations) - 50} more" if len(self.violations) > 50 else ""
            raise AssertionError(f"integer audit: {len(self.violations)} violation(s):\n  {lines}{more}")
        if self.checked == 0:
            raise AssertionError("integer audit: no quantized tensor was checked (no quantization module ran)")

    def __str__(self) -> str:
        status = "clean" if self.clean else f"{len(self.violations)} violation(s)"
        return f"AuditReport({status}, checked={self.checked}, modules={self.modules}, notes={len(self.notes)})"


def _integer_mode(module: nn.Module) -> bool:
    """Whether the module runs its integer path in its configuration."""
    cfg = module.cfg
    if isinstance(module, IntGELU):
        return cfg.integer_gelu
    if isinstance(module, IntSoftmax):
        return cfg.integer_softmax
    if isinstance(module, IntLayerNorm):
        return cfg.integer_layernorm
    if isinstance(module, DynamicActQuant):
        return False
    return cfg.symmetric


def _in_bound(module: nn.Module) -> Optional[int]:
    """Largest |q| allowed into the module's main input (None: only exactness)."""
    cfg = module.cfg
    if isinstance(module, QuantLinear):
        return qmax(cfg.act_bits)
    if isinstance(module, IntGELU):
        return qmax(cfg.bias_bits) + 2**26  # 32-bit bias plus the GEMM sum (K * 127 * 127 < 2^26)
    if isinstance(module, IntLayerNorm):
        return qmax(cfg.residual_bits)
    if isinstance(module, QuantAct):
        return REQUANT_DOMAIN
    return None


def _out_range(module: nn.Module):
    """``(lo, hi)`` of the module's integer output (None: only exactness)."""
    cfg = module.cfg
    if isinstance(module, QuantAct):
        n = qmax(module.bits)
        return -n, n
    if isinstance(module, QuantLinear):
        n = qmax(cfg.bias_bits) + 2**26
        return -n, n
    if isinstance(module, QuantEmbedding):
        n = qmax(cfg.embed_bits)
        return -n, n
    if isinstance(module, IntSoftmax):
        return 0, 2**module.out_bits - 1
    if isinstance(module, IntLayerNorm):
        n = 2**32 - 1
        return -n, n
    return None


class _Auditor:
    def __init__(self, report: AuditReport):
        self.report = report
        self.legit_real: dict = {}  # id -> tensor (kept alive so ids stay unique)
        self.float_fallback_ran = False

    # -- helpers ---------------------------------------------------------------------------------------------
    def fail(self, name: str, module: nn.Module, tensor: str, msg: str) -> None:
        self.report.violations.append(Violation(name, type(module).__name__, tensor, msg))

    def mark_legit(self, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            self.legit_real[id(t)] = t

    def check_pair(self, name, module, label, q, scale, bound=None, lo_hi=None) -> None:
        rep = self.report
        rep.checked += 1
        if not isinstance(q, torch.Tensor) or not q.is_floating_point():
            self.fail(name, module, label, f"expected a float tensor of integers, got {type(q).__name__}"
                      + (f" {q.dtype}" if isinstance(q, torch.Tensor) else ""))
            return
        qd = q.detach()
        if qd.numel() == 0:
            return
        if not bool(torch.isfinite(qd).all()):
            self.fail(name, module, label, "non-finite values")
            return
        if not bool(torch.equal(qd, torch.round(qd))):
            frac = (qd - torch.round(qd)).abs().max().item()
            self.fail(name, module, label, f"not integer-valued (max |q - round(q)| = {frac:.3g})")
        amax = qd.abs().max().item()
        exact = _EXACT.get(qd.dtype)
        if exact is not None and amax > exact:
            self.fail(name, module, label, f"|q| = {amax:.0f} exceeds the exact integer range 2^"
                      f"{exact.bit_length() - 1} of {qd.dtype}")
        if bound is not None and amax > bound:
            self.fail(name, module, label, f"|q| = {amax:.0f} exceeds the declared bound {bound}")
        if lo_hi is not None:
            lo, hi = lo_hi
            qmin, qmaxv = qd.min().item(), qd.max().item()
            if qmin < lo or qmaxv > hi:
                self.fail(name, module, label, f"values [{qmin:.0f}, {qmaxv:.0f}] outside the declared range "
                          f"[{lo}, {hi}]")
        if not isinstance(scale, torch.Tensor):
            self.fail(name, module, label, f"scale is not a tensor ({type(scale).__name__})")
            return
        s = scale.detach()
        if s.dim() != 1 or s.numel() not in (1, q.shape[-1] if q.dim() else 1):
            self.fail(name, module, label, f"scale shape {tuple(s.shape)} is neither (1,) nor (C,) for input "
                      f"{tuple(q.shape)}")
        if not bool(torch.isfinite(s).all()) or bool((s == 0).any()):
            self.fail(name, module, label, "scale is not finite and nonzero")

    # -- hooks ---------------------------------------------------------------------------------------------
    def pre_hook(self, name: str):
        def hook(module, args, kwargs):
            if isinstance(module, QuantEmbedding) or isinstance(module, DynamicActQuant):
                return None
            try:
                bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            except TypeError:
                return None
            integer = _integer_mode(module)
            pairs = [("x", "scale")]
            if isinstance(module, QuantAct):
                pairs.append(("identity", "identity_scale"))
            for tname, sname in pairs:
                t = bound.get(tname)
                s = bound.get(sname)
                if not isinstance(t, torch.Tensor):
                    continue
                if s is not None:
                    self.check_pair(name, module, f"input {tname}", t, s, bound=_in_bound(module))
                    continue
                if not integer:
                    continue
                self.report.checked += 1
                if isinstance(module, QuantAct):
                    if id(t) in self.legit_real:
                        continue
                    msg = ("real tensor (scale=None) reaches a QuantAct: a float-only op sits between quantizers "
                           "(it is neither a model input nor a float module's output)")
                    if self.float_fallback_ran:
                        self.report.notes.append(f"{name}: {msg} [allowed: force_dequant float ops ran]")
                    else:
                        self.fail(name, module, f"input {tname}", msg)
                else:
                    self.fail(name, module, f"input {tname}",
                              "real tensor (scale=None) where a quantized input is required: a float-only op sits "
                              "between quantizers")
            return None

        return hook

    def post_hook(self, name: str):
        def hook(module, args, kwargs, output):
            self.report.modules += 1
            if not (isinstance(output, tuple) and len(output) == 2):
                self.fail(name, module, "output", f"expected an (x, scale) pair, got {type(output).__name__}")
                return None
            q, s = output
            if s is None:
                self.mark_legit(q)
                if _integer_mode(module):
                    self.fail(name, module, "output", "integer-mode module returned a real tensor (scale=None)")
                elif module.cfg.symmetric and not isinstance(module, DynamicActQuant):
                    self.float_fallback_ran = True
                    self.report.notes.append(f"{name}: float fallback ({type(module).__name__}, force_dequant="
                                             f"{module.cfg.force_dequant})")
                return None
            self.check_pair(name, module, "output", q, s, lo_hi=_out_range(module))
            return None

        return hook


def _collect_tensors(obj: Any, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _collect_tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _collect_tensors(o, out)


def integer_audit(model: nn.Module, *inputs: Any, eval_mode: bool = True, **kwargs: Any) -> AuditReport:
    """Run ``model(*inputs, **kwargs)`` once with every quantization module instrumented and report violations.

    Args:
        model: any ``nn.Module`` (modules that are not quantization modules are not checked).
        *inputs, **kwargs: forwarded to ``model``; their tensors count as legitimate real inputs.
        eval_mode: run in ``eval()`` (frozen ranges, the bit-exact contract) and restore the previous mode after.

    Returns:
        :class:`AuditReport`. An exception raised by the forward pass is recorded as a violation.
    """
    report = AuditReport()
    auditor = _Auditor(report)
    legit: list = []
    _collect_tensors(inputs, legit)
    _collect_tensors(kwargs, legit)
    for t in legit:
        auditor.mark_legit(t)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, QUANT_MODULE_TYPES):
            handles.append(module.register_forward_pre_hook(auditor.pre_hook(name or "<root>"), with_kwargs=True))
            handles.append(module.register_forward_hook(auditor.post_hook(name or "<root>"), with_kwargs=True))
    modes = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        with torch.no_grad():
            model(*inputs, **kwargs)
    except Exception as exc:  # recorded, not raised: the audit reports what broke
        report.violations.append(Violation("<forward>", type(exc).__name__, "-", str(exc)))
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes:
            m.training = flag
    return report
