"""Hugging Face Mixture-of-Experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) under dp/ZeRO, pp and tp, against
one plain process running the same model: 10 steps, losses within 1e-5 relative, final weights
allclose(1e-5, 1e-6).

As HF ships them: the parity is exact in kind, not luck. These blocks are dropless (no capacity), so
each token's experts and weights depend on that token alone, whichever rank or batch routes it; with
``output_router_logits=False`` (the config default) the HF model computes no load-balancing loss, and
with it set that loss reaches only ``outputs.loss``/``outputs.aux_loss``, which ``plait.losses.causal_lm``
never reads. With the blocks swapped for plait MoELayers (``plait.models.use_plait_moe``) and
``output_router_logits=True``, the load-balancing loss trains the routers per routing group, so the
reference routes in dp groups (``plait.moe.set_routing_groups``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import plait
from plait.checkpoint.hf_export import export_hf
from plait.checkpoint.hf_model_export import hf_record
from plait.models.hf_moe import use_plait_moe
from plait.moe import set_routing_groups
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks
from tests.distributed.test_hf_families import GLOBAL_BATCH, make_batches, reference, scheduler, train_family
from tests.distributed.test_parity import assert_parity, optimizer
from tests.hf_models import MOE_FAMILIES, tiny_model

transformers = pytest.importorskip("transformers")

PLANS = {
    "dp2-zero0": {"dp": 2, "zero": 0},
    "dp2-zero3": {"dp": 2, "zero": 3},
    "dp2-zero2-recompute": {"dp": 2, "zero": 2, "recompute": "full"},
    # the registry's layout serves these too; tp splits attention, the experts stay whole on each rank
    "pp2-1f1b": {"dp": 1, "pp": 2, "microbatches": 4, "pp_schedule": "1f1b"},
    "tp2": {"dp": 1, "tp": 2},
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_family_under_plan_matches_one_process(family: str, plan: str) -> None:
    results = run_ranks(train_family, 2, family, PLANS[plan], timeout_s=100)
    assert_parity(results, reference(family))


def swapped_model(family: str) -> torch.nn.Module:
    model = tiny_model(family, output_router_logits=True, router_aux_loss_coef=0.1)
    assert use_plait_moe(model) > 0
    return model


def train_swapped(rank: int, world_size: int, family: str, plan_kwargs: dict) -> tuple[list[float], dict]:
    engine = plait.boost(
        swapped_model(family),
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(bucket_mb=0.01, **plan_kwargs),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    per_rank = GLOBAL_BATCH // engine.dp_size
    shard = slice(engine.dp_rank * per_rank, (engine.dp_rank + 1) * per_rank)
    losses = [engine.train_step({k: v[shard] for k, v in batch.items()}).loss.item() for batch in make_batches()]
    return losses, engine.model_state_dict()


@pytest.mark.parametrize(("family", "plan"), [("mixtral", "dp2-zero0"), ("qwen2_moe", "dp2-zero3")])
def test_swapped_moe_family_with_aux_loss_under_dp_matches_grouped_one_process(family: str, plan: str) -> None:
    results = run_ranks(train_swapped, 2, family, PLANS[plan], timeout_s=100)
    model = swapped_model(family)
    set_routing_groups(model, 2)  # each rank's batch is one routing group of the load-balancing loss
    losses = train_reference(
        model,
        make_batches(),
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    assert_parity(results, (losses, model.state_dict()))


def train_save_and_score(rank: int, world_size: int, family: str, path: str) -> torch.Tensor:
    model = swapped_model(family)
    engine = plait.boost(
        model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plait.Plan(dp=2, zero=3, bucket_mb=0.01)
    )
    batch = make_batches()[0]
    share = slice(engine.dp_rank * 4, engine.dp_rank * 4 + 4)
    engine.train_step({k: v[share] for k, v in batch.items()})  # weights move off their init
    engine.save(path, extra=hf_record(model))
    engine.model.eval()
    with torch.no_grad():
        return engine.model(input_ids=batch["input_ids"]).logits


def test_zero3_checkpoint_of_a_swapped_model_exports_as_its_hf_class(tmp_path: Path) -> None:
    results = run_ranks(train_save_and_score, 2, "qwen2_moe", str(tmp_path / "ckpt"), timeout_s=60)
    assert export_hf(tmp_path / "ckpt", tmp_path / "hf") == "qwen2_moe"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "Qwen2MoeForCausalLM" and theirs.config.output_router_logits
    with torch.no_grad():
        expected = theirs(input_ids=make_batches()[0]["input_ids"]).logits
    for logits in results:
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
