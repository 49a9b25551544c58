"""Building blocks of GPT: norms, rotary positions, attention, MLP (dense, or Mixture of Experts).

Each module with parameters has ``reset_parameters()`` so a model built on the meta
device can be materialised and initialised module by module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from plait.models.gpt_config import GPTConfig
from plait.models.kept_inputs import keep_inputs
from plait.moe import MoEConfig, MoELayer

if TYPE_CHECKING:
    from plait.models.kv_cache import KVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm in Llama's order of operations.

    Normalises in fp32, casts back to the input dtype, then scales by ``weight``.
    ``torch.nn.RMSNorm`` scales before casting back, which differs in bf16, so exported
    weights would not reproduce Hugging Face's logits bit for bit.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the scale to ones."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return keep_inputs(self._norm, x, self.weight)  # keeps x, not its fp32 copy and the normed tensor

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(config: GPTConfig) -> nn.Module:
    """The norm layer ``config`` asks for (LayerNorm's bias follows ``config.bias``)."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, *, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables for rotary embeddings, each ``(*positions.shape, head_dim/2)``.

    Frequency ``i`` is ``theta ** (-2i / head_dim)``, as in Llama; computed in fp32.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, heads, seq, head_dim) by position, in the half-split layout.

    Pairs dimension ``j`` with ``j + head_dim/2`` (Hugging Face's ``rotate_half``
    convention, not the interleaved pairs of the original RoPE code), so weights move
    to and from ``LlamaForCausalLM`` without permuting q/k rows.
    ``cos``/``sin`` are (seq, head_dim/2) or (batch, seq, head_dim/2).
    """
    if cos.dim() == 3:  # per-sample positions: add the heads dim
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    halves = (first * cos - second * sin, second * cos + first * sin)
    # Joined in (batch, seq, heads) memory order, the projections': attention's output then keeps it and
    # reaches o_proj as a view, not as one more copy kept for backward.
    return torch.cat([half.transpose(1, 2) for half in halves], dim=-1).transpose(1, 2)


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) True where a query may attend: causal, and inside its own document.

    ``position_ids`` (batch, seq) restart at 0 where a packed document starts
    (``plait.data.document_positions``), so each 0 opens a document.

    Example:
        >>> document_causal_mask(torch.tensor([[0, 1, 0, 1]]))[0, 0].int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 0, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
    """
    document = (position_ids == 0).cumsum(dim=-1)  # (batch, seq)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (document[:, :, None] == document[:, None, :]))[:, None]


_DOCUMENT_MASK = "plait_document_mask"  # the attribute of a position_ids tensor that keeps its mask


