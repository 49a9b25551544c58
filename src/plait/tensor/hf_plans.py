"""Tensor-parallel plans for Hugging Face models: from the config's own plan, or from plait's registry.

    plan = tp_plan_for(model)  # {"model.layers.*.self_attn.q_proj": "colwise", ..., "lm_head": "vocab_head"}
    apply_tensor_parallel(model, plan, group=tp_group, sequence_parallel=False)

In order of preference: (a) the model's own HF plan (transformers 5's `model.tp_plan`: the config's
`base_model_tp_plan` prefixed with the base model's path, or what the user set there; Llama, Mistral,
Qwen2/3, Phi3, Gemma, GPT-NeoX...), translated to plait's styles; (b) the `tp_styles` of the model's
entry in plait's architecture registry (`plait.models.architectures`: OPT, Falcon, GPT-2, BERT), which
use the same names. Either way the attention modules get "heads", the input embeddings "vocab_embed"
and the output embeddings "vocab_head": plait's LM head never gathers the logits, so HF's
`colwise_gather_output` for `lm_head` is not used. Only names, shapes and the config are read, so a
meta-device model works.

HF's `colwise_gather_output` followed by `rowwise_split_input` in the same module (Phi3) is plain
colwise -> rowwise, since plait never gathers a column layer's output; either one alone keeps its
module whole, which computes the same. Fused projections are split segment by segment: `qkv_proj`
as [q; k; v] sized by the config's head counts, `gate_up_proj` (and HF's `packed_colwise`) as two
equal halves, and the registry's `fused_qkv` (GPT-2's `c_attn`) as three equal parts.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from torch import nn

from plait.models.architectures import (
    ARCHITECTURES,
    Architecture,
    find_architecture,
    model_type_of,
    unsplittable_reason,
)
from plait.tensor.apply import KINDS, Style

PlanTable = dict[str, str | Style]

# Hugging Face's style names -> plait's. "*_rep" keeps the module whole: its neighbours expect full features.
HF_STYLES = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "packed_colwise": "packed_colwise",  # a fused [gate; up] projection: two equal segments
    "colwise_rep": "replicate",
    "rowwise_rep": "replicate",
    "replicate": "replicate",
    "replicated_with_grad_allreduce": "partial_grad",  # Qwen3's per-head q_norm/k_norm
    "sequence_parallel": "sequence_norm",
    "embedding_rowwise": "vocab_embed",
}
FUSED_QKV = "fused_qkv"  # the registry's name for a fused [q; k; v] projection of three equal segments (GPT-2)
# colwise / rowwise when both sit in one module (plait never gathers a column output), else whole
GATHER_PAIR = ("colwise_gather_output", "rowwise_split_input")
QKV_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "c_attn", "query_key_value")


def tp_plan_for(model: nn.Module) -> PlanTable:
    """The tensor-parallel plan of a Hugging Face model: {module-name pattern: style}.

    Raises ValueError when the model cannot be split (with the reason), or when the config has
    no plan and plait's architecture registry has no entry with `tp_styles` for it.
    """
    refusal = tp_refusal(model)
    if refusal:
        raise ValueError(refusal)
    body = _plan_from_config(model) or _plan_from_registry(model)
    embed_plan, head_plan = _embeddings_plan(model)
    return embed_plan | body | head_plan


def tp_refusal(model: nn.Module) -> str | None:
    """Why `model` cannot be tensor-parallel at all (whatever the tp), or None."""
    unsplittable = unsplittable_reason(model, purpose="tensor parallelism")
    if unsplittable:
        return unsplittable
    config = getattr(model, "config", None)
    if model_type_of(model) == "falcon" and config.multi_query and not config.new_decoder_architecture:
        return (
            "Falcon with multi_query=True has one key/value head shared by every query head, which tensor "
            "parallel cannot split without replicating K/V on every rank (plait shards query_key_value "
            "contiguously); use a Falcon with new_decoder_architecture=True or multi_query=False, or plan.tp=1"
        )
    return None


def module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    """The name of `target` inside `model` ("" for the model itself), or None."""
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def _prefixed(prefix: str, pattern: str) -> str:
    return f"{prefix}.{pattern}" if prefix else pattern


def _hf_plan(model: nn.Module) -> dict[str, str]:
    """HF's plan with full module names: transformers 5's `model.tp_plan` (the config's
    `base_model_tp_plan` prefixed and merged, or what the user set), else the config's plan prefixed here."""
    merged = getattr(model, "tp_plan", None)
    if isinstance(merged, dict) and merged:
        return dict(merged)
    config_plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None) or {}
    prefix = module_name(model, getattr(model, "base_model", model)) or ""
    return {_prefixed(prefix, pattern): style for pattern, style in config_plan.items()}


