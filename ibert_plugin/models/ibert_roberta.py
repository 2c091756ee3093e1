"""Quantized RoBERTa for fairseq: I-BERT integer-only and TernaryBERT fake-quant dataflows.

The network keeps fairseq ``roberta``'s parameter names (``encoder.sentence_encoder.layers.N.self_attn.q_proj.weight``,
``...fc1.weight``, ``...layernorm_embedding.weight`` ...), so a checkpoint trained with fairseq's own ``roberta``
architecture, an imported HuggingFace encoder or a full-precision stage of this plugin loads strictly. Quantization
state (activation ranges, LayerNorm shifts, LAT curvature) lives in buffers that ``upgrade_state_dict_named`` fills
for checkpoints that predate it.

Three modes (``--quant-mode``):

* ``none``: full precision, numerically the same network as fairseq ``roberta``.
* ``symmetric``: I-BERT (Kim et al., 2021) integer-only dataflow; see ``docs/integer_spec.md`` ("Encoder wiring"):
  16-bit embedding sum, 8-bit activations into every linear, 32-bit biases, 22-bit residual sums into each
  integer LayerNorm, i-GELU on the FC1 accumulator, integer softmax with 8-bit output; every layer hands its real
  output scale to the next (upstream passes the embedding scale to every layer). ``--weight-bits 2`` gives the
  integer-only ternary model (TWN/LAT weights with the I-BERT activations).
* ``ternarybert``: TernaryBERT (Zhang et al., 2020): ternary (or k-bit) weights, 8-bit activations on every linear
  input and on both attention matmuls, float nonlinearities, LayerNorms, biases and position embeddings.
"""
import dataclasses
import logging
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils
from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import (
    RobertaClassificationHead,
    RobertaEncoder,
    RobertaModel,
    base_architecture,
)
from fairseq.models.transformer import TransformerEncoder
from fairseq.modules.transformer_sentence_encoder import init_bert_params

from ..quant.config import (
    ACT_RANGES,
    FORCE_DEQUANT,
    LN_VAR_BITS_DEFAULT,
    NONLINEAR_CONSTANT_SETS,
    QUANT_MODES,
    TERNARY_GRANULARITIES,
    WEIGHT_METHODS,
    ConfigError,
    QuantConfig,
)
from ..quant.modules import (
    DynamicActQuant,
    IntGELU,
    IntLayerNorm,
    IntSoftmax,
    QuantAct,
    QuantEmbedding,
    QuantLinear,
)
from ..quant.primitives import context_scale, dequantize, exact_int_matmul, score_scale

logger = logging.getLogger(__name__)

