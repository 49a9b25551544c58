"""Sampling text from a trained checkpoint, in a window of the length it was trained at
(`plait.checkpoint.lengths`: positions past it never had a loss), as `plait eval` scores."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from plait.checkpoint import hf_model_export
from plait.checkpoint.io import load_checkpoint
from plait.checkpoint.lengths import checkpoint_window, config_context_length
from plait.checkpoint.lora_merge import merge_lora
from plait.config import config_from_dict
from plait.losses import logits_of
from plait.models.gpt import GPT
from plait.train.decoding import IncrementalDecoder
from plait.train.setup import model_config_for


def _build(
    model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any], raw_config: dict, path: Path
) -> nn.Module:
    """plait's GPT, or the Hugging Face model whose config the checkpoint holds (a pretrained run)."""
    if not hf_model_export.is_hf_checkpoint(model_state, trainer_state, raw_config):
        model = GPT(model_config_for(config_from_dict(raw_config)))
        model.load_state_dict(model_state)
        return model
    config = hf_model_export.checkpoint_hf_config(trainer_state, source=str(path))
    model = hf_model_export.build_hf_model(config, device="cpu")
    model.load_state_dict(hf_model_export.hf_tensors(model_state, model, source=str(path)), strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _context_length(model: nn.Module) -> int:
    return config_context_length(model.config)


def load_for_inference(path: Path) -> tuple[nn.Module, Tokenizer]:
    """The model and tokenizer stored in a `plait train` checkpoint."""
    model_state, trainer_state, raw_config = load_checkpoint(path)
    model_state = merge_lora(model_state, trainer_state.get("lora"))  # a LoRA run's checkpoint: adapters merged
    model = _build(model_state, trainer_state, raw_config, path)
    model.eval()
    tokenizer = trainer_state.get("tokenizer")
    if not tokenizer:
        raise ValueError(
            f"{path} holds no tokenizer (imported without a tokenizer.json?); add one to the Hugging Face directory and import again"
        )
    return model, Tokenizer.from_str(tokenizer)


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    kv_cache: bool = True,
    window: int | None = None,
) -> list[int]:
    """Autoregressive sampling with temperature and top-k (temperature 0: greedy).

    Incremental (`plait.train.decoding.IncrementalDecoder`) while the sequence fits ``window`` tokens
    (default: the model's context; `plait generate` passes the length the checkpoint was trained at);
    past it, each token is one forward over the last ``window`` tokens (a sliding window, which a cache
    cannot give: every position would move). ``kv_cache=False``: always the whole window.
    """
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids])
    decoder, context = IncrementalDecoder(model, cache=kv_cache), _context_length(model)
    window = min(window or context, context)
    for step in range(max_new_tokens):
        if ids.shape[1] <= window:
            logits = decoder.feed(ids if step == 0 else ids[:, -1:])[0, -1]  # (vocab,)
        else:
            logits = logits_of(model(ids[:, -window:].to(decoder.device)))[0, -1]
        logits = logits.float().cpu()  # picked where the generator lies
        next_id = pick_token(logits, temperature=temperature, top_k=top_k, generator=generator)
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0].tolist()


def pick_token(logits: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """One token id (0-dim) drawn from ``logits`` (vocab,) with temperature and top-k (temperature 0: greedy)."""
    if temperature <= 0:
        return logits.argmax()
    top = torch.topk(logits / temperature, min(top_k, logits.numel()))
    choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
    return top.indices[choice[0]]


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int, max_length: int | None = None) -> None:
    """The sampling flags of `plait generate`, checked before the checkpoint is read."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"--max-length {max_length}: a window holds the prompt and a new token; use at least 2")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: generate at least one token, e.g. --max-new-tokens 100")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"--temperature {temperature}: use a finite temperature >= 0 (0: greedy, 0.8: the default)")
    if top_k < 1:
        raise ValueError(f"--top-k {top_k}: sample from at least the 1 most likely token, e.g. --top-k 50")


def check_context(*, window: int, num_prompt_tokens: int, max_new_tokens: int, chosen: bool = False) -> None:
    """The prompt and the new tokens must fit the window (no sliding past it): the length the checkpoint
    was trained at, or ``chosen`` by --max-length."""
    if num_prompt_tokens + max_new_tokens > window:
        room = window - num_prompt_tokens
        fix = f"use --max-new-tokens {room} or fewer" if room > 0 else "shorten --prompt"
        why = "--max-length" if chosen else "the length the checkpoint was trained at; --max-length N sets another"
        raise ValueError(
            f"--max-new-tokens {max_new_tokens}: the model reads a window of {window} tokens ({why}, up to its "
            f"context) and the prompt takes {num_prompt_tokens}; {fix}"
        )


def generate_text(
    path: Path,
    *,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    max_length: int | None = None,
) -> str:
    """``max_new_tokens`` sampled after ``prompt`` from the checkpoint at ``path``, in a window of the length
    it was trained at (``max_length``: another, up to its context), refused when they do not fit it."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, max_length=max_length)
    window = checkpoint_window(path, override=max_length)  # from the configs: refused before the weights load
    model, tokenizer = load_for_inference(path)
    prompt_ids = tokenizer.encode(prompt).ids
    check_context(
        window=window, num_prompt_tokens=len(prompt_ids), max_new_tokens=max_new_tokens, chosen=max_length is not None
    )
    ids = sample(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        window=window,
    )
    return tokenizer.decode(ids, skip_special_tokens=False)