def _plan_from_config(model: nn.Module) -> PlanTable:
    names = [name for name, _ in model.named_modules() if name]
    embeddings = {_embedding_name(model, head=False), _embedding_name(model, head=True)}
    raw: dict[str, str] = {}
    for pattern, hf_style in _hf_plan(model).items():
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if matched and not set(matched) <= embeddings:  # HF skips optional modules too; the embeddings get
            raw[pattern] = hf_style  # plait's vocab styles
    plan = _translate_all(model, raw)
    if not plan:
        return {}
    arch = find_architecture(model)
    attention = [f"{arch.layers}.*.{arch.attention}"] if arch and arch.attention else _attention_patterns(plan)
    return plan | {pattern: "heads" for pattern in attention}


def _plan_from_registry(model: nn.Module) -> PlanTable:
    arch = find_architecture(model)
    if arch is None or not arch.tp_styles:
        raise ValueError(_no_plan_message(model, arch))
    raw = {f"{arch.layers}.*.{rel}": style for rel, style in arch.tp_styles.items()}
    plan = _translate_all(model, raw)
    return plan | ({f"{arch.layers}.*.{arch.attention}": "heads"} if arch.attention else {})


def _no_plan_message(model: nn.Module, arch: Architecture | None) -> str:
    model_type = model_type_of(model)
    if arch is not None:
        found = f"plait's architecture registry entry {model_type!r} has no tp_styles"
        fix = f"add tp_styles={{'self_attn.q_proj': 'colwise', ...}} to the {model_type!r} entry"
    else:
        found = (
            f"plait's architecture registry has no entry {model_type!r} for it (it knows "
            f"{', '.join(sorted(ARCHITECTURES))})"
            if model_type not in ARCHITECTURES
            else f"its modules are not laid out as the registry's {model_type!r} entry says"
        )
        fix = (
            f"add Architecture({model_type!r}, layers=..., embed=..., norm=..., attention=..., "
            "tp_styles={'self_attn.q_proj': 'colwise', 'self_attn.o_proj': 'rowwise', ...}) to "
            "plait.models.architectures"
        )
    return (
        f"{type(model).__name__} has no tensor-parallel plan: its config has no base_model_tp_plan and {found}; "
        f"{fix}, or pass a plan table: {{pattern: style}}: on a Hugging Face model set model.tp_plan = "
        "{'layers.*.attn.q_proj': 'colwise', 'layers.*.attn.o_proj': 'rowwise', ...} (HF's styles), on any other "
        "model add a tp_plan() method returning plait's styles, or use plan.tp=1"
    )


def _translate_all(model: nn.Module, raw: Mapping[str, str]) -> PlanTable:
    """HF (or registry) styles -> plait's, reading the first module each pattern matches."""
    names = [name for name, _ in model.named_modules() if name]
    paired = _gather_pairs(raw)
    plan: PlanTable = {}
    for pattern, style in raw.items():
        first = next((name for name in names if fnmatch.fnmatchcase(name, pattern)), None)
        if first is None:
            raise ValueError(f"tensor-parallel plan pattern {pattern!r} matches no module of {type(model).__name__}")
        if style in GATHER_PAIR:
            style = ("colwise" if style == GATHER_PAIR[0] else "rowwise") if pattern in paired else "replicate"
        plan[pattern] = _translate(model, style, model.get_submodule(first), name=pattern)
    return plan


def _gather_pairs(raw: Mapping[str, str]) -> set[str]:
    """Patterns of colwise_gather_output / rowwise_split_input modules that share a parent with the other."""
    by_parent: dict[str, dict[str, list[str]]] = {}
    for pattern, style in raw.items():
        if style in GATHER_PAIR:
            by_parent.setdefault(pattern.rpartition(".")[0], {}).setdefault(style, []).append(pattern)
    return {p for styles in by_parent.values() if len(styles) == 2 for patterns in styles.values() for p in patterns}


