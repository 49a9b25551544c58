"""Apply a tensor-parallel plan: a table of module-name patterns to styles.

    plan = {"embed": "vocab_embed", "blocks.*.attn.[qkv]_proj": "colwise",
            "blocks.*.attn.o_proj": "rowwise", "blocks.*.attn": "heads", ...}

Styles swap a dense submodule for its parallel twin (keeping its name, so
parameter names and checkpoints are unchanged), divide an attention module's
head counts by tp ("heads"), or mark a norm's parameters as sequence
parallel ("sequence_norm") or any replicated parameters as getting partial
gradients ("partial_grad": Qwen3's per-head q_norm sees only this rank's
heads), or split every expert of stacked MoE experts ("experts", see
plait.moe.expert_tp). The first matching pattern wins.

Under sequence parallel a style's `sequence_input` says where a module stands
relative to the sequence-parallel region (plait's own layers need none; a
Hugging Face model runs its embeddings, head and attention on the whole
sequence, see plait.tensor.hf_sequence).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.comm import CommCounter
from plait.tensor.comm import ProcessGroup, SharedEntry, gather_sequence
from plait.tensor.layers import ColumnParallelLinear, RowParallelLinear
from plait.tensor.lora import is_lora_layer, shard_lora_layer
from plait.tensor.sequence import SequenceScatter, mark_sequence_parallel, scatter_output_sequence
from plait.tensor.vocab import VocabParallelEmbedding, VocabParallelHead

# Attention attributes holding head counts or widths that shrink by tp (plait, Llama, GPT-2, BERT names).
HEAD_ATTRIBUTES = (
    "num_heads",
    "num_kv_heads",
    "num_key_value_heads",
    "num_attention_heads",
    "all_head_size",
    "split_size",
    "embed_dim",
)


@dataclass(frozen=True)
class Style:
    """How one module is parallelised: `kind` plus, for fused projections, the output segments."""

    kind: str
    partition: tuple[int, ...] | None = None
    sequence_input: str | None = None  # one of SEQUENCE_INPUTS: matters only under sequence parallel


KINDS = (
    "colwise",
    "rowwise",
    "vocab_embed",
    "vocab_head",
    "heads",
    "sequence_norm",
    "sequence_scatter",
    "partial_grad",
    "replicate",
    "experts",
)
# Under sequence parallel, what a module's input is:
#   None        this rank's sequence chunk (column layers gather it themselves; plait's layers)
#   "whole"     the whole sequence, the same on every rank: the module is built as without sequence
#               parallel (a Hugging Face embedding or head, outside the chunked layer stack)
#   "gather"    "heads" only: the module's forward reads the sequence length from its hidden states
#               (Hugging Face attention), so they are all-gathered on entry (reduce-scattered backward)
#   "gathered"  "colwise" only: a layer inside a "gather" module, whose input is already whole and in
#               the tensor-parallel region: no second gather, no all-reduce of its input gradient
SEQUENCE_INPUTS = (None, "whole", "gather", "gathered")


class GatheredEntry(SharedEntry):
    """The entry of column layers inside a module that gathered the whole sequence itself."""

    def enter(self, x: torch.Tensor, group: ProcessGroup | None, **_: Any) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class Context:
    group: dist.ProcessGroup | None
    tp: int
    sequence_parallel: bool
    embeddings: dict[int, VocabParallelEmbedding] = field(default_factory=dict)  # by id of the dense weight
    entry: SharedEntry = field(default_factory=SharedEntry)  # one tp entry for column layers fed one tensor


def _as_style(style: str | Style) -> Style:
    style = Style(style) if isinstance(style, str) else style
    if style.kind not in KINDS:
        raise ValueError(f"unknown tensor-parallel style {style.kind!r}; choose one of {', '.join(KINDS)}")
    if style.sequence_input not in SEQUENCE_INPUTS:
        raise ValueError(f"unknown sequence_input {style.sequence_input!r} in {style}; choose one of {SEQUENCE_INPUTS}")
    return style


def _chunked(style: Style, ctx: Context) -> bool:
    """Whether the module's input is this rank's sequence chunk."""
    return ctx.sequence_parallel and style.sequence_input is None


def _colwise(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    return ColumnParallelLinear.from_dense(
        module,
        group=ctx.group,
        name=name,
        sequence_parallel=_chunked(style, ctx),
        partition=style.partition,
        entry=GatheredEntry() if ctx.sequence_parallel and style.sequence_input == "gathered" else ctx.entry,
    )


def _rowwise(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    # A row layer ends the tp region: under sequence parallel its output is a chunk unless it is "whole".
    sequence_parallel = ctx.sequence_parallel and style.sequence_input != "whole"
    return RowParallelLinear.from_dense(module, group=ctx.group, name=name, sequence_parallel=sequence_parallel)


def _vocab_embed(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    parallel = VocabParallelEmbedding.from_dense(
        module, group=ctx.group, name=name, sequence_parallel=_chunked(style, ctx)
    )
    ctx.embeddings[id(module.weight)] = parallel
    return parallel


def _heads(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    for attr in HEAD_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            if value % ctx.tp:
                raise ValueError(f"{name}.{attr}={value} is not divisible by tp={ctx.tp}; pick a tp that divides it")
            setattr(module, attr, value // ctx.tp)
    if ctx.sequence_parallel and style.sequence_input == "gather":
        HiddenStatesHook(gather_sequence, group=ctx.group, name=name).register(module, on_input=True)
    return module


class HiddenStatesHook:
    """Passes a module's hidden states through a sequence collective (`op(hidden, group, dim, counter=)`,
    sequence dim -2): on its input (the first positional argument or `hidden_states=`) or its output
    (the output, or its first element). Listed on the module's `hidden_states_hooks`, so the engine can
    hand it a counter (`counter`) like the parallel layers."""

    def __init__(self, op: Callable[..., torch.Tensor], *, group: ProcessGroup | None, name: str) -> None:
        self.op = op
        self.group = group
        self.name = name
        self.counter: CommCounter | None = None

    def register(self, module: nn.Module, *, on_input: bool) -> None:
        module.hidden_states_hooks = [*getattr(module, "hidden_states_hooks", ()), self]
        if on_input:
            module.register_forward_pre_hook(self._on_input, with_kwargs=True)
        else:
            module.register_forward_hook(self._on_output)

    def _change(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.op(hidden, self.group, -2, counter=self.counter)

    def _on_input(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:
            return (self._change(args[0]), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise ValueError(
                f"{self.name} was called without hidden states (no positional argument, no hidden_states=)"
            )
        return args, {**kwargs, "hidden_states": self._change(kwargs["hidden_states"])}

    def _on_output(self, _module: nn.Module, _args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return self._change(output)
        return (self._change(output[0]), *output[1:])  # (hidden, attention weights, ...)


def _partial_grad(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    mark_sequence_parallel(module, name_prefix=name)  # the same record: summed over tp before the step
    return module


def _sequence_norm(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    if ctx.sequence_parallel:
        mark_sequence_parallel(module, name_prefix=name)
    return module


def _sequence_scatter(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    """A replicated module whose output (seq, hidden) must shrink to this rank's chunk (learned positions)."""
    if ctx.sequence_parallel:
        scatter_output_sequence(module, group=ctx.group, dim=0)
    return module


