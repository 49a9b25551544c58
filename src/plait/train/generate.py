"""Sampling text from a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from plait.checkpoint.io import load_checkpoint
from plait.config import config_from_dict
from plait.models.gpt import GPT
from plait.train.setup import model_config_for


def load_for_inference(path: Path) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer stored in a `plait train` checkpoint."""
    model_state, trainer_state, raw_config = load_checkpoint(path)
    model = GPT(model_config_for(config_from_dict(raw_config)))
    model.load_state_dict(model_state)
    model.eval()
    tokenizer = trainer_state.get("tokenizer")
    if not tokenizer:
        raise ValueError(
            f"{path} holds no tokenizer (imported without a tokenizer.json?); add one to the Hugging Face directory and import again"
        )
    return model, Tokenizer.from_str(tokenizer)


@torch.no_grad()
def sample(
    model: GPT, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.8, top_k: int = 50, seed: int = 0
) -> list[int]:
    """Autoregressive sampling with temperature and top-k (temperature 0: greedy)."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids])
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.config.max_seq_len :])[0, -1]  # (vocab,)
        if temperature <= 0:
            next_id = logits.argmax()
        else:
            top = torch.topk(logits / temperature, min(top_k, logits.numel()))
            choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
            next_id = top.indices[choice[0]]
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0].tolist()


def generate_text(path: Path, *, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int) -> str:
    model, tokenizer = load_for_inference(path)
    ids = sample(
        model,
        tokenizer.encode(prompt).ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    return tokenizer.decode(ids, skip_special_tokens=False)
