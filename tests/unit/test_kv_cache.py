"""Incremental decoding (KV cache) against the full forward: logits at every position, and the same
tokens from `plait generate`'s sampler and the RL rollouts with and without the cache."""

from __future__ import annotations

import pytest
import torch
import transformers

import plait
from plait.losses import logits_of
from plait.models.kv_cache import KVCache
from plait.recipes.rollout import SamplingConfig, sample_group
from plait.train.decoding import IncrementalDecoder
from plait.train.generate import sample


def _plait(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return plait.models.build(preset, max_seq_len=32).eval()


def _hf(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


MODELS = {"tiny": lambda: _plait("tiny"), "tiny-llama": lambda: _plait("tiny-llama"), "hf-gpt2": lambda: _hf("gpt2")}
MODELS |= {"hf-llama": lambda: _hf("llama"), "mixtral-tiny": lambda: _plait("mixtral-tiny")}


def _fed_in_steps(decoder: IncrementalDecoder, ids: torch.Tensor, *, prompt: int, mask=None) -> torch.Tensor:
    chunks = [(0, prompt)] + [(t, t + 1) for t in range(prompt, ids.shape[1])]
    parts = [decoder.feed(ids[:, a:b], None if mask is None else mask[:, a:b]) for a, b in chunks]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_cached_logits_match_the_full_forward_at_every_position(name: str) -> None:
    model = MODELS[name]()
    decoder = IncrementalDecoder(model)
    assert decoder.kind == ("hf" if name.startswith("hf") else "plait")
    ids = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(1))
    full = logits_of(model(ids))
    torch.testing.assert_close(_fed_in_steps(decoder, ids, prompt=7), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "hf-gpt2", "hf-llama"])
@torch.no_grad()
def test_left_padding_takes_no_position_and_is_never_attended(name: str) -> None:
    model = MODELS[name]()
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1: 4 pads, then its own 12 tokens
    padded = _fed_in_steps(IncrementalDecoder(model), ids, prompt=8, mask=mask)
    alone = logits_of(model(ids[1:, 4:]))
    torch.testing.assert_close(padded[1, 4:], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[0], logits_of(model(ids[:1]))[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["hf-gpt2", "hf-llama"])
@torch.no_grad()
def test_hf_left_padding_without_a_cache_takes_no_position(name: str) -> None:
    model = MODELS[name]()
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    decoder = IncrementalDecoder(model, cache=False)
    assert decoder.kind == "full"
    padded = _fed_in_steps(decoder, ids, prompt=8, mask=mask)
    torch.testing.assert_close(padded[1, 4:], logits_of(model(ids[1:, 4:]))[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("preset", "cache"), [("tiny", False), ("switch-tiny", True)])
def test_plait_left_padding_without_a_cache_is_refused(preset: str, cache: bool) -> None:
    # plait's GPT forward ignores attention_mask: padding would take positions and be attended
    decoder = IncrementalDecoder(_plait(preset), cache=cache)
    assert decoder.kind == "full"
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="one row at a time"):
        decoder.feed(torch.ones(2, 3, dtype=torch.long), mask)
    decoder.feed(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))  # no padding: fine


def test_capacity_limited_experts_decode_without_a_cache() -> None:
    # capacity factor 1.25: which tokens drop depends on the whole sequence, which no cache reproduces
    assert IncrementalDecoder(_plait("switch-tiny")).kind == "full"
    assert IncrementalDecoder(_plait("mixtral-tiny")).kind == "plait"  # no capacity: every token kept


def test_the_cache_refuses_past_the_context() -> None:
    model = _plait("tiny")
    decoder = IncrementalDecoder(model)
    decoder.feed(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="past the model's context of 32"):
        decoder.feed(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="both must be >= 1"):
        KVCache(num_layers=2, capacity=0)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_gives_the_same_tokens_with_and_without_the_cache(name: str, temperature: float) -> None:
    model = MODELS[name]()
    prompt = [5, 17, 42, 8]
    kwargs = {"max_new_tokens": 20, "temperature": temperature, "top_k": 50, "seed": 3}
    assert sample(model, prompt, **kwargs) == sample(model, prompt, kv_cache=False, **kwargs)


def test_sample_slides_past_the_context_as_without_the_cache() -> None:
    model = _plait("tiny-llama")
    kwargs = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 50, "seed": 4}
    prompt = list(range(1, 27))  # 26 + 12 > 32: the last tokens come from a sliding window
    assert sample(model, prompt, **kwargs) == sample(model, prompt, kv_cache=False, **kwargs)


@pytest.mark.parametrize("name", ["tiny", "hf-gpt2"])
def test_rollouts_draw_the_same_tokens_with_and_without_the_cache(name: str) -> None:
    model = MODELS[name]()
    rows = {}
    for cache in (True, False):
        sampling = SamplingConfig(max_new_tokens=16, seed=5, kv_cache=cache)
        rows[cache] = sample_group(model, [3, 9, 27], num_samples=4, first_index=8, sampling=sampling, eos_id=0)
    torch.testing.assert_close(rows[True], rows[False], rtol=0, atol=0)