def _experts(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    """Stacked MoE experts (plait.moe.Experts): each expert's MLP split over tp, one all-reduce per layer."""
    split = getattr(module, "split_over_tp", None)
    if split is None:
        raise ValueError(
            f"{name} is a {type(module).__name__}, not stacked experts; the style 'experts' splits plait.moe.Experts"
        )
    if ctx.sequence_parallel:
        raise ValueError(f"{name}: experts split over tp take whole tokens; set plan.sequence_parallel=false")
    return split(group=ctx.group, name=name)


BUILDERS: dict[str, Callable[[nn.Module, str, Style, Context], nn.Module]] = {
    "colwise": _colwise,
    "rowwise": _rowwise,
    "vocab_embed": _vocab_embed,
    "heads": _heads,
    "sequence_norm": _sequence_norm,
    "sequence_scatter": _sequence_scatter,
    "partial_grad": _partial_grad,
    "replicate": lambda module, name, style, ctx: module,
    "experts": _experts,
}


def _match(plan: Mapping[str, str | Style], name: str) -> Style | None:
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return _as_style(style)
    return None


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _apply_head(model: nn.Module, name: str, module: nn.Module, style: Style, ctx: Context) -> nn.Module:
    """The LM head: tied to the (already parallel) embedding when it shares its weight."""
    tied = ctx.embeddings.get(id(module.weight))
    sequence_parallel = _chunked(style, ctx)
    if tied is None:
        return VocabParallelHead.from_dense(module, group=ctx.group, name=name, sequence_parallel=sequence_parallel)
    bias = getattr(module, "bias", None)
    # BERT's head module holds its decoder's bias as `bias` too: one parameter, saved under its first name
    bias_name = next((n for n, p in model.named_parameters() if p is bias), f"{name}.bias")
    head = VocabParallelHead.tied_to(tied, bias=bias, bias_name=bias_name, sequence_parallel=sequence_parallel)
    if bias is not None:
        _repoint(model, bias, head.bias)
    return head


def _repoint(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Every module attribute holding the parameter `old` now holds `new`."""
    for module in model.modules():
        for attr, param in list(module._parameters.items()):
            if param is old:
                setattr(module, attr, new)


def apply_tensor_parallel(
    model: nn.Module, plan: Mapping[str, str | Style], *, group: dist.ProcessGroup | None, sequence_parallel: bool
) -> list[str]:
    """Parallelise `model` in place by `plan`; returns the names of the modules it changed.

    Under tp=1 (group None) nothing changes. Every pattern must match a module.
    """
    tp = dist.get_world_size(group) if group is not None else 1
    if tp == 1:
        return []
    ctx = Context(group=group, tp=tp, sequence_parallel=sequence_parallel)
    _check_every_pattern_matches(model, plan)
    changed = []
    for name, module in list(model.named_modules()):
        style = _match(plan, name) if name else None
        if style is None:
            continue
        if style.kind == "vocab_head":
            new = _apply_head(model, name, module, style, ctx)
        elif is_lora_layer(module):  # peft's wrapper: its base and factors split (plait.tensor.lora)
            new = shard_lora_layer(module, name, style=style, ctx=ctx, build=BUILDERS[style.kind])
        else:
            new = BUILDERS[style.kind](module, name, style, ctx)
        if new is not module:
            _swap(model, name, new)
        changed.append(name)
    return changed


COUNTED = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead)


def count_collectives(model: nn.Module, counter: CommCounter | None) -> int:
    """Have every tensor-parallel collective of `model` (its parallel layers, their backward, the
    vocab-parallel loss, sequence scatters) recorded on `counter`; returns how many modules report.

    A separate pass rather than an argument of `apply_tensor_parallel`, so models parallelised by
    any route (Hugging Face's loaders included) and stages split off later all report alike.
    """
    modules = [m for m in model.modules() if isinstance(m, COUNTED)]
    modules += [
        hook for m in model.modules() if isinstance(hook := getattr(m, "sequence_scatter", None), SequenceScatter)
    ]
    modules += [hook for m in model.modules() for hook in getattr(m, "hidden_states_hooks", ())]
    modules += [m for m in model.modules() if getattr(m, "counts_tp_collectives", False)]  # plait.moe's experts
    for module in modules:
        module.counter = counter
    return len(modules)


def _check_every_pattern_matches(model: nn.Module, plan: Mapping[str, str | Style]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    for pattern in plan:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"tensor-parallel plan pattern {pattern!r} matches no module of {type(model).__name__}")
