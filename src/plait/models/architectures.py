"""The registry of architectures: what plait knows about each model family, in one place.

Every strand reads it: pipeline parallel (where the layers, embeddings, final norm and
head live, what a stage computes before its first layer), tensor parallel (styles for
the modules a config's ``base_model_tp_plan`` does not cover), activation recomputation
(the layer list) and checkpoints (the names of the parts). An entry is a small table of
dotted module paths; stages call the model's own modules and transformers' own mask
builders, never a copy of a model's forward.

Adding a Hugging Face family is one entry here plus a line in the parity test's list of
tiny configs. An unknown family gets an error naming the entry to add.

Example:
    >>> arch = architecture_of(transformers.Qwen2ForCausalLM(config))
    >>> arch.layers, arch.embed, arch.norm
    ('model.layers', 'model.embed_tokens', 'model.norm')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_of",
    "find_architecture",
    "model_type_of",
    "present_paths",
    "suggested_entry",
    "unsplittable_reason",
]


@dataclass(frozen=True)
class Architecture:
    """Where one family keeps its parts and how a pipeline stage runs them.

    Paths are dotted module names inside the base model (``LlamaModel``), except ``head``,
    which is the task model's (``lm_head``); :func:`architecture_of` returns them from the
    root of the model at hand.

    First stage: ``embed(input_ids)``, then each of ``before_positions`` (OPT's
    ``project_in``), plus ``positions`` (learned position embeddings: called with the
    position ids, or with ``(attention_mask, 0, position_ids=...)`` when
    ``positions_from_mask``), then each of ``after_embed`` (embedding dropout). Every
    stage: its layers, each called as ``layer(hidden, attention_mask=..., position_ids=...,
    position_embeddings=rotary(hidden, positions), use_cache=False, **layer_kwargs)``.
    Last stage: ``norm``, each of ``after_norm`` (OPT's ``project_out``), ``head``, and
    the soft-capping of logits the model's forward applies (``logit_softcap`` names the
    config attribute). Paths of modules a config may leave out (``None`` attributes) are
    skipped. ``head`` is ``None`` for encoders whose output is the hidden states.
    """

    name: str  # "plait" or a Hugging Face model_type
    layers: str
    embed: str
    norm: str | None
    head: str | None = "lm_head"
    positions: str | None = None
    positions_from_mask: bool = False
    before_positions: tuple[str, ...] = ()
    after_embed: tuple[str, ...] = ()
    after_norm: tuple[str, ...] = ()
    rotary: str | None = None
    causal: bool = True
    layer_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    logit_softcap: str | None = None
    attention: str | None = None  # the attention module inside a layer: its head counts shrink under tp
    tp_styles: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # inside a layer -> style
    # config attribute -> why a pipeline stage cannot run the family when it is set
    pp_refusals: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    moe_block: str | None = None  # a layer's sparse-MoE block, which plait.models.use_plait_moe swaps for a MoELayer
    inputs: str = "input_ids"  # the batch key the first stage embeds ("pixel_values" for vision models)
    head_on_first_token: bool = False  # the head reads the first (class) token only, as ViT's classifier does

    @property
    def is_plait(self) -> bool:
        return self.name == "plait"

    def first_paths(self) -> list[str]:
        """Modules only the first stage runs, in call order."""
        return [self.embed, *self.before_positions, *([self.positions] if self.positions else []), *self.after_embed]

    def last_paths(self) -> list[str]:
        """Modules only the last stage runs, in call order."""
        return [*([self.norm] if self.norm else []), *self.after_norm, *([self.head] if self.head else [])]

    def shared_paths(self) -> list[str]:
        """Parameter-free modules every stage calls (rotary position embeddings)."""
        return [self.rotary] if self.rotary else []


_LLAMA_STYLES = MappingProxyType(
    {
        "self_attn.q_proj": "colwise",
        "self_attn.k_proj": "colwise",
        "self_attn.v_proj": "colwise",
        "self_attn.o_proj": "rowwise",
        "mlp.gate_proj": "colwise",
        "mlp.up_proj": "colwise",
        "mlp.down_proj": "rowwise",
    }
)

# Tensor-parallel styles when a config carries no base_model_tp_plan; names as in Hugging Face's plans.
_QWEN3_STYLES = MappingProxyType(
    {
        **_LLAMA_STYLES,
        "self_attn.q_norm": "replicated_with_grad_allreduce",  # per-head norms: each rank sees its own heads
        "self_attn.k_norm": "replicated_with_grad_allreduce",
    }
)
_PHI3_STYLES = MappingProxyType(
    {
        "self_attn.qkv_proj": "colwise",  # fused [q; k; v], split segment by segment
        "self_attn.o_proj": "rowwise",
        "mlp.gate_up_proj": "colwise",  # fused [gate; up]
        "mlp.down_proj": "rowwise",
    }
)


# Mixture-of-Experts families: tensor parallel splits attention only; the experts stay whole on every tp rank.
_ATTENTION_STYLES = MappingProxyType({k: v for k, v in _LLAMA_STYLES.items() if k.startswith("self_attn.")})
_QWEN3_ATTENTION_STYLES = MappingProxyType({k: v for k, v in _QWEN3_STYLES.items() if k.startswith("self_attn.")})


def _llama_like(
    name: str, tp_styles: Mapping[str, str] = _LLAMA_STYLES, *, moe_block: str | None = None
) -> Architecture:
    return Architecture(
        name,
        layers="layers",
        embed="embed_tokens",
        norm="norm",
        rotary="rotary_emb",
        attention="self_attn",
        tp_styles=tp_styles,
        moe_block=moe_block,
    )


_ENTRIES = (
    Architecture(
        "plait",
        layers="blocks",
        embed="embed",
        norm="norm_f",
        positions="pos_embed",
        after_embed=("drop",),
        attention="attn",
    ),
    *(_llama_like(name) for name in ("llama", "mistral", "qwen2", "gemma")),
    _llama_like("qwen3", _QWEN3_STYLES),
    _llama_like("phi3", _PHI3_STYLES),
    _llama_like("mixtral", _ATTENTION_STYLES, moe_block="mlp"),
    _llama_like("qwen2_moe", _ATTENTION_STYLES, moe_block="mlp"),
    _llama_like("qwen3_moe", _QWEN3_ATTENTION_STYLES, moe_block="mlp"),
    Architecture(
        "gemma2",
        layers="layers",
        embed="embed_tokens",
        norm="norm",
        rotary="rotary_emb",
        logit_softcap="final_logit_softcapping",
        attention="self_attn",
        tp_styles=_LLAMA_STYLES,
    ),
    Architecture(
        "gpt_neox",
        layers="layers",
        embed="embed_in",
        after_embed=("emb_dropout",),
        norm="final_layer_norm",
        rotary="rotary_emb",
        attention="attention",
        tp_styles=MappingProxyType(
            {
                "attention.query_key_value": "colwise",  # per-head [q k v] interleaved: a plain split keeps heads whole
                "attention.dense": "rowwise",
                "mlp.dense_h_to_4h": "colwise",
                "mlp.dense_4h_to_h": "rowwise",
            }
        ),
    ),
    Architecture(
        "opt",
        layers="decoder.layers",
        embed="decoder.embed_tokens",
        before_positions=("decoder.project_in",),
        positions="decoder.embed_positions",
        positions_from_mask=True,
        norm="decoder.final_layer_norm",
        after_norm=("decoder.project_out",),
        attention="self_attn",
        tp_styles=MappingProxyType(
            {
                "self_attn.q_proj": "colwise",
                "self_attn.k_proj": "colwise",
                "self_attn.v_proj": "colwise",
                "self_attn.out_proj": "rowwise",
                "fc1": "colwise",
                "fc2": "rowwise",
            }
        ),
    ),
    Architecture(
        "falcon",
        layers="h",
        embed="word_embeddings",
        norm="ln_f",
        rotary="rotary_emb",
        layer_kwargs=MappingProxyType({"alibi": None}),
        pp_refusals=MappingProxyType(
            {
                "alibi": "Falcon with alibi=True folds its position bias into the attention mask inside the model's "
                "forward, which a pipeline stage cannot call piecewise; use a rotary Falcon (alibi=False) or pp=1"
            }
        ),
        attention="self_attention",
        tp_styles=MappingProxyType(
            {
                "self_attention.query_key_value": "colwise",
                "self_attention.dense": "rowwise",
                "mlp.dense_h_to_4h": "colwise",
                "mlp.dense_4h_to_h": "rowwise",
            }
        ),
    ),
    Architecture(
        "gpt2",
        layers="h",
        embed="wte",
        positions="wpe",
        after_embed=("drop",),
        norm="ln_f",
        attention="attn",
        tp_styles=MappingProxyType(
            {"attn.c_attn": "fused_qkv", "attn.c_proj": "rowwise", "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"}
        ),
    ),
    Architecture(
        "bert",
        layers="encoder.layer",
        embed="embeddings",
        norm=None,
        head="cls",
        causal=False,
        attention="attention.self",
        tp_styles=MappingProxyType(
            {
                "attention.self.query": "colwise",
                "attention.self.key": "colwise",
                "attention.self.value": "colwise",
                "attention.output.dense": "rowwise",
                "intermediate.dense": "colwise",
                "output.dense": "rowwise",
            }
        ),
    ),
)

_VIT_ENTRY = Architecture(
    "vit",
    layers="layers",
    embed="embeddings",  # patches (a convolution), the class token and learned positions, from pixel_values
    norm="layernorm",
    head="classifier",
    causal=False,
    inputs="pixel_values",
    head_on_first_token=True,
    attention="attention",
    tp_styles=MappingProxyType(
        {
            "attention.q_proj": "colwise",
            "attention.k_proj": "colwise",
            "attention.v_proj": "colwise",
            "attention.o_proj": "rowwise",
            "mlp.fc1": "colwise",
            "mlp.fc2": "rowwise",
        }
    ),
)

_ALBERT_ENTRY = Architecture(
    "albert",
    layers="encoder.albert_layer_groups",  # one group of shared layers, called num_hidden_layers times
    embed="embeddings",
    norm=None,
    head="predictions",
    causal=False,
    attention="attention",
    tp_styles=MappingProxyType(
        {
            "attention.query": "colwise",
            "attention.key": "colwise",
            "attention.value": "colwise",
            "attention.dense": "rowwise",
            "ffn": "colwise",
            "ffn_output": "rowwise",
        }
    ),
    pp_refusals=MappingProxyType(  # keyed by model_type: every ALBERT config has it
        {
            "model_type": "ALBERT calls one shared group of layers num_hidden_layers times, so its layers cannot be "
            "placed on different stages (each stage would need the same weights); train ALBERT under dp, ZeRO 1-3 "
            "and tp (plan.pp=1), or use BERT for a pipeline"
        }
    ),
)

ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {entry.name: entry for entry in (*_ENTRIES, _VIT_ENTRY, _ALBERT_ENTRY)}
)


# model_type -> why neither pipeline nor tensor parallel can split the family (dp and ZeRO 1-3 can)
UNSPLITTABLE: Mapping[str, str] = MappingProxyType(
    {
        "swin": "Swin's stages change the token grid (patch merging halves each side, doubling the width) and its "
        "blocks take the grid's dimensions, so plait's pipeline cannot pass one (batch, tokens, width) activation "
        "between stages; and each block's relative-position bias table holds every head, which plait's tensor "
        "parallel does not slice. Train Swin under dp and ZeRO 1-3 (plan.tp=1, plan.pp=1), or use ViT",
        "t5": "T5 is an encoder-decoder: the decoder's every layer reads the encoder's output (cross-attention), "
        "which plait's pipeline cannot pass along one (batch, seq, width) activation; and each stack's relative "
        "position bias holds every head, which plait's tensor parallel does not slice. Train T5 under dp, ZeRO "
        "1-3 and recomputation (plan.tp=1, plan.pp=1)",
    }
)


def unsplittable_reason(model: nn.Module, *, purpose: str) -> str | None:
    """The refusal for a family that `purpose` (pipeline or tensor parallelism) cannot split, or None."""
    model_type = model_type_of(model)
    reason = UNSPLITTABLE.get(model_type or "")
    return (
        f"{purpose} is not available for {type(model).__name__} (model_type {model_type!r}): {reason}"
        if reason
        else None
    )


def _is_plait_gpt(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("embed", "blocks", "norm_f", "lm_head"))


def model_type_of(model: nn.Module) -> str | None:
    """``"plait"`` for plait's GPT, the config's ``model_type`` for a Hugging Face model, else None."""
    if _is_plait_gpt(model):
        return "plait"
    return getattr(getattr(model, "config", None), "model_type", None)


def _base_prefix(model: nn.Module) -> str | None:
    """Path of the base model inside a Hugging Face task model ("model", "transformer"), "" when
    ``model`` is the base model itself, None for plait's GPT."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ("" if prefix else None)


