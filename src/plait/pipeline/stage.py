"""One pipeline stage's part of a decoder model, under the model's own parameter names.

A :class:`PipelineStage` holds references to the original submodules it runs,
registered under their original dotted paths, so ``stage.named_parameters()`` yields
``"blocks.3.attn.q_proj.weight"`` or ``"model.layers.3.mlp.up_proj.weight"`` exactly
as the full model names them: checkpoints, placement records and parallel plans line
up. The full model is not changed; :func:`release_unused` frees what no stage holds.

Its forward runs, in turn: on the first stage the embeddings (from ``input_ids``),
then its layers, and on the last stage the final norm and LM head (to logits).
Supported: plait's GPT and every family of plait's architecture registry
(``plait.models.architectures``): the model's own submodules are called as its own
forward calls them, with the attention masks built by transformers' own builders.

Tied embeddings: the first stage holds ``embed.weight`` and the last stage
``lm_head.weight``. When they run on different ranks the last stage gets its own copy
of the weight, and ``tied_pairs`` names the pair, so the runtime can sum the two
gradients over a (first, last) process group every step to keep them equal. When the
first and last stages share a rank, the weight stays tied.

Example:
    >>> ranges = partition_layers(model, pp=2, seq_len=128)
    >>> stages = [build_stage(model, stage_index=i, num_stages=2, layer_ranges=ranges) for i in range(2)]
    >>> logits = stages[1](stages[0](input_ids))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.placement import placement_of, set_placement
from plait.models.architectures import Architecture, present_paths
from plait.pipeline.partition import decoder_layout

__all__ = ["PipelineStage", "StageSpec", "build_stage", "build_stage_chunks", "release_unused"]


@dataclass(frozen=True)
class StageSpec:
    """Which (virtual) stage this is, of how many, and the layer indices it runs."""

    index: int
    num_stages: int
    layers: range

    @property
    def is_first(self) -> bool:
        """Whether this stage takes ``input_ids`` (and holds the embeddings)."""
        return self.index == 0

    @property
    def is_last(self) -> bool:
        """Whether this stage returns logits (and holds the final norm and LM head)."""
        return self.index == self.num_stages - 1


class PipelineStage(nn.Module):
    """The modules of one pipeline stage, named as in the full model; call it on one micro-batch.

    ``forward(inputs, *, position_ids=None, attention_mask=None)``: ``inputs`` are
    ``input_ids`` (batch, seq) on the first stage and hidden states (batch, seq,
    d_model) elsewhere; it returns hidden states, or logits (batch, seq, vocab) on the
    last stage. ``attention_mask`` is the Hugging Face padding mask (plait's GPT, like
    its full forward, ignores it); pass every stage the micro-batch's
    ``position_ids``/``attention_mask`` alike.

    Attributes: ``spec`` (:class:`StageSpec`), ``layout`` (:class:`DecoderLayout`),
    ``tied_pairs`` (``[(name on the first stage, name on the last stage)]``, the same on
    every stage; empty when the tied weights share one Parameter).
    """

    def __init__(self, model: nn.Module, spec: StageSpec, *, untie: bool) -> None:
        super().__init__()
        self.spec = spec
        self.layout = decoder_layout(model)
        self.input_key = self.layout.inputs  # the batch entry the first stage embeds
        self.hf_config = None if self.layout.is_plait else getattr(model, "config", None)
        pairs = _tied_pairs(model, self.layout)
        self.tied_pairs = pairs if untie else []
        self.layer_paths = [f"{self.layout.layers}.{index}" for index in spec.layers]
        held = _held_paths(model, self.layout, spec)
        self._held = set(held)
        for path in held:
            _graft(self, path, model.get_submodule(path))
        if spec.is_last and self.layout.head is not None:
            self._held.add(self.layout.head)
            head = model.get_submodule(self.layout.head)
            tied = {param for _, param in _first_stage_params(model, self.layout)}
            _graft(self, self.layout.head, _untied_copy(head, tied) if self.tied_pairs else head)

    def forward(
        self,
        inputs: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self._embed(inputs, position_ids, attention_mask) if self.spec.is_first else inputs
        kwargs_of = self._layer_kwargs(hidden, position_ids, attention_mask)
        for index, path in zip(self.spec.layers, self.layer_paths, strict=True):
            output = self.get_submodule(path)(hidden, **kwargs_of(index))
            hidden = output[0] if isinstance(output, tuple) else output  # some families return (hidden, ...)
        if not self.spec.is_last:
            return hidden
        return self._head(hidden) if self.layout.is_plait else self._hf_output(self._head(hidden))

    def _hf_output(self, output: torch.Tensor) -> Any:
        """The last stage's output in the type the model's own forward returns, so a loss reads
        ``.logits`` / ``.last_hidden_state`` under any plan."""
        from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

        return CausalLMOutput(logits=output) if self.layout.head else BaseModelOutput(last_hidden_state=output)

    def _modules_at(self, paths: Sequence[str]) -> list[nn.Module]:
        return [self.get_submodule(path) for path in paths if path in self._held]

    def _embed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.input_key != "input_ids":  # images: the embeddings module adds its own positions
            return self.get_submodule(self.layout.embed)(input_ids)  # (batch, tokens, d_model)
        if input_ids.dim() != 2:
            raise ValueError(
                f"the first pipeline stage takes input_ids (batch, seq), got shape {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids[None]"
            )
        layout = self.layout
        hidden = self.get_submodule(layout.embed)(input_ids)  # (batch, seq, d_model)
        for module in self._modules_at(layout.before_positions):
            hidden = module(hidden)
        if layout.positions in self._held:
            hidden = hidden + self._positions(input_ids, position_ids, attention_mask)
        for module in self._modules_at(layout.after_embed):
            hidden = module(hidden)
        return hidden

    def _positions(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Learned position embeddings, called as the model's own forward calls them."""
        module = self.get_submodule(self.layout.positions)
        positions = position_ids if position_ids is not None else _arange_like(input_ids)
        if not self.layout.positions_from_mask:
            return module(positions)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return module(mask, 0, position_ids=positions.expand_as(input_ids))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        for path in self.layout.last_paths():
            if path not in self._held:
                continue
            if path == self.layout.head and self.layout.head_on_first_token:
                hidden = hidden[:, 0]  # (batch, d_model): the class token, as the model's forward pools
            hidden = self.get_submodule(path)(hidden)
        cap = getattr(self.hf_config, self.layout.logit_softcap, None) if self.layout.logit_softcap else None
        return torch.tanh(hidden / cap) * cap if cap else hidden  # the soft-capping the model's forward applies

    def _layer_kwargs(
        self, hidden: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> Callable[[int], dict[str, Any]]:
        """Layer index -> the keywords that layer takes: what the model's forward computes before its layers."""
        if self.layout.is_plait:
            return lambda index: {"position_ids": position_ids}
        positions = position_ids if position_ids is not None else _arange_like(hidden)
        if positions.dim() == 1:  # Hugging Face layers and masks take (batch, seq) positions
            positions = positions[None]
        hidden = _whole_sequence(hidden, positions)
        masks = hf_attention_masks(self.hf_config, hidden, attention_mask, positions, causal=self.layout.causal)
        kwargs: dict[str, Any] = {"position_ids": positions, "use_cache": False, **self.layout.layer_kwargs}
        if self.layout.rotary is not None:
            kwargs["position_embeddings"] = self.get_submodule(self.layout.rotary)(hidden, position_ids=positions)
        layer_types = getattr(self.hf_config, "layer_types", None)
        if isinstance(masks, dict):  # one mask per attention type (sliding / full), as the model's forward picks
            return lambda index: kwargs | {"attention_mask": masks[layer_types[index]]}
        return lambda index: kwargs | {"attention_mask": masks}


def hf_attention_masks(
    config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor, *, causal: bool
) -> Any:
    """The attention mask(s) a Hugging Face model builds before its layers, from transformers' own builders:
    a dict by layer type for families that mix sliding and full attention."""
    # Imported here: plait's own GPT must not need transformers.
    from transformers.masking_utils import create_bidirectional_mask, create_masks_for_generate

    if not causal:
        return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    return create_masks_for_generate(
        config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=positions
    )


def _whole_sequence(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A stand-in spanning the whole sequence for what reads only shapes (masks, rotary tables): under
    sequence parallel a stage receives its chunk of the sequence, but attention runs on all of it."""
    if hidden.shape[1] == positions.shape[-1]:
        return hidden
    return hidden[:, :1].expand(-1, positions.shape[-1], -1)  # no copy


def _arange_like(inputs: torch.Tensor) -> torch.Tensor:
    return torch.arange(inputs.shape[1], device=inputs.device)


def _held_paths(model: nn.Module, layout: Architecture, spec: StageSpec) -> list[str]:
    """Module paths this stage holds, the LM head aside (it may need its own copy)."""
    paths = layout.shared_paths()
    if spec.is_first:
        paths += layout.first_paths()
    paths += [f"{layout.layers}.{index}" for index in spec.layers]
    if spec.is_last:
        paths += [path for path in layout.last_paths() if path != layout.head]
    return present_paths(model, paths)


def _graft(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` under dotted ``path`` in ``root``, adding empty containers on the way."""
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        child = dict(node.named_children()).get(name)
        if child is None:
            child = nn.Module()
            node.add_module(name, child)
        node = child
    node.add_module(leaf, module)


def _first_stage_params(model: nn.Module, layout: Architecture) -> list[tuple[str, nn.Parameter]]:
    return [
        (f"{path}.{name}", param)
        for path in present_paths(model, layout.first_paths())
        for name, param in model.get_submodule(path).named_parameters()
    ]


def _tied_pairs(model: nn.Module, layout: Architecture) -> list[tuple[str, str]]:
    """(first-stage name, LM-head name) of every parameter the LM head shares with the embeddings."""
    if layout.head is None:
        return []
    first = {param: name for name, param in _first_stage_params(model, layout)}
    head = model.get_submodule(layout.head)
    return [
        (first[param], f"{layout.head}.{name}")
        for name, param in head.named_parameters(remove_duplicate=False)
        if param in first
    ]


def _untied_copy(head: nn.Module, tied: set[nn.Parameter]) -> nn.Module:
    """A copy of ``head`` with its own copies of the ``tied`` parameters, sharing everything else."""
    keep = {id(tensor): tensor for tensor in [*head.parameters(), *head.buffers()] if tensor not in tied}
    for module in head.modules():  # process groups (a tensor-parallel head) are shared, never copied
        keep |= {id(value): value for value in vars(module).values() if isinstance(value, dist.ProcessGroup)}
    copied = copy.deepcopy(head, memo=keep)
    for original in tied:  # the copy is laid out as the original is (a tensor-parallel shard keeps its record)
        placement = placement_of(original)
        if placement is not None and id(original) in keep:
            set_placement(keep[id(original)], placement)
    return copied


def _check_ranges(layer_ranges: Sequence[range], *, num_stages: int, num_layers: int) -> None:
    if len(layer_ranges) != num_stages:
        raise ValueError(f"got {len(layer_ranges)} layer ranges for {num_stages} stages; pass one range per stage")
    covered = [index for layers in layer_ranges for index in layers]
    inner = layer_ranges[1:-1] if num_stages > 1 else layer_ranges  # the ends may hold only embedding / head
    if covered != list(range(num_layers)) or any(len(layers) == 0 for layers in inner):
        raise ValueError(
            f"layer ranges {list(layer_ranges)} must be contiguous, in order, cover the model's {num_layers} "
            "layers exactly once and leave no stage empty but the first (embedding alone) or the last (head "
            "alone); build them with partition_layers"
        )


def _num_layers(model: nn.Module) -> int:
    return len(model.get_submodule(decoder_layout(model).layers))


def build_stage(model: nn.Module, *, stage_index: int, num_stages: int, layer_ranges: Sequence[range]) -> PipelineStage:
    """Stage ``stage_index`` of ``num_stages`` (one stage per rank), running ``layer_ranges[stage_index]``.

    The tied LM head of the last stage gets its own weight when ``num_stages > 1``.
    """
    _check_ranges(layer_ranges, num_stages=num_stages, num_layers=_num_layers(model))
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index={stage_index} must be in 0..{num_stages - 1}")
    spec = StageSpec(stage_index, num_stages, layer_ranges[stage_index])
    return PipelineStage(model, spec, untie=num_stages > 1)


def build_stage_chunks(
    model: nn.Module, *, rank: int, num_ranks: int, num_chunks: int, ranges: Sequence[range]
) -> list[PipelineStage]:
    """The ``num_chunks`` stages of pipeline rank ``rank`` (interleaved schedules).

    Chunk ``c`` is virtual stage ``c * num_ranks + rank`` of ``num_ranks * num_chunks``;
    ``ranges`` has one layer range per virtual stage. With one rank, every chunk lives
    together and a tied weight stays one Parameter, shared by the first and last chunk.
    """
    num_stages = num_ranks * num_chunks
    _check_ranges(ranges, num_stages=num_stages, num_layers=_num_layers(model))
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank={rank} must be in 0..{num_ranks - 1}: this rank's place in the pipeline")
    specs = [StageSpec(c * num_ranks + rank, num_stages, ranges[c * num_ranks + rank]) for c in range(num_chunks)]
    return [PipelineStage(model, spec, untie=num_ranks > 1) for spec in specs]


@torch.no_grad()
def release_unused(model: nn.Module, stages: Sequence[nn.Module]) -> int:
    """Move to the meta device every parameter of ``model`` that none of ``stages`` holds.

    Frees this rank's memory for the other stages' weights; afterwards the full model
    cannot run, only the stages. Returns the number of parameter elements freed.
    """
    kept = {param for stage in stages for param in stage.parameters()}
    replaced: dict[nn.Parameter, nn.Parameter] = {}  # one meta stand-in per Parameter keeps ties tied
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param in kept or param.device.type == "meta":
                continue
            if param not in replaced:
                replaced[param] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            setattr(module, name, replaced[param])
    return sum(param.numel() for param in replaced)
