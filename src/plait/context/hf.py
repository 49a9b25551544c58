"""Hugging Face models under context parallel, through transformers' own attention registry.

``AttentionInterface.register`` adds ring attention under the name ``plait_ring``; a model set to
it (``set_attn_implementation``) calls it from its unchanged attention layers with this rank's
queries and (grouped-query) keys/values, after its rotary embeddings took the tokens' global
``position_ids`` (``plait.context.batch``). Each attention layer carries the ring in a
``context_attention`` attribute, as plait's own layers do. The mask registered under the same name
builds nothing: the ring masks causally from the global positions itself, so no mask of the
rank's tokens squared is made.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

RING_ATTENTION = "plait_ring"
# Model types whose training under cp matches one process (tests/distributed/test_context_hf.py). Phi-3 is
# not yet: its losses match but an embedding row ends 1e-5 off (float-noise gradients Adam amplifies, as
# under dp x tp x pp); OPT scales its queries in the projection (attention scaling 1.0).
CP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox", "falcon")


def ring_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (batch, heads, seq, head_dim) in, (batch, seq, heads, head_dim) out."""
    attention = getattr(module, "context_attention", None)
    if attention is None:
        raise ValueError(f"{type(module).__name__} runs {RING_ATTENTION!r} without a cp ring: apply plait's plan.cp")
    if dropout:
        raise ValueError(f"attention dropout ({dropout}) under plan.cp is not available yet in plait")
    if scaling is not None and not math.isclose(scaling, query.shape[-1] ** -0.5, rel_tol=1e-6):
        raise ValueError(
            f"attention scaling {scaling} (not head_dim ** -0.5) under plan.cp is not available yet in plait"
        )
    out = attention(query, key, value)
    return out.transpose(1, 2).contiguous(), None


def no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask function for ``plait_ring``: none (the ring masks from global positions)."""
    return None


def register() -> None:
    """Add ``plait_ring`` to transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(RING_ATTENTION, ring_attention_forward)
    AttentionMaskInterface.register(RING_ATTENTION, no_mask)


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def hf_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The causal self-attention layers that call transformers' attention interface (they hold
    ``layer_idx``, ``scaling`` and ``is_causal``); raises for a model whose attention cannot take the ring."""
    config = model.config
    if config.model_type not in CP_MODEL_TYPES:
        raise ValueError(
            f"plan.cp > 1 with a Hugging Face {config.model_type!r} model is not available yet in plait (under cp: "
            f"{', '.join(CP_MODEL_TYPES)}); set plan.cp=1"
        )
    layers = [m for m in model.modules() if all(hasattr(m, a) for a in ("layer_idx", "scaling", "is_causal"))]
    if not layers or not all(layer.is_causal for layer in layers) or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"plan.cp > 1 with {type(model).__name__}: only decoder-only causal models whose attention goes through "
            "transformers' AttentionInterface (Llama, Mistral, Qwen2, ...) are available; set plan.cp=1"
        )
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        raise ValueError(
            f"attention dropout ({dropout}) under plan.cp is not available yet in plait; set attention_dropout=0 or plan.cp=1"
        )
    if getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False):
        raise ValueError("sliding-window attention under plan.cp is not available yet in plait; set plan.cp=1")
    return layers


def apply_hf(model: nn.Module, attention: Any) -> list[nn.Module]:
    """Ring attention in every attention layer of a Hugging Face causal LM."""
    layers = hf_attention_layers(model)
    register()
    for layer in layers:
        layer.context_attention = attention
    model.set_attn_implementation(RING_ATTENTION)
    return layers
