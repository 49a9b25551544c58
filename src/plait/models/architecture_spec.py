"""One architecture registry entry: where a model family keeps its parts (see plait.models.architectures)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


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
