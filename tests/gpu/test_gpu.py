"""GPU tier: runs only where CUDA is present (skipped on CPU-only machines and in CI here)."""

from __future__ import annotations

import pytest
import torch

import plait

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_one_gpu_engine_matches_the_plain_loop_in_fp32() -> None:
    from plait.train.reference import train_reference

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    torch.manual_seed(0)
    batches = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (5, 4, 16), device=device)]
    with device:
        models = [plait.models.build("tiny", vocab_size=64, max_seq_len=16) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opt = plait.optim.adamw(lr=1e-3, eps=1e-6)
    ref = train_reference(models[0], batches, optimizer=opt, loss_fn=plait.losses.causal_lm, max_grad_norm=1.0)
    engine = plait.boost(
        models[1], optimizer=opt, loss_fn=plait.losses.causal_lm, plan=plait.Plan(microbatches=2), max_grad_norm=1.0
    )
    got = [engine.train_step(b).loss.item() for b in batches]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=0)


def test_bf16_step_runs_on_gpu() -> None:
    with torch.device("cuda"):
        model = plait.models.build("tiny", vocab_size=64, max_seq_len=16)
    engine = plait.boost(
        model, optimizer=plait.optim.adamw(lr=1e-3), loss_fn=plait.losses.causal_lm, plan=plait.Plan(precision="bf16")
    )
    batch = torch.randint(0, 64, (4, 16), device="cuda")
    losses = [engine.train_step({"input_ids": batch, "labels": batch}).loss.item() for _ in range(5)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "tiers",
    [
        {"offload_optimizer": "cpu"},
        {"offload_optimizer": "disk", "offload_gradients": "disk"},
        {"offload_optimizer": "disk", "offload_gradients": "disk", "offload_params": "disk"},
    ],
)
def test_offload_on_gpu_matches_the_plain_loop(tiers: dict, tmp_path) -> None:
    """Pinned host shards, the host optimizer (fused CPU AdamW) and disk pages against a plain GPU loop."""
    from plait.train.reference import train_reference

    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    torch.manual_seed(0)
    batches = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (5, 4, 16), device=device)]
    with device:
        models = [plait.models.build("tiny", vocab_size=64, max_seq_len=16) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opt = plait.optim.adamw(lr=1e-3, eps=1e-6)
    ref = train_reference(models[0], batches, optimizer=opt, loss_fn=plait.losses.causal_lm, max_grad_norm=1.0)
    plan = plait.Plan(zero=3 if "offload_params" in tiers else 1, offload_dir=str(tmp_path), **tiers)
    engine = plait.boost(models[1], optimizer=opt, loss_fn=plait.losses.causal_lm, plan=plan, max_grad_norm=1.0)
    if tiers == {"offload_optimizer": "cpu"}:  # a page on disk has no memory to be pinned between uses
        assert engine.data_parallel.units[0].master_shard.is_pinned()
    got = [engine.train_step(b).loss.item() for b in batches]
    engine.close()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=0)
