"""Tensor-parallel plans for Hugging Face models: from the config's own plan, or from layer names.

    plan = tp_plan_for(model)  # {"model.layers.*.self_attn.q_proj": "colwise", ..., "lm_head": "vocab_head"}
    apply_tensor_parallel(model, plan, group=tp_group, sequence_parallel=False)

In order of preference: (a) the config's `base_model_tp_plan` (Llama, Mistral, Qwen2, ...), translated
to plait's styles and prefixed with the base model's path; (b) a family of layer names plait recognises
(GPT-2's `attn.c_attn`, BERT's `attention.self.query`, Llama-like `self_attn.q_proj`). Either way the
attention modules get "heads", the input embeddings "vocab_embed" and the output embeddings
"vocab_head": plait's LM head never gathers the logits, so HF's `colwise_gather_output` for
`lm_head` is not used. Only names, shapes and the config are read, so a meta-device model works.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from plait.tensor.apply import HEAD_ATTRIBUTES, Style, _as_style

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
            "none of its layer names; pass a plan table: {pattern: style}, e.g. give the model a tp_plan() method "
            "returning {'layers.*.attn.q_proj': 'colwise', 'layers.*.attn.o_proj': 'rowwise', 'layers.*.attn': "
            "'heads', ...}, or use plan.tp=1"
        )
    return _embeddings_plan(model, head=False) | body | _embeddings_plan(model, head=True)


def module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    """The name of `target` inside `model` ("" for the model itself), or None."""
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def _prefixed(prefix: str, pattern: str) -> str:
    return f"{prefix}.{pattern}" if prefix else pattern


def _plan_from_config(model: nn.Module) -> PlanTable:
    hf_plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None) or {}
    prefix = module_name(model, getattr(model, "base_model", model)) or ""
    names = [name for name, _ in model.named_modules() if name]
    embeddings = {_embedding_name(model, head=False), _embedding_name(model, head=True)}
    plan: PlanTable = {}
    for pattern, hf_style in hf_plan.items():
        full = _prefixed(prefix, pattern)
        matched = [name for name in names if fnmatch.fnmatchcase(name, full)]
        if not matched or set(matched) <= embeddings:
            continue  # HF skips optional modules too; embeddings get plait's vocab styles
        plan[full] = _translate(hf_style, model.get_submodule(matched[0]), name=full)
    return plan | {pattern: "heads" for pattern in _attention_patterns(plan)}


def _translate(hf_style: str, module: nn.Module, *, name: str) -> str | Style:
    style = HF_STYLES.get(hf_style)
    if style is None:
        raise ValueError(
            f"{name}: Hugging Face's tensor-parallel style {hf_style!r} has no plait equivalent (plait maps "
            f"{', '.join(sorted(HF_STYLES))}); pass a plan table: {{pattern: style}} via a tp_plan() method, or use plan.tp=1"
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


def _embedding_name(model: nn.Module, *, head: bool) -> str | None:
    getter = getattr(model, "get_output_embeddings" if head else "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        return module_name(model, getter())
    except NotImplementedError:  # HF raises it for models without such embeddings
        return None


def _embeddings_plan(model: nn.Module, *, head: bool) -> PlanTable:
    name = _embedding_name(model, head=head)
    if not name:
        return {}
    return {name: "vocab_head" if head else "vocab_embed"}


def check_tp(
    model: nn.Module, tp: int, *, world_size: int | None = None, plan: Mapping[str, str | Style] | None = None
) -> None:
    """Raise ValueError, before any collective, when `model` cannot be split over `tp` ranks.

    Checks the config's head counts and sizes, then every module the plan (by default the model's
    `tp_plan()` or `tp_plan_for(model)`) shards, and names the nearest tp values that work.
    Reads only names, shapes and the config, so a meta-device model works.

        check_tp(model, 3)  # ValueError: tp=3 does not divide attention heads (num_attention_heads)=4, ...
    """
    if tp < 1:
        raise ValueError(f"tp={tp}: the tensor-parallel size must be a positive integer")
    if world_size is not None and tp > world_size:
        raise ValueError(
            f"tp={tp} is larger than the world of {world_size} ranks; use a tp that divides {world_size} "
            f"or launch at least {tp} ranks"
        )
    if tp == 1:
        return
    plan = plan if plan is not None else (model.tp_plan() if hasattr(model, "tp_plan") else tp_plan_for(model))
    constraints = _config_constraints(model) + _plan_constraints(model, plan)
    bad = [f"{what}={value}" for what, value in constraints if value % tp]
    if bad:
        valid = _divisors(math.gcd(*(value for _, value in constraints)))
        nearest = min(valid, key=lambda d: (abs(d - tp), -d))
        raise ValueError(
            f"tp={tp} does not divide {', '.join(bad)} of {type(model).__name__}; valid tp values for this "
            f"model: {', '.join(map(str, valid))} (nearest: {nearest})"
        )


CONFIG_SIZES = (
    ("attention heads", "num_attention_heads"),
    ("KV heads", "num_key_value_heads"),
    ("hidden size", "hidden_size"),
    ("intermediate size", "intermediate_size"),
    ("intermediate size", "n_inner"),  # GPT-2's name; None means 4 x hidden, checked through the plan
)


def _config_constraints(model: nn.Module) -> list[tuple[str, int]]:
    config = getattr(model, "config", None)
    out = []
    for what, attr in CONFIG_SIZES:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out.append((f"{what} ({attr})", value))
    return out


def _plan_constraints(model: nn.Module, plan: Mapping[str, str | Style]) -> list[tuple[str, int]]:
    """What each plan pattern splits, read from the first module it governs."""
    out, seen = [], set()
    for name, module in model.named_modules():
        pattern = next((p for p in plan if fnmatch.fnmatchcase(name, p)), None) if name else None
        if pattern is None or pattern in seen:
            continue  # the first pattern that matches a module governs it, as in apply_tensor_parallel
        seen.add(pattern)
        out += _module_constraints(module, pattern, _as_style(plan[pattern]))
    return out


def _module_constraints(module: nn.Module, pattern: str, style: Style) -> list[tuple[str, int]]:
    if style.kind == "colwise":
        segments = style.partition or (output_features(module),)
        return [(f"{pattern} output features", segment) for segment in segments]
    if style.kind == "rowwise":
        return [(f"{pattern} input features", input_features(module))]
    if style.kind == "heads":
        values = [(attr, getattr(module, attr, None)) for attr in HEAD_ATTRIBUTES]
        return [(f"{pattern}.{attr}", v) for attr, v in values if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]
