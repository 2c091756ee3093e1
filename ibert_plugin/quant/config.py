"""The single quantization configuration object shared by every quantized module.

``QuantConfig`` carries every bit-width, scheme and clipping constant of the two supported dataflows, so that no
module constructor holds a magic number:

* ``quant_mode="symmetric"``: the I-BERT integer-only dataflow (Kim et al., ICML 2021, arXiv 2101.01321) as pinned
  down in ``docs/integer_spec.md`` (8-bit activations and weights, 32-bit biases, 16-bit embedding sum, 22-bit
  residual sums, unsigned 8-bit softmax output, i-GELU / i-exp / i-sqrt).
* ``quant_mode="ternarybert"``: TernaryBERT fake quantization (Zhang et al., EMNLP 2020): quantized (ternary or
  k-bit) weights, 8-bit dynamic activations clipped to ``clip_val``, float nonlinearities.
* ``quant_mode="none"``: full precision; every module is numerically its ``torch.nn`` twin.

No fairseq import: ``from_namespace`` only reads attributes of whatever namespace it is given.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["ConfigError", "QuantConfig", "QUANT_MODES", "FORCE_DEQUANT", "WEIGHT_METHODS", "TERNARY_METHODS",
           "ACT_RANGES", "EMBEDDING_GRANULARITIES", "TERNARY_GRANULARITIES", "MODEL_FLAGS", "IBERT_W8A8", "IBERT_W7A8",
           "TERNARYBERT_W2A8", "INT_TERNARY_W2", "PRESETS"]

QUANT_MODES = ("none", "symmetric", "ternarybert")
FORCE_DEQUANT = ("none", "gelu", "softmax", "layernorm", "nonlinear")
WEIGHT_METHODS = ("sym", "twn", "lat")
#: The ternary weight methods (``weight_bits=2`` only).
TERNARY_METHODS = ("twn", "lat")
ACT_RANGES = ("symmetric", "minmax")
EMBEDDING_GRANULARITIES = ("row", "tensor")
#: Ternary (``twn`` / ``lat``) Linear-weight granularity: one ``alpha`` per matrix (TernaryBERT) or per output row.
TERNARY_GRANULARITIES = ("tensor", "row")
#: i-GELU / i-exp coefficient sets (``quant.nonlinear``): I-BERT's published ones, or the refit.
NONLINEAR_CONSTANT_SETS = ("paper", "refit")
#: Default IntLayerNorm variance bound (bits): the sum of squares stays below 2^52, exact in float64 and int64.
#: I-BERT upstream bounds it by 2^32 (an int32 accumulator), which leaves a token whose variance is far below the
#: batch's largest only a few bits of ``y >> shift`` (MiniLM SQuAD, W8A8 calibrated, no QAT: +1.6 F1).
LN_VAR_BITS_DEFAULT = 52
#: Widest symmetric-mode activation whose integer products stay exact in float32 GEMMs (n(13)^2 < 2^24).
SYMMETRIC_MAX_ACT_BITS = 13
#: Field -> the model flag (``run.py`` and ``fairseq-train`` spell them alike) that :meth:`QuantConfig.from_namespace`
#: reads back into it (:meth:`QuantConfig.to_flags`).
MODEL_FLAGS: Dict[str, str] = {
    "quant_mode": "--quant-mode", "force_dequant": "--force-dequant", "weight_bits": "--weight-bits",
    "weight_method": "--weight-quant-method", "act_bits": "--input-bits", "clip_val": "--clip-val",
    "act_range": "--act-range", "ternary_linear": "--ternary-linear", "nonlinear_constants": "--nonlinear-constants",
    "ln_var_bits": "--ln-var-bits",
}


class ConfigError(ValueError):
    """A bad setting or combination of settings (a flag's value): one sentence naming it.

    A ``ValueError``, so library callers catch it as before; in a fairseq command-line process the plugin prints an
    uncaught one as a single ``error:`` line instead of a traceback (:func:`ibert_plugin.wiring.register`).
    """


def _check_bits(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value!r}")


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Every bit-width and quantization scheme of the model, validated at construction.

    Args:
        quant_mode: ``"none"`` (float), ``"symmetric"`` (I-BERT integer-only) or ``"ternarybert"`` (fake quant).
        force_dequant: in symmetric mode, keep these nonlinear ops in float: ``"none"``, ``"gelu"``,
            ``"softmax"``, ``"layernorm"`` or ``"nonlinear"`` (all three).
        weight_bits: weight bit-width, 2..8; 2 means ternary (``{-1, 0, 1}``).
        weight_method: ``"sym"`` (symmetric max scaling, per output channel when ``weight_per_channel``),
            ``"twn"`` or ``"lat"`` (ternary methods, only with ``weight_bits=2``; registered by ``ternary.py``).
        weight_per_channel: one weight scale per output channel (I-BERT) instead of one per tensor (``sym`` only).
        act_bits: signed activation bit-width into every linear layer (I-BERT QuantAct(8); TernaryBERT inputs).
        bias_bits: signed bias / accumulator bit-width (32).
        embed_bits: signed bit-width of the per-tensor embedding tables in symmetric mode (8).
        embed_act_bits: signed bit-width of the token + position embedding sum (16).
        residual_bits: signed bit-width of the residual sums feeding the integer LayerNorms (22).
        softmax_out_bits: unsigned bit-width of the integer softmax output (8: values ``0..255``, scale 1/255).
        act_momentum: EMA momentum of the activation ranges (0.95); ``-1`` keeps a running min/max instead.
        clip_val: TernaryBERT activation clipping range ``[-clip_val, clip_val]`` (2.5).
        act_range: TernaryBERT activation quantizer: ``"symmetric"`` (clip, max-abs scale) or ``"minmax"``
            (asymmetric min-max over the tensor, no clip).
        ternary_embedding: TernaryBERT word-embedding granularity: ``"row"`` (one scale per token row) or
            ``"tensor"``.
        ternary_linear: granularity of ternary (``twn`` / ``lat``) Linear weights: ``"tensor"`` (one ``alpha`` per
            matrix, TernaryBERT) or ``"row"`` (one ``alpha`` per output row, each row ternarized alone; still 2-bit
            codes plus one float32 per row on disk, and a per-channel accumulator scale in the integer engine).
        lat_beta2: LAT's second-moment decay (Hou & Kwok 2018 use Adam's ``v``, so this must equal the optimizer's
            beta2; :meth:`from_namespace` takes it from ``--adam-betas``; default 0.999, fairseq's Adam default).
        lat_eps: LAT curvature ``D = sqrt(v) + lat_eps`` (the optimizer's eps; from ``--adam-eps``; default 1e-8).
        lat_iters: number of ``(alpha, b)`` alternations of the LAT closed form after the TWN start (5).
        nonlinear_constants: i-GELU / i-exp coefficients: ``"paper"`` (I-BERT's ``a = -0.2888, b = -1.769`` and
            ``0.35815147, 0.96963238, 1``) or ``"refit"`` (``-0.287, -1.775``; ``0.3671, 0.9736, 1``).
        ln_var_bits: IntLayerNorm variance bound: training grows the LayerNorm ``shift`` so that every row's
            ``sum((y >> shift)^2) < 2^ln_var_bits`` (52, exact in float64 / int64; 32 = I-BERT upstream's int32
            accumulator, at a precision cost on low-variance tokens). 16..52.

    Raises:
        ConfigError: (a ``ValueError``) on any out-of-range or inconsistent field, with one sentence naming it.
    """

    quant_mode: str = "none"
    force_dequant: str = "none"
    weight_bits: int = 8
    weight_method: str = "sym"
    weight_per_channel: bool = True
    act_bits: int = 8
    bias_bits: int = 32
    embed_bits: int = 8
    embed_act_bits: int = 16
    residual_bits: int = 22
    softmax_out_bits: int = 8
    act_momentum: float = 0.95
    clip_val: float = 2.5
    act_range: str = "symmetric"
    ternary_embedding: str = "row"
    ternary_linear: str = "tensor"
    lat_beta2: float = 0.999
    lat_eps: float = 1e-8
    lat_iters: int = 5
    nonlinear_constants: str = "paper"
    ln_var_bits: int = LN_VAR_BITS_DEFAULT

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raises :class:`ConfigError` with one clear sentence on the first problem found."""
        _check_choice("quant_mode", self.quant_mode, QUANT_MODES)
        _check_choice("force_dequant", self.force_dequant, FORCE_DEQUANT)
        _check_bits("weight_bits", self.weight_bits, 2, 8)
        _check_choice("weight_method", self.weight_method, WEIGHT_METHODS)
        if self.weight_method in TERNARY_METHODS and self.weight_bits != 2:
            raise ConfigError(
                f"weight_method {self.weight_method!r} is a ternary method and needs weight_bits=2, "
                f"got {self.weight_bits}"
            )
        if not isinstance(self.weight_per_channel, bool):
            raise ConfigError(f"weight_per_channel must be a bool, got {self.weight_per_channel!r}")
        # float32 carriers hold activations exactly up to 2^24, so no activation may exceed 24 bits.
        _check_bits("act_bits", self.act_bits, 2, 16)
        _check_bits("bias_bits", self.bias_bits, 8, 32)
        _check_bits("embed_bits", self.embed_bits, 2, 8)
        _check_bits("embed_act_bits", self.embed_act_bits, 2, 24)
        _check_bits("residual_bits", self.residual_bits, 2, 24)
        _check_bits("softmax_out_bits", self.softmax_out_bits, 2, 16)
        m = self.act_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (m == -1 or 0.0 <= m < 1.0):
            raise ConfigError(f"act_momentum must be in [0, 1) or -1 (running min/max), got {m!r}")
        c = self.clip_val
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise ConfigError(f"clip_val must be a positive number, got {c!r}")
        _check_choice("act_range", self.act_range, ACT_RANGES)
        _check_choice("ternary_embedding", self.ternary_embedding, EMBEDDING_GRANULARITIES)
        _check_choice("ternary_linear", self.ternary_linear, TERNARY_GRANULARITIES)
        b2 = self.lat_beta2
        if isinstance(b2, bool) or not isinstance(b2, (int, float)) or not 0.0 < b2 < 1.0:
            raise ConfigError(f"lat_beta2 must be in (0, 1), got {b2!r}")
        e = self.lat_eps
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0:
            raise ConfigError(f"lat_eps must be a positive number, got {e!r}")
        _check_bits("lat_iters", self.lat_iters, 1, 100)
        _check_choice("nonlinear_constants", self.nonlinear_constants, NONLINEAR_CONSTANT_SETS)
        _check_bits("ln_var_bits", self.ln_var_bits, 16, 52)  # above 2^53 float64 sums stop being exact
        if self.quant_mode == "symmetric" and self.act_bits > SYMMETRIC_MAX_ACT_BITS:
            raise ConfigError(
                f"act_bits {self.act_bits} is not supported in symmetric mode: the integer attention products "
                f"(n(act_bits)^2 > 2^24) cannot be computed exactly; use at most {SYMMETRIC_MAX_ACT_BITS}"
            )

    # ------------------------------------------------------------------------------------------------------------
    @property
    def symmetric(self) -> bool:
        """True in the I-BERT integer-only mode."""
        return self.quant_mode == "symmetric"

    @property
    def integer_gelu(self) -> bool:
        """i-GELU is integer (symmetric mode and GELU not force-dequantized)."""
        return self.symmetric and self.force_dequant not in ("gelu", "nonlinear")

    @property
    def integer_softmax(self) -> bool:
        """Softmax is integer (symmetric mode and softmax not force-dequantized)."""
        return self.symmetric and self.force_dequant not in ("softmax", "nonlinear")

    @property
    def integer_layernorm(self) -> bool:
        """LayerNorm is integer (symmetric mode and LayerNorm not force-dequantized)."""
        return self.symmetric and self.force_dequant not in ("layernorm", "nonlinear")

    @property
    def ternary(self) -> bool:
        """Weights are ternary (``weight_bits == 2``)."""
        return self.weight_bits == 2

    @property
    def linear_rowwise(self) -> bool:
        """Linear weights use a ternary method with one ``alpha`` per output row (``ternary_linear="row"``)."""
        return self.weight_method in TERNARY_METHODS and self.ternary_linear == "row"

    def replace(self, **changes: Any) -> "QuantConfig":
        """A validated copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_namespace(cls, args: Any) -> "QuantConfig":
        """Build from fairseq-style arguments (``argparse.Namespace``, omegaconf node or any object).

        Reads ``quant_mode``, ``force_dequant``, ``weight_bits``, ``weight_quant_method`` (``None`` means ``"twn"``
        for ``weight_bits=2`` and ``"sym"`` otherwise), ``input_bits`` (-> ``act_bits``), ``clip_val``,
        ``act_range``, ``ternary_linear``, ``nonlinear_constants`` and ``ln_var_bits`` when present; LAT's
        ``lat_beta2`` / ``lat_eps`` come from the optimizer's ``adam_betas`` (``"(0.9, 0.999)"``) / ``adam_eps`` when
        the namespace has them (fairseq passes the whole command line to a legacy model), so LAT's ``v`` is Adam's.
        Every other field keeps its default.

        Raises:
            ConfigError: if the resulting configuration is invalid.
        """
        defaults = cls()

        def get(name: str, default: Any) -> Any:
            value = getattr(args, name, None)
            return default if value is None else value

        weight_bits = int(get("weight_bits", defaults.weight_bits))
        method = getattr(args, "weight_quant_method", None)
        if method is None:
            method = "twn" if weight_bits == 2 else "sym"
        beta2, eps = defaults.lat_beta2, defaults.lat_eps
        if getattr(args, "optimizer", "adam") in (None, "adam"):
            betas = getattr(args, "adam_betas", None)
            if betas is not None:
                beta2 = float(_parse_betas(betas)[1])
            eps = float(get("adam_eps", eps))
        return cls(
            quant_mode=str(get("quant_mode", defaults.quant_mode)),
            force_dequant=str(get("force_dequant", defaults.force_dequant)),
            weight_bits=weight_bits,
            weight_method=str(method),
            act_bits=int(get("input_bits", defaults.act_bits)),
            clip_val=float(get("clip_val", defaults.clip_val)),
            act_range=str(get("act_range", defaults.act_range)),
            ternary_linear=str(get("ternary_linear", defaults.ternary_linear)),
            lat_beta2=beta2,
            lat_eps=eps,
            nonlinear_constants=str(get("nonlinear_constants", defaults.nonlinear_constants)),
            ln_var_bits=int(get("ln_var_bits", defaults.ln_var_bits)),
        )


    def to_flags(self, fields: Optional[Sequence[str]] = None) -> List[str]:
        """The model flags (``run.py`` and ``fairseq-train`` spell them alike, :data:`MODEL_FLAGS`) that
        :meth:`from_namespace` reads back into this configuration: every quantization flag list of the recipes is
        built here.

        Args:
            fields: the fields to spell, in this order (a recipe passes exactly the settings it fixes). ``None``: mode,
                weight bits and quantizer always, the other fields of :data:`MODEL_FLAGS` when they differ from their
                defaults. LAT's ``lat_beta2`` / ``lat_eps`` are the optimizer's (``--adam-betas`` / ``--adam-eps``)
                and are not model flags.

        Returns:
            ``["--quant-mode", "symmetric", "--weight-bits", "8", ...]``; floats as ``f"{value:g}"``.
        """
        if fields is None:
            defaults = QuantConfig()
            always = ("quant_mode", "weight_bits", "weight_method")
            fields = [*always, *(n for n in MODEL_FLAGS
                                 if n not in always and getattr(self, n) != getattr(defaults, n))]
        flags: List[str] = []
        for name in fields:
            value = getattr(self, name)
            flags += [MODEL_FLAGS[name], f"{value:g}" if isinstance(value, float) else str(value)]
        return flags


# ------------------------------------------------------------------------------------------------------------ presets
#: I-BERT integer-only: 8-bit per-channel weights, 8-bit activations (Kim et al., 2021).
IBERT_W8A8 = QuantConfig(quant_mode="symmetric", weight_bits=8, weight_method="sym")
#: I-BERT with 7-bit per-channel weights: exact *and* fast on CPUs without VNNI (``docs/engine.md``).
IBERT_W7A8 = IBERT_W8A8.replace(weight_bits=7)
#: TernaryBERT: ternary TWN weights, 8-bit fake-quantized activations, float nonlinearities (Zhang et al., 2020).
TERNARYBERT_W2A8 = QuantConfig(quant_mode="ternarybert", weight_bits=2, weight_method="twn")
#: Integer-only ternary: ternary TWN weights with I-BERT's integer activations, GELU, softmax and LayerNorm.
INT_TERNARY_W2 = QuantConfig(quant_mode="symmetric", weight_bits=2, weight_method="twn")

#: The presets by name (``QuantConfig`` is frozen: derive a variant with ``.replace(...)``).
PRESETS: Dict[str, QuantConfig] = {"IBERT_W8A8": IBERT_W8A8, "IBERT_W7A8": IBERT_W7A8,
                                   "TERNARYBERT_W2A8": TERNARYBERT_W2A8, "INT_TERNARY_W2": INT_TERNARY_W2}


def _parse_betas(betas: Any) -> tuple:
    """fairseq's ``--adam-betas`` (a string ``"(0.9, 0.999)"`` or a sequence) as a tuple of two floats."""
    if isinstance(betas, str):
        parts = [p for p in betas.strip().strip("()[]").replace(" ", "").split(",") if p]
    else:
        parts = list(betas)
    if len(parts) != 2:
        raise ConfigError(f"adam_betas must hold two numbers, got {betas!r}")
    return float(parts[0]), float(parts[1])
