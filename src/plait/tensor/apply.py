"""Apply a tensor-parallel plan: a table of module-name patterns to styles.

    plan = {"embed": "vocab_embed", "blocks.*.attn.[qkv]_proj": "colwise",
            "blocks.*.attn.o_proj": "rowwise", "blocks.*.attn": "heads", ...}

Styles swap a dense submodule for its parallel twin (keeping its name, so
parameter names and checkpoints are unchanged), divide an attention module's
head counts by tp ("heads"), or mark a norm's parameters as sequence
parallel ("sequence_norm"). The first matching pattern wins.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn

from plait.distributed.comm import CommCounter
from plait.tensor.comm import SharedEntry
from plait.tensor.layers import ColumnParallelLinear, RowParallelLinear
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


KINDS = ("colwise", "rowwise", "vocab_embed", "vocab_head", "heads", "sequence_norm", "sequence_scatter", "replicate")


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
    return style


def _colwise(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    return ColumnParallelLinear.from_dense(
        module,
        group=ctx.group,
        name=name,
        sequence_parallel=ctx.sequence_parallel,
        partition=style.partition,
        entry=ctx.entry,
    )


def _rowwise(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    return RowParallelLinear.from_dense(module, group=ctx.group, name=name, sequence_parallel=ctx.sequence_parallel)


def _vocab_embed(module: nn.Module, name: str, style: Style, ctx: Context) -> nn.Module:
    parallel = VocabParallelEmbedding.from_dense(
        module, group=ctx.group, name=name, sequence_parallel=ctx.sequence_parallel
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


BUILDERS: dict[str, Callable[[nn.Module, str, Style, Context], nn.Module]] = {
    "colwise": _colwise,
    "rowwise": _rowwise,
    "vocab_embed": _vocab_embed,
    "heads": _heads,
    "sequence_norm": _sequence_norm,
    "sequence_scatter": _sequence_scatter,
    "replicate": lambda module, name, style, ctx: module,
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


def _apply_head(model: nn.Module, name: str, module: nn.Module, ctx: Context) -> nn.Module:
    """The LM head: tied to the (already parallel) embedding when it shares its weight."""
    tied = ctx.embeddings.get(id(module.weight))
    if tied is not None:
        return VocabParallelHead.tied_to(tied, sequence_parallel=ctx.sequence_parallel)
    return VocabParallelHead.from_dense(module, group=ctx.group, name=name, sequence_parallel=ctx.sequence_parallel)


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
        new = (
            _apply_head(model, name, module, ctx)
            if style.kind == "vocab_head"
            else BUILDERS[style.kind](module, name, style, ctx)
        )
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
    for module in modules:
        module.counter = counter
    return len(modules)


def _check_every_pattern_matches(model: nn.Module, plan: Mapping[str, str | Style]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    for pattern in plan:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"tensor-parallel plan pattern {pattern!r} matches no module of {type(model).__name__}")