QTensor = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _real(x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Real value of a ``(x, scale)`` carrier (``scale is None`` means ``x`` is already real): ``float(q * S)``.

    Integer carriers (float32 or float64 integers) are multiplied by the float32 scale in float64 and rounded once
    to float32 (:func:`~ibert_plugin.quant.primitives.dequantize`), which the engine does for the float head too.
    """
    return x if scale is None else dequantize(x.to(torch.float64), scale)


def _dropout_carrier(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # Dropout breaks integrality, which is fine in training: the next QuantAct re-rounds. Eval is a no-op.
    if not training or p <= 0.0:
        return x
    return F.dropout(x, p=p, training=True)


class QuantSelfAttention(nn.Module):
    """Multi-head self-attention with fairseq ``MultiheadAttention`` parameter names.

    Submodules ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (QuantLinear), ``q_act``/``k_act``/``v_act``/
    ``attn_act`` (8-bit QuantAct, symmetric mode), ``softmax`` (IntSoftmax, unsigned 8-bit probabilities with scale
    1/255) and the TernaryBERT matmul-input quantizers ``q_quant``/``k_quant``/``probs_quant``/``v_quant``.
    """

    def __init__(self, embed_dim: int, num_heads: int, attention_dropout: float, cfg: QuantConfig):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = attention_dropout
        self.cfg = cfg
        self.k_proj = QuantLinear(embed_dim, embed_dim, bias=True, cfg=cfg)
        self.v_proj = QuantLinear(embed_dim, embed_dim, bias=True, cfg=cfg)
        self.q_proj = QuantLinear(embed_dim, embed_dim, bias=True, cfg=cfg)
        self.out_proj = QuantLinear(embed_dim, embed_dim, bias=True, cfg=cfg)
        if cfg.quant_mode == "symmetric":
            self.q_act = QuantAct(cfg.act_bits, cfg)
            self.k_act = QuantAct(cfg.act_bits, cfg)
            self.v_act = QuantAct(cfg.act_bits, cfg)
            self.attn_act = QuantAct(cfg.act_bits, cfg)
        if cfg.quant_mode == "ternarybert":
            self.q_quant = DynamicActQuant(cfg.act_bits, cfg)
            self.k_quant = DynamicActQuant(cfg.act_bits, cfg)
            self.probs_quant = DynamicActQuant(cfg.act_bits, cfg)
            self.v_quant = DynamicActQuant(cfg.act_bits, cfg)
        self.softmax = IntSoftmax(cfg)

    def _heads(self, x: torch.Tensor, tgt_len: int, bsz: int) -> torch.Tensor:
        # T x B x C -> B x H x T x D
        return x.contiguous().view(tgt_len, bsz, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(
        self,
        x: torch.Tensor,
        scale: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor],
        need_scores: bool = False,
    ) -> Tuple[QTensor, Optional[torch.Tensor]]:
        """Attention over ``x`` (T x B x C).

        Returns:
            ``((out, out_scale), scores)``: the out_proj output (integer accumulator with per-channel scale in
            symmetric mode, real otherwise) and, when ``need_scores`` (distillation), the real-valued pre-softmax
            scores (B x H x T x T, padded keys -inf); otherwise None (not built).
        """
        tgt_len, bsz, _ = x.shape
        symmetric = self.cfg.quant_mode == "symmetric"
        q, s_q = self.q_proj(x, scale)
        k, s_k = self.k_proj(x, scale)
        v, s_v = self.v_proj(x, scale)
        if symmetric:
            q, s_q = self.q_act(q, s_q)
            k, s_k = self.k_act(k, s_k)
            v, s_v = self.v_act(v, s_v)
        elif self.cfg.quant_mode == "ternarybert":
            q, k, v = self.q_quant(q)[0], self.k_quant(k)[0], self.v_quant(v)[0]
        if not symmetric:
            q = q * self.scaling
        q, k, v = self._heads(q, tgt_len, bsz), self._heads(k, tgt_len, bsz), self._heads(v, tgt_len, bsz)

        if symmetric:  # exact integer GEMMs at every allowed activation width (float32 chunks < 2^24)
            scores = exact_int_matmul(q, k, a_bits=self.cfg.act_bits, b_bits=self.cfg.act_bits)
            s_scores = score_scale(s_q, s_k, self.head_dim)
        else:
            scores, s_scores = torch.matmul(q, k.transpose(-1, -2)), None
        pad = key_padding_mask[:, None, None, :].to(torch.bool) if key_padding_mask is not None else None
        if symmetric:
            probs, s_probs = self.softmax(scores, s_scores, key_padding_mask)
            real_scores = _real(scores, s_scores) if need_scores else None
            if need_scores and pad is not None:
                real_scores = real_scores.masked_fill(pad, float("-inf"))
        else:  # one masked copy of the B x H x T x T scores serves the softmax and the distillation alike
            if pad is not None:
                scores = scores.masked_fill(pad, float("-inf"))
            probs, s_probs = self.softmax(scores)
            real_scores = scores if need_scores else None
        probs = _dropout_carrier(probs, self.attention_dropout, self.training)
        if self.cfg.quant_mode == "ternarybert":
            probs, v = self.probs_quant(probs)[0], v
        if s_probs is None and s_v is not None:
            v, s_v = v * s_v, None
        elif s_probs is None:
            probs = probs.type_as(v)
        if s_probs is not None and s_v is not None:  # unsigned probabilities: |p| <= n(out_bits + 1)
            ctx = exact_int_matmul(probs, v.transpose(-1, -2), a_bits=self.softmax.out_bits + 1,
                                   b_bits=self.cfg.act_bits)
            s_ctx = context_scale(s_probs, s_v)
        else:
            ctx, s_ctx = torch.matmul(probs, v), None  # B x H x T x D
        ctx = ctx.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)
        if symmetric:
            ctx, s_ctx = self.attn_act(ctx, s_ctx)
        return self.out_proj(ctx, s_ctx), real_scores

    @torch.no_grad()
    def int_form(self, scale: torch.Tensor) -> dict:
        """Integer constants of the symmetric forward for the per-tensor input scale ``scale``, from the modules'
        own ``int_form`` and the scale functions the forward calls: ``q_proj``/``k_proj``/``v_proj``/``out_proj``
        (:class:`LinearIntForm`), ``q_act``/``k_act``/``v_act``/``attn_act`` (:class:`ActIntForm`), ``s_scores``,
        ``softmax`` (:class:`SoftmaxIntForm`) and ``s_ctx_in`` (the context accumulator scale)."""
        f = {n: getattr(self, n).int_form(scale) for n in ("q_proj", "k_proj", "v_proj")}
        for n in ("q", "k", "v"):
            f[f"{n}_act"] = getattr(self, f"{n}_act").int_form(f[f"{n}_proj"].s_acc)
        f["s_scores"] = score_scale(f["q_act"].s_out, f["k_act"].s_out, self.head_dim)
        f["softmax"] = self.softmax.int_form(f["s_scores"])
        f["s_ctx_in"] = context_scale(f["softmax"].s_out, f["v_act"].s_out)
        f["attn_act"] = self.attn_act.int_form(f["s_ctx_in"])
        f["out_proj"] = self.out_proj.int_form(f["attn_act"].s_out)
        return f


class QuantEncoderLayer(nn.Module):
    """Post-LN transformer encoder layer with fairseq ``TransformerEncoderLayer`` parameter names.

    In symmetric mode it implements the integer wiring of ``docs/integer_spec.md``: input (8-bit) -> attention ->
    22-bit residual sum -> IntLayerNorm -> 8-bit -> FC1 (32-bit accumulator) -> i-GELU -> 8-bit -> FC2 -> 22-bit
    residual sum -> IntLayerNorm, returning the integer output with its per-channel scale.
    """

    def __init__(self, args, cfg: QuantConfig):
        super().__init__()
        self.cfg = cfg
        dim = args.encoder_embed_dim
        self.dropout = args.dropout
        self.activation_dropout = getattr(args, "activation_dropout", 0.0) or 0.0
        if getattr(args, "encoder_normalize_before", False):
            raise ConfigError("ibert_roberta supports post-LN encoders only (encoder_normalize_before=False)")
        if getattr(args, "activation_fn", "gelu") != "gelu":
            raise ConfigError(f"ibert_roberta needs activation_fn gelu, got {args.activation_fn}")
        self.self_attn = QuantSelfAttention(dim, args.encoder_attention_heads, args.attention_dropout, cfg)
        self.self_attn_layer_norm = IntLayerNorm(dim, cfg=cfg)
        self.fc1 = QuantLinear(dim, args.encoder_ffn_embed_dim, bias=True, cfg=cfg)
        self.fc2 = QuantLinear(args.encoder_ffn_embed_dim, dim, bias=True, cfg=cfg)
        self.final_layer_norm = IntLayerNorm(dim, cfg=cfg)
        self.gelu = IntGELU(cfg)
        if cfg.quant_mode == "symmetric":
            self.input_act = QuantAct(cfg.act_bits, cfg)
            self.attn_residual_act = QuantAct(cfg.residual_bits, cfg)
            self.fc1_act = QuantAct(cfg.act_bits, cfg)
            self.fc2_act = QuantAct(cfg.act_bits, cfg)
            self.ffn_residual_act = QuantAct(cfg.residual_bits, cfg)

    def upgrade_state_dict_named(self, state_dict, name):
        """Rename fairseq's legacy ``layer_norms.{0,1}`` keys, as ``TransformerEncoderLayer`` does."""
        for old, new in (("0", "self_attn_layer_norm"), ("1", "final_layer_norm")):
            for param in ("weight", "bias"):
                key = f"{name}.layer_norms.{old}.{param}"
                if key in state_dict:
                    state_dict[f"{name}.{new}.{param}"] = state_dict.pop(key)

    def forward(
        self, x: torch.Tensor, scale: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
        need_scores: bool = False,
    ) -> Tuple[QTensor, Optional[torch.Tensor]]:
        """Args: ``x`` T x B x C (integer with ``scale`` in symmetric mode, real otherwise).

        Returns ``((x, scale), scores)`` with the real pre-softmax attention scores for distillation when
        ``need_scores`` (else None).
        """
        if self.cfg.quant_mode == "symmetric":
            return self._forward_integer(x, scale, key_padding_mask, need_scores)
        return self._forward_float(_real(x, scale), key_padding_mask, need_scores)

    def _forward_float(self, x, key_padding_mask, need_scores=False):
        residual = x
        (x, _), scores = self.self_attn(x, None, key_padding_mask, need_scores)
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = self.self_attn_layer_norm(residual + x, None)[0]
        residual = x
        x = self.gelu(*self.fc1(x, None))[0]
        x = F.dropout(x, p=self.activation_dropout, training=self.training)
        x = self.fc2(x, None)[0]
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = self.final_layer_norm(residual + x, None)[0]
        return (x, None), scores

    def _forward_integer(self, x, scale, key_padding_mask, need_scores=False):
        x, scale = self.input_act(x, scale)
        residual, residual_scale = x, scale
        (x, scale), scores = self.self_attn(x, scale, key_padding_mask, need_scores)
        x = _dropout_carrier(x, self.dropout, self.training)
        x, scale = self.attn_residual_act(x, scale, identity=residual, identity_scale=residual_scale)
        x, scale = self.self_attn_layer_norm(x, scale)
        x, scale = self.fc1_act(x, scale)
        residual, residual_scale = x, scale
        x, scale = self.gelu(*self.fc1(x, scale))
        x = _dropout_carrier(x, self.activation_dropout, self.training)
        x, scale = self.fc2_act(x, scale)
        x, scale = self.fc2(x, scale)
        x = _dropout_carrier(x, self.dropout, self.training)
        x, scale = self.ffn_residual_act(x, scale, identity=residual, identity_scale=residual_scale)
        x, scale = self.final_layer_norm(x, scale)
        return (x, scale), scores

    @torch.no_grad()
    def int_form(self, scale: torch.Tensor) -> dict:
        """Integer constants of :meth:`_forward_integer` for the incoming scale (``(C,)`` from the previous
        LayerNorm), keyed by module name (``self_attn`` holds :meth:`QuantSelfAttention.int_form`); ``"s_out"`` is
        the layer's output scale."""
        f = {"input_act": self.input_act.int_form(scale)}
        s_x = f["input_act"].s_out
        f["self_attn"] = att = self.self_attn.int_form(s_x)
        f["attn_residual_act"] = self.attn_residual_act.int_form(att["out_proj"].s_acc, s_x)
        f["self_attn_layer_norm"] = self.self_attn_layer_norm.int_form()
        f["fc1_act"] = self.fc1_act.int_form(f["self_attn_layer_norm"].s_out)
        s_h = f["fc1_act"].s_out
        f["fc1"] = self.fc1.int_form(s_h)
        f["gelu"] = self.gelu.int_form(f["fc1"].s_acc)
        f["fc2_act"] = self.fc2_act.int_form(f["gelu"].s_out)
        f["fc2"] = self.fc2.int_form(f["fc2_act"].s_out)
        f["ffn_residual_act"] = self.ffn_residual_act.int_form(f["fc2"].s_acc, s_h)
        f["final_layer_norm"] = self.final_layer_norm.int_form()
        f["s_out"] = f["final_layer_norm"].s_out
        return f


class QuantPositionalEmbedding(QuantEmbedding):
    """Learned positions (fairseq ``LearnedPositionalEmbedding`` layout: rows start at ``padding_idx + 1``).

    8-bit in the I-BERT dataflow; TernaryBERT keeps position embeddings in float (its spec, section 3).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int, cfg: QuantConfig):
        if cfg.quant_mode == "ternarybert":
            cfg = dataclasses.replace(cfg, quant_mode="none")
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, cfg=cfg)
        self.max_positions = num_embeddings - padding_idx - 1

    def forward(self, tokens: torch.Tensor) -> QTensor:  # type: ignore[override]
        positions = utils.make_positions(tokens, self.padding_idx)
        return super().forward(positions)


class QuantTransformerEncoder(TransformerEncoder):
    """fairseq ``TransformerEncoder`` whose embeddings, layers and LayerNorm are quantization-aware."""

    def __init__(self, args, dictionary, embed_tokens, cfg: QuantConfig):
        self.qcfg = cfg
        # fairseq hands build_encoder_layer a TransformerConfig; the layer reads the flat argparse names instead.
        self.layer_args = args
        super().__init__(args, dictionary, embed_tokens)
        if self.embed_positions is None or not getattr(args, "encoder_learned_pos", True):
            raise ConfigError("ibert_roberta needs learned positional embeddings")
        if self.layernorm_embedding is None:
            raise ConfigError("ibert_roberta needs the embedding LayerNorm (layernorm_embedding=True)")
        if self.embed_scale != 1.0:
            raise ConfigError("ibert_roberta needs no_scale_embedding=True (RoBERTa does not scale embeddings)")
        old = self.embed_positions
        self.embed_positions = QuantPositionalEmbedding(old.num_embeddings, old.embedding_dim, old.padding_idx, cfg)
        dim = embed_tokens.embedding_dim
        self.layernorm_embedding = IntLayerNorm(dim, cfg=cfg)
        if cfg.quant_mode == "symmetric":
            self.embed_act = QuantAct(cfg.embed_act_bits, cfg)

    def build_encoder_layer(self, cfg):
        return QuantEncoderLayer(self.layer_args, self.qcfg)

    @torch.no_grad()
    def int_form(self) -> dict:
        """Integer constants of the symmetric-mode encoder: ``embed_tokens`` / ``embed_positions`` (int8 tables
        and scales), ``embed_act`` (:class:`ActIntForm`, tokens with positions as identity),
        ``layernorm_embedding`` (:class:`LayerNormIntForm`) and ``layers`` (:meth:`QuantEncoderLayer.int_form`,
        each fed the previous output scale)."""
        if not self.qcfg.symmetric:
            raise ValueError(f"int_form needs quant_mode symmetric, got {self.qcfg.quant_mode!r}")
        f = {"embed_tokens": self.embed_tokens.int_form(), "embed_positions": self.embed_positions.int_form()}
        f["embed_act"] = self.embed_act.int_form(f["embed_tokens"][1], f["embed_positions"][1])
        f["layernorm_embedding"] = self.layernorm_embedding.int_form()
        scale, f["layers"] = f["layernorm_embedding"].s_out, []
        for layer in self.layers:
            f["layers"].append(layer.int_form(scale))
            scale = f["layers"][-1]["s_out"]
        return f

    def forward(  # type: ignore[override]
        self,
        src_tokens: torch.Tensor,
        src_lengths: Optional[torch.Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[torch.Tensor] = None,
        return_attn_scores: bool = False,
    ):
        """Encode ``src_tokens`` (B x T).

        Returns fairseq's encoder dict plus ``encoder_scale`` (the final per-channel scale in symmetric mode, else
        None) and ``attn_scores`` (list of real pre-softmax scores per layer when ``return_attn_scores``).
        """
        if token_embeddings is not None:
            raise ValueError("ibert_roberta does not support precomputed token_embeddings")
        padding_mask = src_tokens.eq(self.padding_idx)
        # Always masked (a no-op without padding) so forward never syncs with the host to ask whether pads exist.
        key_padding_mask = padding_mask
        x, scale = self._embed(src_tokens, padding_mask)
        x = x.transpose(0, 1)
        states: List[torch.Tensor] = []
        scores: List[torch.Tensor] = []
        if return_all_hiddens:
            states.append(_real(x, scale))
        for layer in self.layers:
            (x, scale), layer_scores = layer(x, scale, key_padding_mask, return_attn_scores)
            if return_all_hiddens:
                states.append(_real(x, scale))
            if return_attn_scores:
                scores.append(layer_scores)
        out = _real(x, scale)
        src_lengths = src_tokens.ne(self.padding_idx).sum(dim=1, dtype=torch.int32).reshape(-1, 1)
        return {
            "encoder_out": [out],
            "encoder_padding_mask": [padding_mask],
            "encoder_embedding": [],
            "encoder_states": states,
            "fc_results": [],
            "src_tokens": [],
            "src_lengths": [src_lengths],
            "encoder_scale": scale,
            "attn_scores": scores,
        }

    def _embed(self, src_tokens: torch.Tensor, padding_mask: torch.Tensor) -> QTensor:
        tok, s_tok = self.embed_tokens(src_tokens)
        pos, s_pos = self.embed_positions(src_tokens)
        if self.qcfg.quant_mode == "symmetric":
            x, scale = self.embed_act(tok, s_tok, identity=pos, identity_scale=s_pos)
        else:
            x, scale = _real(tok, s_tok) + _real(pos, s_pos), None
        x, scale = self.layernorm_embedding(x, scale)
        x = _dropout_carrier(x, self.dropout_module.p, self.training)
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        return x, scale


class QuantRobertaEncoder(RobertaEncoder):
    """RoBERTa encoder (embeddings, transformer, LM head) built from quantization-aware modules."""

    def __init__(self, args, dictionary):
        self.qcfg = QuantConfig.from_namespace(args)
        super().__init__(args, dictionary)

    def build_embedding(self, vocab_size, embedding_dim, padding_idx):
        return QuantEmbedding(vocab_size, embedding_dim, padding_idx=padding_idx, cfg=self.qcfg)

    def build_encoder(self, args, dictionary, embed_tokens):
        encoder = QuantTransformerEncoder(args, dictionary, embed_tokens, self.qcfg)
        encoder.apply(init_bert_params)
        return encoder

    def forward(
        self,
        src_tokens,
        features_only=False,
        return_all_hiddens=False,
        masked_tokens=None,
        return_attn_scores=False,
        **unused,
    ):
        x, extra = self.extract_features(
            src_tokens, return_all_hiddens=return_all_hiddens, return_attn_scores=return_attn_scores
        )
        if not features_only:
            x = self.output_layer(x, masked_tokens=masked_tokens)
        return x, extra

    def extract_features(self, src_tokens, return_all_hiddens=False, return_attn_scores=False, **kwargs):
        encoder_out = self.sentence_encoder(
            src_tokens, return_all_hiddens=return_all_hiddens, return_attn_scores=return_attn_scores
        )
        features = encoder_out["encoder_out"][0].transpose(0, 1)
        extra = {"inner_states": encoder_out["encoder_states"] if return_all_hiddens else None}
        if return_attn_scores:
            extra["attn_scores"] = encoder_out["attn_scores"]
        return features, extra


class QuantClassificationHead(RobertaClassificationHead):
    """RoBERTa sentence head; in TernaryBERT mode its ``dense`` (BERT's pooler) is quantized, ``out_proj`` stays
    float."""

    def __init__(self, input_dim, inner_dim, num_classes, activation_fn, pooler_dropout, cfg: QuantConfig):
        super().__init__(input_dim, inner_dim, num_classes, activation_fn, pooler_dropout)
        if cfg.quant_mode == "ternarybert":
            dense = QuantLinear(input_dim, inner_dim, bias=True, cfg=cfg)
            dense.load_state_dict(self.dense.state_dict(), strict=False)
            self.dense = dense

    def forward(self, features, **kwargs):
        x = features[:, 0, :]
        x = self.dropout(x)
        x = self.dense(x)
        if isinstance(x, tuple):
            x = _real(*x)
        x = self.activation_fn(x)
        x = self.dropout(x)
        return self.out_proj(x)


@register_model("ibert_roberta")
class IBertRobertaModel(RobertaModel):
    """RoBERTa with I-BERT integer-only or TernaryBERT quantization (``--quant-mode``)."""

    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        parser.add_argument("--quant-mode", choices=list(QUANT_MODES), default="none",
                            help="none: full precision; symmetric: I-BERT integer-only; ternarybert: TernaryBERT "
                                 "fake quantization")
        parser.add_argument("--force-dequant", choices=list(FORCE_DEQUANT),
                            default="none", help="keep these nonlinear ops in float in symmetric mode")
        parser.add_argument("--weight-bits", type=int, default=8,
                            help="weight bit-width: 8 (I-BERT), 7 (fast exact CPU kernels), 2 = ternary")
        parser.add_argument("--weight-quant-method", choices=list(WEIGHT_METHODS), default=None,
                            help="weight quantizer (default: twn for --weight-bits 2, sym otherwise)")
        parser.add_argument("--input-bits", type=int, default=8, help="activation bit-width")
        parser.add_argument("--clip-val", type=float, default=2.5,
                            help="TernaryBERT clipping range for weights and activations")
        parser.add_argument("--act-range", choices=list(ACT_RANGES), default="symmetric",
                            help="TernaryBERT activation quantizer: symmetric max or min-max")
        parser.add_argument("--ternary-linear", choices=list(TERNARY_GRANULARITIES), default="tensor",
                            help="ternary (twn/lat) Linear weights: one alpha per matrix (tensor, TernaryBERT) or "
                                 "one per output row (row)")
        parser.add_argument("--nonlinear-constants", choices=list(NONLINEAR_CONSTANT_SETS), default="paper",
                            help="i-GELU / i-exp coefficients: paper (I-BERT's) or refit")
        parser.add_argument("--ln-var-bits", type=int, default=LN_VAR_BITS_DEFAULT,
                            help="IntLayerNorm variance bound in bits: training grows the LayerNorm shift so that "
                                 "the sum of squares stays below 2^N (52: exact; 32: I-BERT upstream)")

    @classmethod
    def build_model(cls, args, task):
        from omegaconf import OmegaConf

        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, False)
        ibert_base_architecture(args)
        if not hasattr(args, "max_positions"):
            if not hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        encoder = QuantRobertaEncoder(args, task.source_dictionary)
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, True)
        return cls(args, encoder)

    @property
    def quant_config(self) -> QuantConfig:
        return self.encoder.qcfg

    def forward(self, src_tokens, features_only=False, return_all_hiddens=False, classification_head_name=None,
                return_attn_scores=False, **kwargs):
        if classification_head_name is not None:
            features_only = True
        x, extra = self.encoder(src_tokens, features_only, return_all_hiddens,
                                return_attn_scores=return_attn_scores, **kwargs)
        if classification_head_name is not None:
            x = self.classification_heads[classification_head_name](x)
        return x, extra

    def register_classification_head(self, name, num_classes=None, inner_dim=None, **kwargs):
        if name in self.classification_heads:
            prev_num_classes = self.classification_heads[name].out_proj.out_features
            prev_inner_dim = self.classification_heads[name].dense.out_features
            if num_classes != prev_num_classes or inner_dim != prev_inner_dim:
                logger.warning(
                    're-registering head "%s" with num_classes %s (prev: %s) and inner_dim %s (prev: %s)',
                    name, num_classes, prev_num_classes, inner_dim, prev_inner_dim,
                )
        self.classification_heads[name] = QuantClassificationHead(
            input_dim=self.args.encoder_embed_dim,
            inner_dim=inner_dim or self.args.encoder_embed_dim,
            num_classes=num_classes,
            activation_fn=self.args.pooler_activation_fn,
            pooler_dropout=self.args.pooler_dropout,
            cfg=self.quant_config,
        )

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        # Quantization state is new relative to fp checkpoints: fill missing *buffers* with their initial values
        # (ranges start uninitialised and are set by the first training batch). Missing parameters stay errors.
        prefix = name + "." if name != "" else ""
        params = {n for n, _ in self.named_parameters()}
        filled = 0
        for key, value in self.state_dict().items():
            if key in params:
                continue
            if prefix + key not in state_dict:
                state_dict[prefix + key] = value
                filled += 1
        if filled:
            logger.info("initialised %d quantization buffers missing from the checkpoint", filled)


def ibert_base_architecture(args):
    args.quant_mode = getattr(args, "quant_mode", "none")
    args.force_dequant = getattr(args, "force_dequant", "none")
    args.weight_bits = getattr(args, "weight_bits", 8)
    args.weight_quant_method = getattr(args, "weight_quant_method", None)
    args.input_bits = getattr(args, "input_bits", 8)
    args.clip_val = getattr(args, "clip_val", 2.5)
    args.act_range = getattr(args, "act_range", "symmetric")
    args.ternary_linear = getattr(args, "ternary_linear", "tensor")
    args.nonlinear_constants = getattr(args, "nonlinear_constants", "paper")
    args.ln_var_bits = getattr(args, "ln_var_bits", LN_VAR_BITS_DEFAULT)
    base_architecture(args)


@register_model_architecture("ibert_roberta", "ibert_roberta")
def ibert_roberta_architecture(args):
    ibert_base_architecture(args)


@register_model_architecture("ibert_roberta", "ibert_roberta_base")
def ibert_roberta_base_architecture(args):
    ibert_base_architecture(args)


@register_model_architecture("ibert_roberta", "ibert_roberta_large")
def ibert_roberta_large_architecture(args):
    args.encoder_layers = getattr(args, "encoder_layers", 24)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 1024)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 4096)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 16)
    ibert_base_architecture(args)


@register_model_architecture("ibert_roberta", "ibert_roberta_minilm")
def ibert_roberta_minilm_architecture(args):
    """all-MiniLM-L6-v2 shape (6 layers, 384 hidden, 12 heads, FFN 1536, 512 positions), post-LN."""
    args.encoder_layers = getattr(args, "encoder_layers", 6)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 384)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 1536)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 12)
    args.max_positions = getattr(args, "max_positions", 512)
    ibert_base_architecture(args)


@register_model_architecture("ibert_roberta", "ibert_roberta_tiny")
def ibert_roberta_tiny_architecture(args):
    """2 layers, 64 hidden, 4 heads, FFN 128: for tests."""
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    ibert_base_architecture(args)

