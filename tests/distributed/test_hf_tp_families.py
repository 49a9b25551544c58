"""Tensor parallel (tp=2), with and without sequence parallel, for every Hugging Face family of the
architecture registry, against one plain process running the model's own forward: 10 steps, the
loss and the gradient norm of every step within 1e-5 relative, final (gathered) weights
allclose(1e-5, 1e-6). Plus the layouts tensor parallel refuses, with their reasons."""

from __future__ import annotations

import pytest
import torch

import plait
from plait.tensor.hf import tp_plan_for
from plait.train.reference import plain_loss
from tests.distributed.harness import run_ranks
from tests.distributed.test_hf_families import make_batches, scheduler
from tests.distributed.test_parity import assert_parity
from tests.hf_models import FAMILIES, TINY, tiny_config, tiny_model

transformers = pytest.importorskip("transformers")


def optimizer(params):
    # lr 1e-4 (as in test_tensor_hf): a weight whose gradient cancels to ~1e-8 moves by Adam's eps-ratio, so the
    # float noise of a sharded matmul's other summation order reaches ~lr * 1e-3 per step in that weight (Phi3 has
    # two such at lr 1e-3: 3.5e-6 after 10 steps); 1e-4 keeps it under atol 1e-6.
    return torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.1)


def build(family: str, overrides: dict) -> torch.nn.Module:
    """tests/hf_models' tiny `family` model, with config `overrides` (a layout variant)."""
    if not overrides:
        return tiny_model(family)
    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return getattr(transformers, TINY[family][1])(config)


def train_tp(rank: int, world_size: int, family: str, overrides: dict, sequence_parallel: bool) -> tuple:
    engine = plait.boost(
        build(family, overrides),
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=1, tp=2, sequence_parallel=sequence_parallel),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    assert engine.tensor_parallel
    results = [engine.train_step(batch) for batch in make_batches()]
    return [r.loss.item() for r in results], [r.grad_norm.item() for r in results], engine.model_state_dict()


def reference_run(family: str, overrides: dict) -> tuple:
    """One plain process: the model's own forward, torch's clipping and AdamW."""
    model = build(family, overrides)
    opt = optimizer(model.parameters())
    lr_scheduler = scheduler(opt)
    losses, norms = [], []
    for batch in make_batches():
        loss = plain_loss(plait.losses.causal_lm, model(**batch), batch)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        opt.step()
        lr_scheduler.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms, model.state_dict()


def check_tp2(family: str, *, sequence_parallel: bool, overrides: dict | None = None) -> None:
    overrides = overrides or {}
    results = run_ranks(train_tp, 2, family, overrides, sequence_parallel, timeout_s=100)
    ref_losses, ref_norms, ref_state = reference_run(family, overrides)
    for _, norms, _ in results:  # Adam hides a gradient's scale; the norm does not
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    assert_parity([(losses, state) for losses, _, state in results], (ref_losses, ref_state))


SP = pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])


@pytest.mark.timeout(120)
@SP
@pytest.mark.parametrize("family", FAMILIES)
def test_family_under_tp2_matches_one_process(family: str, sequence_parallel: bool) -> None:
    check_tp2(family, sequence_parallel=sequence_parallel)


# Falcon's other layouts: [q k v] interleaved per head with one K/V head per query head (multi_query=False),
# and that layout with an alibi bias instead of rotary positions, sequential attention then MLP (Falcon-RW).
FALCON_LAYOUTS = {
    "per-head": {"new_decoder_architecture": False, "num_kv_heads": 4},
    "alibi": {"new_decoder_architecture": False, "num_kv_heads": 4, "alibi": True, "parallel_attn": False},
    "alibi-grouped-eager": {"alibi": True, "_attn_implementation": "eager"},
}


@pytest.mark.timeout(120)
@SP
@pytest.mark.parametrize("layout", list(FALCON_LAYOUTS))
def test_falcon_layouts_under_tp2_match_one_process(layout: str, sequence_parallel: bool) -> None:
    check_tp2("falcon", sequence_parallel=sequence_parallel, overrides=FALCON_LAYOUTS[layout])


def test_falcon_with_one_shared_kv_head_is_refused() -> None:
    model = build("falcon", {"new_decoder_architecture": False, "multi_query": True})
    with pytest.raises(
        ValueError,
        match=r"multi_query=True has one key/value head shared by every query head, which tensor parallel cannot "
        r"split without replicating K/V on every rank",
    ):
        tp_plan_for(model)
