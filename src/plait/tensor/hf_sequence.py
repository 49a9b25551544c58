"""Sequence parallel for Hugging Face models: the layer stack runs on sequence chunks, the rest whole.

A Hugging Face model's forward derives its position ids, rotary tables and attention masks from
the length of the embeddings it sees, and its attention modules read the sequence length from
their input to split heads. So plait keeps everything outside the layer stack on the whole
sequence and brackets the stack instead of scattering at the embedding (as plait's own GPT does):

- the (vocab-parallel) embedding all-reduces as without sequence parallel, so positions, masks
  and rotary tables cover the whole sequence;
- the first layer keeps this rank's chunk of its input (its gradient is all-gathered back);
- inside each layer, norms and residual adds run on the chunk (their parameters' gradients are
  partial, summed over tp before the step); the MLP's column layers all-gather the sequence and
  its row layer reduce-scatters it, as in Megatron;
- each attention module all-gathers its hidden states on entry (one all-gather; its q/k/v
  column layers take them as they are, and the backward is one reduce-scatter), so HF's own
  forward sees the whole sequence, the masks and the rotary tables match; its output
  projection reduce-scatters back to the chunk;
- the last layer's output is all-gathered (each rank keeps its chunk of the gradient: the
  final norm and the head after it compute the same on every rank), so the final norm, any
  reshape to the input's shape (GPT-2) and the head see the whole sequence.

Compared with Megatron's scatter at the embedding, this costs one more all-gather of the
hidden states per step forward and one backward (the embedding all-reduces, the head's input
gradient is all-reduced), independent of the number of layers.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from plait.models.architectures import Architecture, find_architecture
from plait.tensor.apply import HiddenStatesHook, Style, _as_style
from plait.tensor.comm import ProcessGroup, gather_sequence_no_reduce, scatter_sequence
from plait.tensor.hf_plans import PlanTable

WHOLE_KINDS = ("vocab_embed", "vocab_head")


def sequence_parallel_plan(model: nn.Module, plan: PlanTable) -> PlanTable:
    """`plan` (from `tp_plan_for`) for sequence parallel: embeddings and head whole, attention gathering
    its input, every other replicated parameter of the layers (norms) marked as getting partial gradients."""
    arch = _architecture(model)
    names = [name for name, _ in model.named_modules() if name]
    attention = [name for name in names if (style := _style_of(plan, name)) is not None and style.kind == "heads"]
    if not attention:
        raise ValueError(
            f"sequence parallel needs the attention modules of {type(model).__name__} in its plan (style 'heads'); "
            "give the registry entry an attention= path, or set plan.sequence_parallel=False"
        )
    out: PlanTable = {}
    for pattern, style in plan.items():
        out[pattern] = _sequence_style(pattern, _as_style(style), names=names, attention=attention)
    return out | _partial_norms(model, arch, plan, attention=attention)


def bracket_layers(model: nn.Module, *, group: ProcessGroup | None) -> None:
    """Scatter the sequence at the first layer's input and gather it at the last layer's output."""
    arch = _architecture(model)
    layers = model.get_submodule(arch.layers)
    first, last = f"{arch.layers}.0", f"{arch.layers}.{len(layers) - 1}"
    HiddenStatesHook(scatter_sequence, group=group, name=first).register(layers[0], on_input=True)
    HiddenStatesHook(gather_sequence_no_reduce, group=group, name=last).register(layers[-1], on_input=False)


def _architecture(model: nn.Module) -> Architecture:
    arch = find_architecture(model)
    if arch is None:
        raise ValueError(
            f"sequence parallel for {type(model).__name__} needs its entry in plait's architecture registry (where "
            "its layers are); add one to plait.models.architectures, or set plan.sequence_parallel=False"
        )
    return arch


def _style_of(plan: PlanTable, name: str) -> Style | None:
    pattern = next((p for p in plan if fnmatch.fnmatchcase(name, p)), None)
    return None if pattern is None else _as_style(plan[pattern])


def _sequence_style(pattern: str, style: Style, *, names: list[str], attention: list[str]) -> Style:
    if style.kind in WHOLE_KINDS:
        return Style(style.kind, style.partition, sequence_input="whole")
    if style.kind == "heads":
        return Style("heads", sequence_input="gather")
    first = next(name for name in names if fnmatch.fnmatchcase(name, pattern))
    if style.kind == "colwise" and any(first.startswith(f"{parent}.") for parent in attention):
        return Style("colwise", style.partition, sequence_input="gathered")
    return style


def _partial_norms(model: nn.Module, arch: Architecture, plan: PlanTable, *, attention: list[str]) -> PlanTable:
    """'sequence_norm' for every module of a layer that holds parameters the plan leaves replicated,
    outside attention (norms): it runs on this rank's chunk, so its gradient is partial."""
    first_layer = f"{arch.layers}.0"
    out: PlanTable = {}
    for rel, module in model.get_submodule(first_layer).named_modules():
        if not rel or next(module.parameters(recurse=False), None) is None:
            continue
        name = f"{first_layer}.{rel}"
        planned = _style_of(plan, name) is not None
        if not planned and not any(name.startswith(f"{parent}.") for parent in attention):
            out[f"{arch.layers}.*.{rel}"] = "sequence_norm"
    return out
