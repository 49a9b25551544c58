"""Incremental decoding for generation: one interface over plait's GPT (``GPT.decode`` with a
`plait.models.kv_cache.KVCache`), Hugging Face causal LMs (their own cache: ``use_cache=True`` with ``cache``, or ``past_key_values`` before
transformers 5.25) and any other module (no cache: the whole sequence again each step, what an
uncached loop computes).

Example:
    >>> decoder = IncrementalDecoder(model)
    >>> logits = decoder.feed(prompt_ids)[:, -1]        # (batch, vocab): the prompt, at once
    >>> logits = decoder.feed(next_ids[:, None])[:, -1]  # then one position per step
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from plait.losses import logits_of
from plait.models.gpt import GPT
from plait.models.kv_cache import KVCache

__all__ = ["IncrementalDecoder", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lies (the CPU for a module without parameters)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


class IncrementalDecoder:
    """Feeds new tokens to a causal LM and returns their logits, keeping the past in a cache.

    plait's GPT: ``GPT.decode`` with a `KVCache` of ``model.config.max_seq_len`` positions (not with
    capacity-limited experts, whose dropped tokens depend on the whole sequence: no cache). A Hugging
    Face causal LM (anything with ``prepare_inputs_for_generation``, peft's wrappers too): its own
    cache object, passed back each step. Any other module: the whole sequence each step (``cache=False`` forces this).
    ``attention_mask`` (batch, new) on a feed marks left padding (0); without it rows are all real. Left
    padding without a cache is refused except for Hugging Face models: plait's GPT (and any other
    module) would give padding positions and attend to it.
    Inputs may lie anywhere: they are moved to the model's device, where the logits come back.
    """

    def __init__(self, model: nn.Module, *, cache: bool = True) -> None:
        self.model, self.device = model, model_device(model)
        self.kind = _kind(model) if cache else "full"
        self._cache: KVCache | None = None
        self._past: object = None
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def feed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, new, vocab) of the new positions ``input_ids`` (batch, new) given all fed before."""
        input_ids = input_ids.to(self.device)
        attention_mask = None if attention_mask is None else attention_mask.to(self.device)
        self._check_padding(attention_mask)
        self._remember(input_ids, attention_mask)
        if self.kind == "plait":
            if self._cache is None:
                config = self.model.config
                self._cache = KVCache(num_layers=config.num_layers, capacity=config.max_seq_len)
            return self.model.decode(input_ids, self._cache, attention_mask=attention_mask)
        if self.kind == "hf":
            return self._feed_hf(input_ids)
        assert self._ids is not None
        padding = self._hf_padding() if _is_hf(self.model) else {}  # other models: rows all real (checked)
        return logits_of(self.model(self._ids, **padding))[:, -input_ids.shape[1] :]

    def _check_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Only a cache or a Hugging Face forward (mask and position ids) keeps padding out of the logits."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded and self.kind == "full" and not _is_hf(self.model):
            raise ValueError(
                f"left padding (attention_mask with zeros) for {type(self.model).__name__} without a KV cache: its "
                "forward would give the padding positions and attend to it; feed rows without left padding "
                "(e.g. one row at a time)"
            )

    def _remember(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if self.kind == "plait":
            return  # the KVCache keeps its own
        self._ids = input_ids if self._ids is None else torch.cat([self._ids, input_ids], dim=1)
        if attention_mask is not None or self._mask is not None:
            new = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            old = torch.ones_like(self._ids[:, : -input_ids.shape[1]]) if self._mask is None else self._mask
            self._mask = torch.cat([old, new], dim=1)

    def _feed_hf(self, input_ids: torch.Tensor) -> torch.Tensor:
        padding = self._hf_padding()
        if "position_ids" in padding:
            padding["position_ids"] = padding["position_ids"][:, -input_ids.shape[1] :]
        name = _hf_cache_argument(self.model)
        out = self.model(input_ids=input_ids, use_cache=True, **{name: self._past}, **padding)
        self._past = getattr(out, name)
        return out.logits

    def _hf_padding(self) -> dict[str, torch.Tensor]:
        """HF's attention mask over every position and position ids counting real tokens only."""
        if self._mask is None:
            return {}
        positions = (self._mask.cumsum(dim=1) - 1).clamp(min=0)
        return {"attention_mask": self._mask, "position_ids": positions}


def _hf_cache_argument(model: nn.Module) -> str:
    """``cache`` where the model's forward takes it (transformers >= 5.25 deprecates the older name),
    else ``past_key_values``; the output carries the cache under the same name."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # peft
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _kind(model: nn.Module) -> str:
    if isinstance(model, GPT):
        return "plait" if _gpt_decodes_causally(model) else "full"
    return "hf" if _is_hf(model) else "full"


def _is_hf(model: nn.Module) -> bool:
    """A Hugging Face causal LM (peft's wrappers too), whose forward honours attention_mask and position_ids."""
    return callable(getattr(model, "prepare_inputs_for_generation", None))


def _gpt_decodes_causally(model: GPT) -> bool:
    """Whether a token's logits depend on earlier tokens only, so a cache reproduces the full forward.
    Not with capacity-limited experts (which tokens are dropped depends on the whole batch) nor under
    context parallel (attention runs over the cp ring)."""
    config = model.config
    if config.moe_experts and config.moe_capacity_factor is not None:
        return False
    return all(block.attn.context_attention is None for block in model.blocks)
