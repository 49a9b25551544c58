"""What the planner needs of a model: parameters per unit, split into what tensor parallel shards and what it copies.

Built from a `GPTConfig` (a preset or a Hugging Face config.json), never from
weights. The units are those plait's ZeRO flattens (one per layer, one per
other child module), so per-unit padding is counted as the runtime pads.
"""

from __future__ import annotations

import json
import math
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
        """One transformer layer: q/k/v/gate/up are split by columns, o/down by rows (their biases stay whole)."""
        c = self.config
        d, kv, f = c.d_model, c.resolved_num_kv_heads * c.head_dim, c.resolved_d_ff
        num_in = 2 if c.activation == "swiglu" else 1
        bias = 1 if c.bias else 0
        sharded = d * (d + 2 * kv) + bias * (d + 2 * kv) + d * d + num_in * (d * f + bias * f) + f * d
        norm = d * (2 if c.norm == "layernorm" and c.bias else 1)
        num_norms = 1 if c.parallel_block else 2
        replicated = 2 * bias * d + num_norms * norm
        num_linears = 4 + num_in + 1
        num_tensors = num_linears * (1 + bias) + num_norms * (2 if c.norm == "layernorm" and c.bias else 1)
        return Unit("layer", sharded=sharded, replicated=replicated, num_tensors=num_tensors)

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

    def stage_units(self, stage: int, *, num_layers: int, pp: int, tp: int) -> list[Unit]:
        """The units pipeline stage `stage` of `pp` holds, with `num_layers` layers."""
        units = self.first_units(tp) if stage == 0 else []
        units += [self.layer_unit()] * num_layers
        if stage == pp - 1:
            units += self.last_units(tp, with_embedding=stage == 0)
        return units

    def layer_flops_per_token(self, seq_len: int, *, tp: int = 1) -> float:
        """Forward FLOPs per token of one layer on one tp rank: 2 per matmul weight plus attention's 4*s*d."""
        return (2.0 * self.layer_unit().sharded + 4.0 * seq_len * self.hidden) / tp

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