def _resolved(entry: Architecture, prefix: str) -> Architecture:
    """``entry`` with its base-model paths prefixed; the head is the task model's own (none on a bare base model)."""

    def full(path: str) -> str:
        return f"{prefix}.{path}" if prefix else path

    def full_all(paths: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(full(path) for path in paths)

    return dataclasses.replace(
        entry,
        layers=full(entry.layers),
        embed=full(entry.embed),
        norm=full(entry.norm) if entry.norm else None,
        head=entry.head if prefix else None,
        positions=full(entry.positions) if entry.positions else None,
        before_positions=full_all(entry.before_positions),
        after_embed=full_all(entry.after_embed),
        after_norm=full_all(entry.after_norm),
        rotary=full(entry.rotary) if entry.rotary else None,
    )


def find_architecture(model: nn.Module) -> Architecture | None:
    """The registry entry for ``model`` with paths from its root, or None when unknown or laid out otherwise."""
    entry = ARCHITECTURES.get(model_type_of(model) or "")
    if entry is None:
        return None
    prefix = _base_prefix(model)
    resolved = entry if prefix is None else _resolved(entry, prefix)
    names = {name for name, _ in model.named_modules()}
    needed = [resolved.layers, resolved.embed, *([resolved.head] if resolved.head else [])]
    return resolved if all(path in names for path in needed) else None


def architecture_of(model: nn.Module, *, purpose: str = "this") -> Architecture:
    """The registry entry for ``model``, paths from its root; ValueError naming the missing entry.

    ``purpose`` names what asked (``"pipeline parallelism"``), for the message.
    """
    entry = find_architecture(model)
    if entry is not None:
        return entry
    refusal = unsplittable_reason(model, purpose=purpose)
    if refusal:
        raise ValueError(refusal)
    model_type = model_type_of(model)
    if model_type in ARCHITECTURES:
        known = ARCHITECTURES[model_type]
        raise ValueError(
            f"{purpose} needs {type(model).__name__} laid out as the {model_type!r} entry of plait's architecture "
            f"registry says (layers at {known.layers!r}, embeddings at {known.embed!r} inside the base model, "
            f"head {known.head!r}), but the model has no such modules; use the base model or the class with "
            "that head, or add a registry entry for this layout"
        )
    raise ValueError(
        f"{purpose} does not know {type(model).__name__} (model_type={model_type!r}): plait's architecture "
        f"registry has no entry {model_type!r} (it knows {', '.join(sorted(ARCHITECTURES))}). Add "
        f"{suggested_entry(model)} to plait.models.architectures (check it against the model's forward: "
        "extra work there, such as scaling logits, needs its field), or train without this strand"
    )


def suggested_entry(model: nn.Module) -> str:
    """An ``Architecture(...)`` to start from: read off the config's ``base_model_pp_plan`` where
    transformers declares one (embeddings, then the layer list, then the final norm), else a template."""
    model_type = model_type_of(model)
    pp_plan = getattr(getattr(model, "config", None), "base_model_pp_plan", None) or {}
    names = list(pp_plan)
    base = model.base_model if isinstance(getattr(model, "base_model", None), nn.Module) else model
    layer_lists = [name for name in names if isinstance(getattr(base, name, None), nn.ModuleList)]
    if not layer_lists:
        return f"Architecture({model_type!r}, layers=..., embed=..., norm=..., ...)"
    at = names.index(layer_lists[0])
    fields = [f"layers={names[at]!r}", f"embed={names[0]!r}"]
    fields += [f"after_embed={tuple(names[1:at])!r}"] if at > 1 else []
    fields.append(f"norm={names[at + 1]!r}" if at + 1 < len(names) else "norm=None")
    fields += ["rotary='rotary_emb'"] if isinstance(getattr(base, "rotary_emb", None), nn.Module) else []
    return f"Architecture({model_type!r}, {', '.join(fields)})"


def present_paths(model: nn.Module, paths: Sequence[str]) -> list[str]:
    """The ``paths`` that name a module of ``model``: a config may leave optional parts out (OPT's
    ``project_in`` is None when the widths agree)."""
    names = {name for name, _ in model.named_modules()}
    return [path for path in paths if path in names]