def _translate(model: nn.Module, style: str, module: nn.Module, *, name: str) -> str | Style:
    if style == FUSED_QKV:
        return Style("colwise", partition=_equal_segments(module, 3, name=name))
    kind = HF_STYLES.get(style, style if style in KINDS else None)
    if kind is None:
        raise ValueError(
            f"{name}: Hugging Face's tensor-parallel style {style!r} has no plait equivalent (plait maps "
            f"{', '.join(sorted([*HF_STYLES, *GATHER_PAIR]))}); pass a plan table: {{pattern: style}} as model.tp_plan, or use plan.tp=1"
        )
    if kind == "packed_colwise":
        return Style("colwise", partition=_equal_segments(module, 2, name=name))
    fused = _fused_partition(model, module, name=name) if kind == "colwise" else None
    return Style("colwise", partition=fused) if fused else kind


def _fused_partition(model: nn.Module, module: nn.Module, *, name: str) -> tuple[int, ...] | None:
    """Segments of a fused projection known by its name: Phi3's [q; k; v] `qkv_proj`, [gate; up] `gate_up_proj`."""
    leaf = name.rpartition(".")[2]
    if leaf == "gate_up_proj":
        return _equal_segments(module, 2, name=name)
    if leaf != "qkv_proj":
        return None
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    segments = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim) if heads and head_dim else None
    if segments is None or sum(segments) != output_features(module):
        raise ValueError(
            f"{name}: a fused [q; k; v] projection whose {output_features(module)} outputs do not match the config "
            f"(num_attention_heads={heads}, num_key_value_heads={kv_heads}, head_dim={head_dim}); pass a plan table "
            "{pattern: Style('colwise', partition=(q, k, v))} as the model's tp_plan, or use plan.tp=1"
        )
    return segments


def _attention_patterns(plan: PlanTable) -> list[str]:
    """Parents of q/k/v projections, and of any planned module inside an "attn"/"attention" module."""
    parents = []
    for pattern in plan:
        parent, _, leaf = pattern.rpartition(".")
        parent_leaf = parent.rpartition(".")[2]
        is_attention = leaf in QKV_NAMES or "attn" in parent_leaf or "attention" in parent_leaf
        if parent and is_attention and parent not in parents:
            parents.append(parent)
    return parents


def _equal_segments(module: nn.Module, count: int, *, name: str) -> tuple[int, ...]:
    out_features = output_features(module)
    if out_features % count:
        raise ValueError(f"{name}: a fused projection of {count} equal parts, but it has {out_features} outputs")
    return (out_features // count,) * count


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # Hugging Face's transposed linear (GPT-2): weight (in, out)


def output_features(module: nn.Module) -> int:
    return module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]


def input_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def _embedding(model: nn.Module, *, head: bool) -> tuple[str | None, nn.Module | None]:
    getter = getattr(model, "get_output_embeddings" if head else "get_input_embeddings", None)
    try:
        module = getter() if getter is not None else None
    except NotImplementedError:  # HF raises it for models without such embeddings
        module = None
    return module_name(model, module), module


def _embedding_name(model: nn.Module, *, head: bool) -> str | None:
    return _embedding(model, head=head)[0]


def _plain(module: nn.Module | None, base: type[nn.Module]) -> bool:
    # A subclass with its own forward (Gemma's scaled embedding) would lose its extra step if swapped.
    return module is not None and isinstance(module, base) and type(module).forward is base.forward


def _embeddings_plan(model: nn.Module) -> tuple[PlanTable, PlanTable]:
    """(input embedding plan, output embedding plan). A head whose logits the model post-processes
    (soft-capping) would lose the vocab-shard tag, so it stays whole; a tie keeps both whole then."""
    (embed_name, embed), (head_name, head) = _embedding(model, head=False), _embedding(model, head=True)
    softcapped = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    embed_ok = bool(embed_name) and _plain(embed, nn.Embedding)
    head_ok = bool(head_name) and _plain(head, nn.Linear) and not softcapped
    if embed is not None and head is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0):
        embed_ok = head_ok = embed_ok and head_ok
    return ({embed_name: "vocab_embed"} if embed_ok else {}), ({head_name: "vocab_head"} if head_ok else {})
