"""`describe(config)`: a family (quant.arch.families) combined with one config's values: what every consumer of a
model's structure reads (the block walker, the fast path, GGUF export, the merge, LoRA target resolution).

transformers is imported where it is used (AutoConfig fills a config.json's missing defaults and converts older
layouts): the quant CLI imports this module for `quant --help`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from quant.arch.families import FAMILIES, WRAPPERS
from quant.arch.parts import Family, Wrapper
from quant.errors import UserError

FULL, SLIDING = "full_attention", "sliding_attention"


def supported() -> str:
    """The supported architectures, for messages: family titles and their classes."""
    classes = [c for f in FAMILIES for c in f.classes] + [c for w in WRAPPERS for c in w.classes]
    return ", ".join(classes)


def _as_dict(config: Any) -> dict:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"describe() takes a config or a config.json dict, not {type(config).__name__}")


def _family(model_type: str | None, classes: list[str]) -> Family | None:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    return next((f for f in FAMILIES if set(classes) & set(f.classes)), None)


def _identify(cfg: dict) -> tuple[Family, Wrapper | None, dict, str]:
    model_type, classes = cfg.get("model_type"), list(cfg.get("architectures") or [])
    wrapper = next((w for w in WRAPPERS if model_type == w.model_type or set(classes) & set(w.classes)), None)
    text = cfg
    if wrapper is not None:
        text = cfg.get("text_config")
        if not isinstance(text, Mapping):
            raise UserError(f"config.json: {wrapper.classes[0]} without a text_config")
        text = dict(text)
    family = _family(text.get("model_type"), [] if wrapper else classes)
    if family is None:
        what = ", ".join(classes) or f"model_type {model_type!r}"
        inner = f" (text model_type {text.get('model_type')!r})" if wrapper else ""
        raise UserError(f"config.json: architecture {what}{inner} is not supported; supported: {supported()}")
    hf_class = (wrapper.classes[0] if wrapper else
                next((c for c in classes if c in family.classes), family.classes[0]))
    return family, wrapper, text, hf_class


def _text_config(text: dict, family: Family):
    from transformers import AutoConfig

    values = {k: v for k, v in text.items() if k != "model_type"}
    return AutoConfig.for_model(text.get("model_type") or family.model_types[0], **values)


@dataclass(frozen=True)
class Architecture:
    """One model's structure: its family's parts (`family.attention`, `.mlp`, `.experts`, `.router`, `.norms`)
    and the config's values. Module paths: `decoder` is the decoder model (embeddings, blocks, final norm),
    `blocks` its list of decoder blocks; part paths in the family are relative to a block."""

    family: Family
    hf_class: str
    config: Any  # the text model's transformers config
    wrapper: Wrapper | None
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate: int
    vocab: int
    layer_types: tuple[str, ...]
    sliding_window: int | None
    rotary_dim: int
    tied: bool
    softmax_scale: float
    embed_scale: float
    final_softcap: float | None
    attn_softcap: float | None
    n_experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    renormalize: bool = False
    moe_layers: tuple[bool, ...] = ()

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def decoder(self) -> str:
        return self.wrapper.decoder if self.wrapper else "model"

    @property
    def blocks(self) -> str:
        return f"{self.decoder}.layers"

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    def block(self, i: int) -> str:
        """The module path of decoder block i."""
        return f"{self.blocks}.{i}"

    def layer_type(self, i: int) -> str:
        return self.layer_types[i]

    def window(self, i: int) -> int | None:
        """The attention window of block i (None: full causal attention)."""
        return self.sliding_window if self.layer_types[i] == SLIDING else None

    def rope(self, layer_type: str = FULL) -> dict:
        """The rope parameters of a layer type (rope_theta, rope_type, scaling keys), from either layout: one dict
        for every layer, or one per layer type (Gemma 3)."""
        params = dict(getattr(self.config, "rope_parameters", None) or {})
        if layer_type in params and isinstance(params[layer_type], Mapping):
            params = dict(params[layer_type])
        elif any(isinstance(v, Mapping) for v in params.values()):
            params = dict(next(v for v in params.values() if isinstance(v, Mapping)))
        params.setdefault("rope_theta", getattr(self.config, "rope_theta", None) or 10000.0)
        params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
        return params

    def linear_names(self, i: int | None = None) -> tuple[str, ...]:
        """The leaf names of the nn.Linear projections of a block (of block i: a dense MLP's only where block i has
        one), attention first. The router and 3-D expert parameters are never among them."""
        att, mlp = self.family.attention, self.family.mlp
        dense = mlp is not None and (i is None or not self.moe_layers[i])
        return att.projections + (mlp.projections if dense else ())

    def part(self, i: int, path: str) -> str:
        """The full module path of a block part (`path` relative to the block), e.g. part(3, 'mlp.experts')."""
        return f"{self.block(i)}.{path}"

    def to_memory(self, key: str) -> str:
        """A checkpoint key as transformers writes it -> the model's own (state_dict) name; expert stacks aside
        (quant.arch.layout)."""
        if self.wrapper:
            for disk, memory in self.wrapper.disk:
                if key.startswith(disk):
                    key = memory + key[len(disk):]
                    break
        for disk, memory in self.family.disk_renames:
            key = key.replace(disk, memory)
        return key

    def to_disk(self, key: str) -> str:
        """The inverse of to_memory: the name transformers' save_pretrained gives a state_dict key."""
        for disk, memory in self.family.disk_renames:
            key = key.replace(memory, disk)
        if self.wrapper:
            for disk, memory in self.wrapper.disk:
                if key.startswith(memory):
                    return disk + key[len(memory):]
        return key

    def is_text(self, key: str) -> bool:
        """Whether a checkpoint key (either naming) belongs to the text model (not a vision tower or projector)."""
        return not (self.wrapper and key.startswith(self.wrapper.other))


