"""The parts of one decoder block, as a family names and computes them (transformers 5 module names, relative to
the block unless said otherwise). A family (quant.arch.families) is a choice of one of each; nothing here reads a
config: `quant.arch.describe` combines a family with a config's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Activations of the gated MLPs, by what they compute: act(gate) * up.
SILU, GELU_TANH = "silu", "gelu_pytorch_tanh"
# gpt-oss: gate.clamp(max=limit) * sigmoid(alpha * gate) * (up.clamp(-limit, limit) + 1), alpha/limit from config.
CLAMPED_SWIGLU = "clamped_swiglu"

# Router rules: which top-k experts a token goes to and with what weight.
SOFTMAX_TOPK = "softmax_topk"  # softmax over all experts (fp32), top-k, then renormalised if `renormalize`
TOPK_SOFTMAX = "topk_softmax"  # top-k of the logits, softmax over the k picked (gpt-oss)

# How llama.cpp rotates q/k: NORM takes interleaved pairs (HF's halves need a per-head row permutation when written
# to GGUF), NEOX takes halves as HF does.
ROPE_NORM, ROPE_NEOX = "norm", "neox"


@dataclass(frozen=True)
class Attention:
    """The attention module (`path`) and its projections.

    `qkv`: a fused projection whose output rows are q | k | v (heads·hd, kv·hd, kv·hd), instead of q/k/v.
    `q_norm`/`k_norm`: RMSNorms over head_dim applied per head to q and k before the rotary embedding.
    `sinks`: a per-head learned logit that joins the softmax and is dropped after it (gpt-oss).
    `scale`: the softmax scale is head_dim**-0.5, or query_pre_attn_scalar**-0.5 ("query_pre_attn_scalar").
    `query_position_scale`: after the rotary embedding, q is multiplied by 1 + beta·log(1 + floor(pos / orig))
    with beta and orig from the rope parameters ("llama4": Ministral 3).
    """

    path: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    sinks: str | None = None
    scale: str = "head_dim"
    query_position_scale: str | None = None

    @property
    def projections(self) -> tuple[str, ...]:
        """The Linear leaf names, input projections first."""
        return (self.qkv, self.o) if self.qkv else (self.q, self.k, self.v, self.o)


@dataclass(frozen=True)
class MLP:
    """A dense gated MLP: down(act(gate(x)) * up(x)); `gate_up` is a fused projection whose first half of output
    rows is gate, second half up (Phi-3)."""

    path: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None
    activation: str = SILU

    @property
    def projections(self) -> tuple[str, ...]:
        return (self.gate_up, self.down) if self.gate_up else (self.gate, self.up, self.down)


@dataclass(frozen=True)
class Experts:
    """A stack of E expert MLPs held as 3-D parameters of one module at `path` (relative to the block).

    gate_up [E, 2I, H] (or [E, H, 2I] when `transposed`: used as x @ W) holds gate then up along its output
    dimension, or gate/up alternating (`interleaved`, gpt-oss); down [E, H, I] ([E, I, H] when transposed).
    `gate_up_bias`/`down_bias`: [E, 2I] / [E, H] parameter names, or None.

    On disk (`disk`): None when the checkpoint stores the fused parameters as they are (gpt-oss); else one Linear
    per expert, `<disk_path>.<e>.<gate|up|down>.weight` with names `disk` = (gate, up, down) under `disk_path`
    (relative to the block).
    """

    path: str = "mlp.experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None
    activation: str = SILU
    disk_path: str = "mlp.experts"
    disk: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")

    @property
    def parameters(self) -> tuple[str, ...]:
        """The parameter names of the experts module (weights, then biases)."""
        return tuple(n for n in (self.gate_up, self.down, self.gate_up_bias, self.down_bias) if n)


@dataclass(frozen=True)
class Router:
    """The router at `path` (relative to the block): `weight` [E, H] (and `bias` [E]) as plain parameters, not an
    nn.Linear; it stays in full precision and is never a LoRA target. `renormalize`: the config key that says
    whether the top-k weights are renormalised to sum to 1 (None: the rule fixes it; `always` below)."""

    path: str = "mlp.gate"
    weight: str = "weight"
    bias: str | None = None
    rule: str = SOFTMAX_TOPK
    renormalize: str | None = None
    always_renormalize: bool = False
    disk_path: str = "mlp.gate"


@dataclass(frozen=True)
class Norms:
    """The block's RMSNorms by role: before attention, after attention (before the residual add; Gemma), before
    the MLP, after the MLP (Gemma). `offset`: the norm multiplies by (offset + weight) (Gemma: 1.0, its weights
    start at 0). `final`: the decoder's last norm, relative to the decoder module."""

    attn_in: str = "input_layernorm"
    mlp_in: str = "post_attention_layernorm"
    attn_out: str | None = None
    mlp_out: str | None = None
    offset: float = 0.0
    final: str = "norm"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.attn_in, self.attn_out, self.mlp_in, self.mlp_out) if n)


@dataclass(frozen=True)
class Wrapper:
    """A multimodal class whose text part is a family: `text_config` holds that family's config, the decoder sits
    at `decoder` in memory; on disk (transformers' save) `disk` pairs (disk prefix, memory prefix) rename the
    text part's keys, and the keys under `other` (vision tower, projector) are not the text model's."""

    model_type: str
    classes: tuple[str, ...]
    decoder: str = "model.language_model"
    disk: tuple[tuple[str, str], ...] = (("language_model.model.", "model.language_model."),
                                         ("language_model.lm_head.", "lm_head."),
                                         ("vision_tower.", "model.vision_tower."),
                                         ("multi_modal_projector.", "model.multi_modal_projector."))
    other: tuple[str, ...] = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                              "multi_modal_projector.")


@dataclass(frozen=True)
class Family:
    """One model family: everything below is the same for every checkpoint of it (config values are read by
    `describe`).

    `model_types`/`classes`: transformers' model_type values and causal-LM class names it covers.
    `rope`: llama.cpp's rotation of this family (ROPE_NORM families get q/k rows permuted in GGUF).
    `embed_scale`: the embedding output is multiplied by sqrt(hidden_size) (Gemma).
    `gguf`: llama.cpp's architecture name, None where llama.cpp has none.
    `disk_renames`: (disk infix, memory infix) pairs of transformers' own checkpoint layout for this family
    (Mixtral's v4 names), applied to keys inside a block.
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    classes: tuple[str, ...]
    attention: Attention = field(default_factory=Attention)
    mlp: MLP | None = field(default_factory=MLP)
    experts: Experts | None = None
    router: Router | None = None
    norms: Norms = field(default_factory=Norms)
    rope: str = ROPE_NEOX
    embed_scale: bool = False
    gguf: str | None = None
    disk_renames: tuple[tuple[str, str], ...] = ()
