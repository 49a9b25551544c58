"""LoRA (peft) under dp=2 x ZeRO-2, ZeRO-3, tp=2 and tp=2 with sequence parallel, and QLoRA-style (an int8 base)
under dp=2 x ZeRO-2, against one plain process.

The adapters start non-zero (peft starts lora_B at zero, which would hide a wrong split of the
factors for the first step), only they train, and under ZeRO only they hold optimizer state and
travel over dp.
"""

from __future__ import annotations

import pytest
import torch

import plait
from plait.recipes.lora import LoraSettings, add_lora
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import GLOBAL_BATCH, assert_parity, fresh_model, make_batches, optimizer, scheduler

STEPS = 10
PRESET = "tiny-llama"  # gate/up/down and GQA: every column and row layer kind
PLANS = {
    "dp2-zero2": {"dp": 2, "zero": 2},
    "dp2-zero3": {"dp": 2, "zero": 3},
    "tp2": {"dp": 1, "tp": 2},
    "tp2-sp": {"dp": 1, "tp": 2, "sequence_parallel": True},
    "dp2-zero2-int8": {"dp": 2, "zero": 2},
}


def lora_model(quantize: str | None = None) -> torch.nn.Module:
    model = add_lora(fresh_model(PRESET), LoraSettings(rank=4, alpha=8.0, quantize=quantize))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def adapter_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batches(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    return make_batches(vocab_size)[:STEPS]


def quantize_of(plan: str) -> str | None:
    return "int8" if plan.endswith("-int8") else None


def train_plan(rank: int, world_size: int, plan: dict, quantize: str | None) -> tuple[list, dict, dict]:
    model = lora_model(quantize)
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(bucket_mb=0.01, **plan),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    per_rank = GLOBAL_BATCH // engine.dp_size
    shard = slice(engine.dp_rank * per_rank, (engine.dp_rank + 1) * per_rank)
    losses = [engine.train_step({k: v[shard] for k, v in b.items()}).loss.item() for b in batches(512)]
    optimized = sum(p.numel() for group in engine.optimizer.param_groups for p in group["params"])
    facts = {"optimized": optimized, "volume": dict(engine.comm.bytes_by_kind)}
    return losses, engine.model_state_dict(), facts


def reference(quantize: str | None) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = lora_model(quantize)
    kwargs = dict(optimizer=optimizer, loss_fn=plait.losses.causal_lm, lr_scheduler=scheduler, max_grad_norm=1.0)
    losses = train_reference(model, batches(model.config.vocab_size), **kwargs)
    return losses, model.state_dict()


@pytest.fixture(scope="module")
def references() -> dict[str | None, tuple[list[float], dict[str, torch.Tensor]]]:
    return {quantize: reference(quantize) for quantize in (None, "int8")}  # before any rank is forked


@pytest.mark.parametrize("plan", list(PLANS))
def test_lora_matches_one_process(plan: str, references: dict) -> None:
    quantize = quantize_of(plan)
    results = run_ranks(train_plan, 2, PLANS[plan], quantize, timeout_s=180)
    assert_parity([(losses, state) for losses, state, _ in results], references[quantize])
    frozen_before = {k: v for k, v in lora_model(quantize).state_dict().items() if ".lora_" not in k}
    for name, value in frozen_before.items():  # the base did not move (int8 weights and scales included)
        torch.testing.assert_close(results[0][1][name], value, rtol=0, atol=0)
    adapters = adapter_numel(lora_model(quantize))
    facts = [f for _, _, f in results]
    zero = PLANS[plan].get("zero")
    if zero:  # only the adapters are sharded into the optimizer (a unit pads to a multiple of dp)
        optimized = sum(f["optimized"] for f in facts)
        assert adapters <= optimized <= adapters + 2 * 16
        # per step, the adapters' fp32 gradients are all-reduced (2P) and their parameters all-gathered
        # (ZeRO-3: before forward and again in backward); only the (loss, count) pairs travel beside them
        volume = facts[0]["volume"]
        assert volume["all_gather"] == STEPS * (2 if zero == 3 else 1) * 4 * optimized
        assert 2 * 4 * optimized * STEPS < volume["all_reduce"] <= (2 * 4 * optimized + 64) * STEPS


def hf_lora_model() -> torch.nn.Module:
    """A transformers Llama (its own tp plan: q/k/v/gate/up colwise, o/down rowwise) with adapters on every projection."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=32,
    )  # fmt: skip
    model = add_lora(transformers.LlamaForCausalLM(config), LoraSettings(rank=2))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def train_hf(rank: int, world_size: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    engine = plait.boost(
        hf_lora_model(),
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=1, tp=2),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return [engine.train_step(b).loss.item() for b in batches(512)], engine.model_state_dict()


def test_lora_on_a_transformers_llama_under_tp2_matches_one_process() -> None:
    model = hf_lora_model()
    kwargs = dict(optimizer=optimizer, loss_fn=plait.losses.causal_lm, lr_scheduler=scheduler, max_grad_norm=1.0)
    reference = (train_reference(model, batches(512), **kwargs), model.state_dict())
    assert_parity(run_ranks(train_hf, 2, timeout_s=180), reference)
