"""GPU tier: plan.precision="auto", the MFU peak in bf16, and flash attention for plait's attention."""

from __future__ import annotations

import pytest
import torch

import plait
from plait.train import metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_precision_trains_in_bf16_on_a_gpu_with_bf16_tensor_cores() -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("a GPU before Ampere: auto keeps fp32")
    with torch.device("cuda"):
        model = plait.models.build("tiny-llama", vocab_size=64, max_seq_len=16)
    engine = plait.boost(
        model, optimizer=plait.optim.adamw(lr=1e-3), loss_fn=plait.losses.causal_lm, plan=plait.Plan(precision="auto")
    )
    assert engine.mesh.precision.line() == (
        f"precision: auto -> bf16 (the GPU has bf16 tensor cores, compute capability "
        f"{'.'.join(map(str, torch.cuda.get_device_capability()))})"
    )
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    batch = torch.randint(0, 64, (4, 16), device="cuda")
    losses = [engine.train_step({"input_ids": batch, "labels": batch}).loss.item() for _ in range(5)]
    assert losses[-1] < losses[0]


def test_the_bf16_peak_is_measured_with_the_data_sheet_beside_it() -> None:
    peak = metrics.measure_peak(torch.device("cuda"), dtype=torch.bfloat16, size=4096)
    assert peak.dtype == "bf16" and peak.size == 4096 and peak.flops > 1e12
    if peak.datasheet_flops is not None:  # a known GPU: measured below its data sheet (dense, boost clock)
        assert peak.flops < 1.05 * peak.datasheet_flops
        assert "data sheet" in peak.line()


def test_plaits_grouped_attention_runs_on_flash_attention_in_bf16() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.device("cuda"):
        model = plait.models.build("tiny-llama", vocab_size=64, max_seq_len=64).to(torch.bfloat16)
    tokens = torch.randint(0, 64, (2, 64), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot take plait's q/k/v (GQA unrepeated)
        loss, count = plait.losses.causal_lm(model(tokens), {"input_ids": tokens, "labels": tokens})
        (loss / count).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