def _moe_layers(family: Family, c, n_layer: int) -> tuple[bool, ...]:
    if family.experts is None:
        return (False,) * n_layer
    step = getattr(c, "decoder_sparse_step", 1) or 1
    dense = set(getattr(c, "mlp_only_layers", None) or ())
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layer))


def describe(config: Any) -> Architecture:
    """The Architecture of a transformers config or a config.json dict; an architecture we do not know is refused
    in one line naming it and listing the supported ones."""
    top = _as_dict(config)
    family, wrapper, text, hf_class = _identify(top)
    c = _text_config(text, family)
    # A multimodal class ties its head by its own config's flag (transformers' default for Gemma 3 and Mistral 3:
    # True), not text_config's.
    tied = top.get("tie_word_embeddings", True) if wrapper else getattr(c, "tie_word_embeddings", False)
    n_layer, hidden, n_head = c.num_hidden_layers, c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // n_head
    window = getattr(c, "sliding_window", None)
    # Without layer_types (Mistral, Phi-3, Mixtral, ...) a configured window applies to every layer.
    layer_types = tuple(getattr(c, "layer_types", None) or (SLIDING if window else FULL,) * n_layer)
    window = window if SLIDING in layer_types else None
    partial = getattr(c, "partial_rotary_factor", None) or \
        (getattr(c, "rope_parameters", None) or {}).get("partial_rotary_factor") or 1.0
    scale = (c.query_pre_attn_scalar if family.attention.scale == "query_pre_attn_scalar" else head_dim) ** -0.5
    experts = family.experts is not None
    router = family.router
    n_experts = (getattr(c, "num_experts", None) or getattr(c, "num_local_experts", 0)) if experts else 0
    renormalize = bool(router and (router.always_renormalize or
                                   (router.renormalize and getattr(c, router.renormalize, False))))
    return Architecture(
        family=family, hf_class=hf_class, config=c, wrapper=wrapper, n_layer=n_layer, hidden=hidden, n_head=n_head,
        n_kv_head=getattr(c, "num_key_value_heads", None) or n_head, head_dim=head_dim,
        intermediate=c.intermediate_size, vocab=c.vocab_size, layer_types=layer_types, sliding_window=window,
        rotary_dim=int(head_dim * partial), tied=bool(tied),
        softmax_scale=scale, embed_scale=math.sqrt(hidden) if family.embed_scale else 1.0,
        # the multimodal classes apply no final soft-cap to their logits (transformers 5.24), whatever text_config says
        final_softcap=None if wrapper else getattr(c, "final_logit_softcapping", None),
        attn_softcap=getattr(c, "attn_logit_softcapping", None),
        n_experts=n_experts, top_k=getattr(c, "num_experts_per_tok", 0) if experts else 0,
        expert_intermediate=(getattr(c, "moe_intermediate_size", None) or c.intermediate_size) if experts else 0,
        renormalize=renormalize, moe_layers=_moe_layers(family, c, n_layer))