def document_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``document_causal_mask`` as the additive mask (0 where visible, -inf elsewhere) that
    scaled_dot_product_attention turns a bool mask into, made once per batch and kept on the
    ``position_ids`` tensor: every layer then passes, and saves for backward, the same
    (batch, 1, seq, seq) tensor instead of converting and keeping a copy of its own."""
    kept = getattr(position_ids, _DOCUMENT_MASK, None)
    if kept is None or kept.dtype != dtype:
        visible = document_causal_mask(position_ids)
        kept = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
        setattr(position_ids, _DOCUMENT_MASK, kept)
    return kept


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v/o projections and optional GQA/RoPE.

    ``num_heads``, ``num_kv_heads`` and ``head_dim`` are instance attributes read by
    ``forward``: tensor parallelism shards the projections column-wise and then sets the
    local head counts here.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.resolved_num_kv_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta if config.position == "rope" else None
        self.attn_dropout = config.dropout
        self.init_std = config.init_std
        self.out_init_std = config.init_std / math.sqrt(2 * config.num_layers)
        d, q_width, kv_width = config.d_model, config.d_model, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, q_width, bias=config.bias)
        self.k_proj = nn.Linear(d, kv_width, bias=config.bias)
        self.v_proj = nn.Linear(d, kv_width, bias=config.bias)
        self.o_proj = nn.Linear(q_width, d, bias=config.bias)
        # Context parallel (plait.context) sets this to attention over the cp ring: (q, k, v, *, position_ids).
        self.context_attention: Callable[..., torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, GPT-2's scaled std for ``o_proj``, zero biases."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            _init_linear(proj, std=self.init_std)
        _init_linear(self.o_proj, std=self.out_init_std)

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        query = self.q_proj(x)
        batch, seq, _ = query.shape  # the projections' length: under sequence parallel x holds a chunk
        q = self._split_heads(query, self.num_heads)  # (batch, heads, seq, head_dim)
        k = self._split_heads(self.k_proj(x), self.num_kv_heads)
        v = self._split_heads(self.v_proj(x), self.num_kv_heads)
        if self.rope_theta is not None:
            if position_ids is None:
                position_ids = torch.arange(seq, device=x.device)
            cos, sin = rope_cos_sin(position_ids, self.head_dim, theta=self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.context_attention is not None:  # k/v travel the ring with their own (fewer) heads
            out = self.context_attention(q, k, v, position_ids=position_ids)
            out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
            return self.o_proj(out)
        gqa = self._sdpa_groups_heads(q)
        if not gqa:
            k, v = self._repeat_kv(k), self._repeat_kv(v)
        dropout_p = self.attn_dropout if self.training else 0.0
        if position_ids is not None and position_ids.dim() == 2:  # packed documents: attend within each
            mask = document_attention_mask(position_ids, q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def decode(self, x: torch.Tensor, cache: KVCache, *, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """Inference only: attention of the new positions ``x`` (batch, new, d_model) over ``cache``'s
        past and themselves; their keys/values join the cache. ``positions`` from ``cache.reserve``."""
        batch, seq, _ = x.shape
        q = self._split_heads(self.q_proj(x), self.num_heads)  # (batch, heads, new, head_dim)
        k = self._split_heads(self.k_proj(x), self.num_kv_heads)
        v = self._split_heads(self.v_proj(x), self.num_kv_heads)
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(positions, self.head_dim, theta=self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.append(layer, k, v)  # (batch, kv_heads, past + new, head_dim)
        gqa = self._sdpa_groups_heads(q)
        if not gqa:
            k, v = self._repeat_kv(k), self._repeat_kv(v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.attention_mask(x.device), enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))

    def _split_heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, num_heads, self.head_dim).transpose(1, 2)

    def _sdpa_groups_heads(self, q: torch.Tensor) -> bool:
        """Whether SDPA reads each kv head for its group of query heads itself (``enable_gqa``), so no
        repeated copy of K and V is made or kept for backward: on CPU (the fused flash kernel) and in
        16-bit on GPU (flash attention). fp32 on GPU relies on the memory-efficient kernel, which
        ``enable_gqa`` rules out."""
        grouped = self.num_heads != self.num_kv_heads
        return grouped and (q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16))

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat each kv head for its group of query heads (query head h uses kv h // group)."""
        group = self.num_heads // self.num_kv_heads
        if group == 1:
            return x
        batch, num_kv_heads, seq, head_dim = x.shape
        expanded = x[:, :, None].expand(batch, num_kv_heads, group, seq, head_dim)
        return expanded.reshape(batch, num_kv_heads * group, seq, head_dim)


class MLP(nn.Module):
    """GPT-2's tanh-GELU MLP (``up_proj``, ``down_proj``) or Llama's SwiGLU (+ ``gate_proj``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d, d_ff = config.d_model, config.resolved_d_ff
        self.init_std = config.init_std
        self.out_init_std = config.init_std / math.sqrt(2 * config.num_layers)
        swiglu = config.activation == "swiglu"
        self.gate_proj = nn.Linear(d, d_ff, bias=config.bias) if swiglu else None
        self.up_proj = nn.Linear(d, d_ff, bias=config.bias)
        self.down_proj = nn.Linear(d_ff, d, bias=config.bias)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, GPT-2's scaled std for ``down_proj``, zero biases."""
        if self.gate_proj is not None:
            _init_linear(self.gate_proj, std=self.init_std)
        _init_linear(self.up_proj, std=self.init_std)
        _init_linear(self.down_proj, std=self.out_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(keep_inputs(_swiglu, self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def moe_config(config: GPTConfig) -> MoEConfig:
    """The MoE layer options of ``config``; experts follow the dense MLP's style and init rules."""
    return MoEConfig(
        d_model=config.d_model,
        d_ff=config.resolved_moe_d_ff,
        num_experts=config.moe_experts,
        top_k=config.moe_top_k,
        capacity_factor=config.moe_capacity_factor,
        softmax_order=config.moe_softmax_order,
        normalize_topk=config.moe_normalize_topk,
        aux_loss_weight=config.moe_aux_loss_weight,
        z_loss_weight=config.moe_z_loss_weight,
        activation=config.activation,
        bias=config.bias,
        init_std=config.init_std,
        out_init_std=config.init_std / math.sqrt(2 * config.num_layers),
    )


def build_mlp(config: GPTConfig, *, moe: bool = False) -> nn.Module:
    """The dense ``MLP``, or (``moe=True``) an ``MoELayer`` whose shared experts are one dense MLP."""
    if not moe:
        return MLP(config)
    shared = None
    if config.moe_shared_experts:
        shared = MLP(dataclasses.replace(config, d_ff=config.moe_shared_experts * config.resolved_moe_d_ff))
    return MoELayer(moe_config(config), shared=shared)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _init_linear(linear: nn.Linear, *, std: float) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
