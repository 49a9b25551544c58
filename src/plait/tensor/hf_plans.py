"""Tensor-parallel plans for Hugging Face models: from the config's own plan, or from layer names.

    plan = tp_plan_for(model)  # {"model.layers.*.self_attn.q_proj": "colwise", ..., "lm_head": "vocab_head"}
    apply_tensor_parallel(model, plan, group=tp_group, sequence_parallel=False)

In order of preference: (a) the model's own HF plan (transformers 5's `model.tp_plan`: the config's
`base_model_tp_plan` prefixed with the base model's path, or what the user set there; Llama, Mistral,
Qwen2, ...), translated to plait's styles; (b) a family of layer names plait recognises
(GPT-2's `attn.c_attn`, BERT's `attention.self.query`, Llama-like `self_attn.q_proj`). Either way the
attention modules get "heads", the input embeddings "vocab_embed" and the output embeddings
"vocab_head": plait's LM head never gathers the logits, so HF's `colwise_gather_output` for
`lm_head` is not used. Only names, shapes and the config are read, so a meta-device model works.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from plait.tensor.apply import Style

PlanTable = dict[str, str | Style]

# Hugging Face's style names -> plait's. "*_rep" keeps the module whole: its neighbours expect full features.
HF_STYLES = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "packed_colwise": "packed_colwise",  # a fused [gate; up] projection: two equal segments
    "colwise_rep": "replicate",
    "rowwise_rep": "replicate",
    "replicate": "replicate",
    "sequence_parallel": "sequence_norm",
    "embedding_rowwise": "vocab_embed",
}
FUSED_QKV = "fused_qkv"  # a fused [q; k; v] projection of three equal segments (GPT-2's c_attn)
QKV_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "c_attn", "query_key_value")


@dataclass(frozen=True)
class LayerFamily:
    """Names inside one repeated layer that identify a model family, and their styles."""

    name: str
    styles: dict[str, str]  # module name relative to the layer -> style
    attention: str  # the attention module, relative to the layer: gets "heads"


# Order matters inside `styles`: the more specific pattern must come first (fnmatch's * spans dots).
FAMILIES = (
    LayerFamily(
        "gpt2",
        {"attn.c_attn": FUSED_QKV, "attn.c_proj": "rowwise", "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"},
        attention="attn",
    ),
    LayerFamily(
        "bert",
        {
            "attention.self.query": "colwise",
            "attention.self.key": "colwise",
            "attention.self.value": "colwise",
            "attention.output.dense": "rowwise",
            "intermediate.dense": "colwise",
            "output.dense": "rowwise",
        },
        attention="attention.self",
    ),
    LayerFamily(
        "llama",
        {
            "self_attn.q_proj": "colwise",
            "self_attn.k_proj": "colwise",
            "self_attn.v_proj": "colwise",
            "self_attn.o_proj": "rowwise",
            "mlp.gate_proj": "colwise",
            "mlp.up_proj": "colwise",
            "mlp.down_proj": "rowwise",
        },
        attention="self_attn",
    ),
)


def tp_plan_for(model: nn.Module) -> PlanTable:
    """The tensor-parallel plan of a Hugging Face model: {module-name pattern: style}.

    Raises ValueError when the config has no plan and no layer family is recognised.
    """
    body = _plan_from_config(model) or _plan_from_layer_names(model)
    if not body:
        raise ValueError(
            f"{type(model).__name__} has no tensor-parallel plan (no config.base_model_tp_plan) and plait recognises "
            "none of its layer names; pass a plan table: {pattern: style}: on a Hugging Face model set "
            "model.tp_plan = {'layers.*.attn.q_proj': 'colwise', 'layers.*.attn.o_proj': 'rowwise', ...} (HF's "
            "styles), on any other model add a tp_plan() method returning plait's styles, or use plan.tp=1"
        )
    embed_plan, head_plan = _embeddings_plan(model)
    return embed_plan | body | head_plan


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
    plan: PlanTable = {}
    for pattern, hf_style in _hf_plan(model).items():
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched or set(matched) <= embeddings:
            continue  # HF skips optional modules too; the embeddings get plait's vocab styles
        plan[pattern] = _translate(hf_style, model.get_submodule(matched[0]), name=pattern)
    return plan | {pattern: "heads" for pattern in _attention_patterns(plan)}


def _translate(hf_style: str, module: nn.Module, *, name: str) -> str | Style:
    style = HF_STYLES.get(hf_style)
    if style is None:
        raise ValueError(
            f"{name}: Hugging Face's tensor-parallel style {hf_style!r} has no plait equivalent (plait maps "
            f"{', '.join(sorted(HF_STYLES))}); pass a plan table: {{pattern: style}} as model.tp_plan, or use plan.tp=1"
        )
    if style == "packed_colwise":
        return Style("colwise", partition=_equal_segments(module, 2, name=name))
    return style


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


def _plan_from_layer_names(model: nn.Module) -> PlanTable:
    plan: PlanTable = {}
    for list_name, layers in model.named_modules():
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        inner = {name: module for name, module in layers[0].named_modules()}
        family = next((f for f in FAMILIES if all(rel in inner for rel in f.styles)), None)
        if family is None:
            continue
        for rel, style in family.styles.items():
            pattern = _prefixed(list_name, f"*.{rel}")
            plan[pattern] = (
                Style("colwise", partition=_equal_segments(inner[rel], 3, name=pattern))
                if style == FUSED_QKV
                else style
            )
        plan[_prefixed(list_name, f"*.{family.attention}")] = "heads"
    return plan


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
