"""What the planner needs of a model: parameters per unit, split into what tensor parallel shards and what it copies.

Built from a `GPTConfig` (a preset or a Hugging Face config.json), never from
weights. The units are those plait's ZeRO flattens (one per layer, one per
other child module), so per-unit padding is counted as the runtime pads.

Mixture of Experts: tp splits every expert (its up/gate weights and biases
by columns, its down weight by rows; the down bias whole) as well as the
attention; the router and shared experts stay whole on every tp rank. Under
expert parallel (ep > 1) the layer's experts form a unit of
their own holding num_experts / ep experts (`Unit.expert`: reduced and sharded
over the edp group, dp / ep ranks), as the runtime's ZeRO builds them; at
ep = 1 they stay in the layer's unit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from plait.models.gpt_config import GPTConfig
from plait.models.presets import get_preset, preset_names


@dataclass(frozen=True)
class Unit:
    """Parameters of one module: `sharded` elements tp divides, `replicated` ones every tp rank holds whole."""

    name: str
    sharded: int
    replicated: int
    num_tensors: int
    expert: bool = False  # an expert-parallel unit: reduced and sharded over edp (dp / ep ranks), not dp

    def local(self, tp: int) -> int:
        return self.sharded // tp + self.replicated


@dataclass(frozen=True)
class ModelShape:
    """A decoder's sizes, and its parameters as the units plait's runtime builds."""

    config: GPTConfig
    name: str = "model"

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def hidden(self) -> int:
        return self.config.d_model

    @property
    def vocab(self) -> int:
        return self.config.vocab_size

    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def layer_unit(self) -> Unit:
        """One dense transformer layer: q/k/v/gate/up are split by columns, o/down by rows (their biases stay whole)."""
        c = self.config
        f = c.resolved_d_ff
        num_in = 2 if c.activation == "swiglu" else 1
        bias = 1 if c.bias else 0
        attention = self._attention_unit()
        sharded = attention.sharded + num_in * (c.d_model * f + bias * f) + f * c.d_model
        num_tensors = attention.num_tensors + (num_in + 1) * (1 + bias)
        return Unit("layer", sharded=sharded, replicated=attention.replicated + bias * c.d_model,
                    num_tensors=num_tensors)  # fmt: skip

    def _attention_unit(self) -> Unit:
        """A layer without its MLP: q/k/v/o (split under tp), the output projection's bias and the norms."""
        c = self.config
        d, kv = c.d_model, c.resolved_num_kv_heads * c.head_dim
        bias = 1 if c.bias else 0
        norm = d * (2 if c.norm == "layernorm" and c.bias else 1)
        num_norms = 1 if c.parallel_block else 2
        sharded = d * (d + 2 * kv) + bias * (d + 2 * kv) + d * d
        replicated = bias * d + num_norms * norm
        num_tensors = 4 * (1 + bias) + num_norms * (2 if c.norm == "layernorm" and c.bias else 1)
        return Unit("attention", sharded=sharded, replicated=replicated, num_tensors=num_tensors)

    def _mlp_parameters(self, d_ff: int) -> int:
        """One MLP of width `d_ff` in the model's style (an expert, or the shared experts together)."""
        c = self.config
        num_in = 2 if c.activation == "swiglu" else 1
        return (num_in + 1) * c.d_model * d_ff + ((num_in * d_ff + c.d_model) if c.bias else 0)

    def _router_and_shared(self) -> int:
        """An MoE layer's parameters besides attention and its routed experts."""
        c = self.config
        shared = self._mlp_parameters(c.moe_shared_experts * c.resolved_moe_d_ff) if c.moe_shared_experts else 0
        return c.d_model * c.moe_experts + shared

    def _mlp_tensors(self) -> int:
        return (3 if self.config.activation == "swiglu" else 2) * (2 if self.config.bias else 1)

    def expert_unit(self, ep: int) -> Unit:
        """The num_experts / ep experts one ep rank holds of one MoE layer (stacked weights): split over tp
        but for the down projection's bias."""
        c = self.config
        count = c.moe_experts // ep
        whole = count * c.d_model if c.bias else 0  # the down biases, added once after the tp sum
        return Unit("experts", sharded=count * self._mlp_parameters(c.resolved_moe_d_ff) - whole, replicated=whole,
                    num_tensors=self._mlp_tensors(), expert=True)  # fmt: skip

    def moe_layer_units(self, ep: int = 1) -> list[Unit]:
        """One MoE layer: attention and experts (split under tp), router and shared experts (whole on every
        tp rank); at ep > 1 the experts are a unit of their own."""
        attention = self._attention_unit()
        sharded, replicated = attention.sharded, attention.replicated + self._router_and_shared()
        num_tensors = attention.num_tensors + 1 + (self._mlp_tensors() if self.config.moe_shared_experts else 0)
        experts = self.expert_unit(ep)
        if ep == 1:
            sharded, replicated = sharded + experts.sharded, replicated + experts.replicated
            num_tensors += experts.num_tensors
        layer = Unit("layer", sharded=sharded, replicated=replicated, num_tensors=num_tensors)
        return [layer] if ep == 1 else [layer, experts]

    def layer_units(self, index: int, *, ep: int = 1) -> list[Unit]:
        """The units of layer `index` (from 0)."""
        return self.moe_layer_units(ep) if self.config.is_moe_layer(index) else [self.layer_unit()]

    def vocab_rows(self, tp: int) -> int:
        """Rows of the embedding each tp rank holds (the vocabulary padded to a multiple of tp)."""
        return math.ceil(self.vocab / tp)

    def first_units(self, tp: int) -> list[Unit]:
        """Units only the first pipeline stage holds: token (and learned position) embeddings."""
        d = self.hidden
        units = [Unit("embed", sharded=self.vocab_rows(tp) * d * tp, replicated=0, num_tensors=1)]
        if self.config.position == "learned":
            units.append(Unit("pos_embed", sharded=0, replicated=self.config.max_seq_len * d, num_tensors=1))
        return units

    def last_units(self, tp: int, *, with_embedding: bool) -> list[Unit]:
        """Units only the last stage holds: final norm and LM head (a tied head owns no unit unless the
        embedding lives on another stage, where the last stage keeps a copy)."""
        c = self.config
        norm = c.d_model * (2 if c.norm == "layernorm" and c.bias else 1)
        units = [Unit("norm_f", sharded=0, replicated=norm, num_tensors=2 if norm > c.d_model else 1)]
        if not c.tied_embeddings or not with_embedding:
            units.append(Unit("lm_head", sharded=self.vocab_rows(tp) * c.d_model * tp, replicated=0, num_tensors=1))
        return units

    def stage_units(
        self, stage: int, *, num_layers: int, pp: int, tp: int, ep: int = 1, layers: Sequence[int] | None = None
    ) -> list[Unit]:
        """The units pipeline stage `stage` of `pp` holds, with `num_layers` layers (`layers`: their
        indices, which decide which are MoE layers; default the first `num_layers`)."""
        units = self.first_units(tp) if stage == 0 else []
        for index in range(num_layers) if layers is None else layers:
            units += self.layer_units(index, ep=ep)
        if stage == pp - 1:
            units += self.last_units(tp, with_embedding=stage == 0)
        return units

    def layer_flops_per_token(self, seq_len: int, *, tp: int = 1, moe: bool = False) -> float:
        """Forward FLOPs per token of one layer on one tp rank: 2 per matmul weight plus attention's 4*s*d.
        An MoE layer counts the weights a token computes with: its top_k experts (split over tp), the router
        and the shared experts (whole on every tp rank)."""
        if not moe:
            return (2.0 * self.layer_unit().sharded + 4.0 * seq_len * self.hidden) / tp
        c = self.config
        experts = c.moe_top_k * self._mlp_parameters(c.resolved_moe_d_ff)
        split = 2.0 * (self._attention_unit().sharded + experts) + 4.0 * seq_len * self.hidden
        return split / tp + 2.0 * self._router_and_shared()

    def stage_flops_per_token(self, layers: Sequence[int], seq_len: int, *, tp: int = 1) -> float:
        """Forward FLOPs per token of these layers on one tp rank."""
        dense = self.layer_flops_per_token(seq_len, tp=tp)
        moe = self.layer_flops_per_token(seq_len, tp=tp, moe=True) if self.config.moe_experts else 0.0
        return sum(moe if self.config.is_moe_layer(i) else dense for i in layers)

    def head_flops_per_token(self, *, tp: int = 1) -> float:
        return 2.0 * self.vocab_rows(tp) * self.hidden


def load_shape(model: str) -> ModelShape:
    """A preset name (`plait.models.preset_names()`) or a path to a Hugging Face config.json (or its directory)."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(
                f"--model {model}: no such file; pass a preset ({', '.join(preset_names())}) or a config.json"
            )
        from plait.checkpoint.hf_config import gpt_config_from_hf

        _, config = gpt_config_from_hf(json.loads(path.read_text()))
        return ModelShape(config, name=path.parent.name or path.stem)
    return ModelShape(get_preset(model), name=model)
