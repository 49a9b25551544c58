"""Rollouts for the RL recipes (GRPO, PPO): batched sampling of completions from a policy.

Each prompt's completions are drawn together as one batch (rows share the prompt, so no padding is
needed while sampling); every row has its own generator seeded from its *global* sample index, so a
sample is the same whichever dp rank draws it and in whichever batch. The token choice is
`plait.train.generate.pick_token` (temperature, top-k), the sampler `plait generate` uses.

Decoding is incremental (`plait.train.decoding.IncrementalDecoder`: plait's GPT with its KV cache,
Hugging Face models with theirs): the prompt is one forward, each new token one forward over itself.
``SamplingConfig(kv_cache=False)`` recomputes the whole prefix per token instead (the same tokens).
Tokens are picked on the CPU (the per-row generators live there, so a GPU draws what a CPU draws);
the finished `Rollout` lies on the model's device.

A `Rollout` is right-padded to one width: ``input_ids`` (rows, seq), ``attention_mask`` (1 on prompt
and completion tokens), ``completion_mask`` (1 on completion tokens, up to and including the end
token), and ``logps`` (rows, seq): position t holds log p(token t | tokens < t) under the sampling
policy at temperature 1 (the distribution the policy-gradient ratio compares against), 0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.losses import IGNORE_INDEX, logits_of, token_nll
from plait.recipes.dpo import shifted_targets
from plait.train.decoding import IncrementalDecoder, model_device
from plait.train.generate import pick_token

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0
    kv_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: sample at least one token, e.g. 32")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: RL rollouts sample; use a temperature > 0, e.g. 1.0")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: sample from at least the most likely token, e.g. 50")


@dataclass(frozen=True)
class Rollout:
    input_ids: torch.Tensor  # (rows, seq)
    attention_mask: torch.Tensor  # (rows, seq)
    completion_mask: torch.Tensor  # (rows, seq), float
    logps: torch.Tensor  # (rows, seq), fp32

    def batch(self) -> Batch:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "completion_mask": self.completion_mask,
            "old_logps": self.logps,
        }


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(rows, seq) fp32: position t holds log p(input_ids[t] | input_ids[<t]) where ``mask`` is set, else 0.

    ``logits`` are the model's whole output; under tp the vocab-sharded slice is read where it lies.
    """
    targets = shifted_targets(torch.where(mask.bool(), input_ids, IGNORE_INDEX))  # position t: target t+1
    nll = token_nll(logits, targets)
    return torch.cat([nll.new_zeros(nll.size(0), 1), -nll[:, :-1]], dim=1)


@torch.no_grad()
def policy_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The completion tokens' log-probs (rows, seq) under ``model`` in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    logits = logits_of(model(batch["input_ids"], batch["attention_mask"]))
    model.train(was_training)
    return token_logps(logits, batch["input_ids"], batch["completion_mask"])


@torch.no_grad()
def sample_group(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    num_samples: int,
    first_index: int,
    sampling: SamplingConfig,
    eos_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` completions of one prompt: (ids (rows, prompt + new), completion mask (rows, prompt + new)).

    Row i draws from a generator seeded with ``sampling.seed`` and its global index ``first_index + i``.
    A row stops at ``eos_id`` (kept in the mask); later positions are padding (eos ids, mask 0).
    """
    if not prompt_ids:
        raise ValueError("a prompt encodes to no tokens; every RL prompt needs at least one token")
    generators = [
        torch.Generator().manual_seed(sampling.seed * 1_000_003 + first_index + i) for i in range(num_samples)
    ]
    ids = torch.tensor([list(prompt_ids)] * num_samples)
    alive = torch.ones(num_samples, dtype=torch.bool)
    was_training = model.training
    model.eval()
    decoder, fresh = IncrementalDecoder(model, cache=sampling.kv_cache), ids
    for _ in range(sampling.max_new_tokens):
        last = decoder.feed(fresh)[:, -1].float().cpu()  # (rows, vocab)
        picks = [
            pick_token(last[i], temperature=sampling.temperature, top_k=sampling.top_k, generator=generators[i])
            for i in range(num_samples)
        ]
        next_ids = torch.where(alive, torch.stack(picks), eos_id)
        fresh = next_ids[:, None]
        ids = torch.cat([ids, fresh], dim=1)
        alive = alive & (next_ids != eos_id)
        if not alive.any():
            break
    model.train(was_training)
    return ids, _completion_mask(ids, num_prompt=len(prompt_ids), eos_id=eos_id)


def _completion_mask(ids: torch.Tensor, *, num_prompt: int, eos_id: int) -> torch.Tensor:
    new = ids[:, num_prompt:]
    ended_before = torch.cumsum((new == eos_id).long(), dim=1) - (new == eos_id).long()  # eos strictly before t
    mask = torch.zeros_like(ids, dtype=torch.float)
    mask[:, num_prompt:] = (ended_before == 0).float()
    return mask


def rollout(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int,
    first_index: int,
    sampling: SamplingConfig,
    eos_id: int,
) -> Rollout:
    """``num_samples`` completions of each prompt (rows grouped by prompt), right-padded, with their log-probs.

    ``first_index`` is the global index of the first sample (prompt k's row i has index
    first_index + k x num_samples + i), so a dp rank's share samples what one process would.
    """
    groups = [
        sample_group(
            model,
            prompt,
            num_samples=num_samples,
            first_index=first_index + k * num_samples,
            sampling=sampling,
            eos_id=eos_id,
        )
        for k, prompt in enumerate(prompts)
    ]
    width = max(ids.size(1) for ids, _ in groups)
    input_ids = torch.cat([F.pad(ids, (0, width - ids.size(1)), value=eos_id) for ids, _ in groups])
    completion = torch.cat([F.pad(mask, (0, width - mask.size(1))) for _, mask in groups])
    prompt_mask = torch.cat([F.pad(torch.ones(num_samples, len(p)), (0, width - len(p))) for p in prompts])
    attention_mask = ((prompt_mask + completion) > 0).long()
    device = model_device(model)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion}
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    return Rollout(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], policy_logps(model, batch))
