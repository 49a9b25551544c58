"""Metrics formulas, logs and plots, and whole-state checkpoints: pure logic, no process group."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from plait.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from plait.train.logs import MetricsLog, format_metrics_line, plot_loss_curve, read_metrics
from plait.train.metrics import (
    Throughput,
    cuda_bf16_peak,
    current_rss_bytes,
    measure_peak_flops,
    mfu,
    model_flops_per_token,
    model_state_bytes,
    peak_rss_bytes,
    reset_peak_rss,
)

# ---------------------------------------------------------------- metrics


def test_model_flops_per_token_by_hand():
    # 6 * 1e6 + 12 * 12 layers * 768 * 1024 = 6_000_000 + 113_246_208
    assert model_flops_per_token(num_params=1_000_000, num_layers=12, d_model=768, seq_len=1024) == 119_246_208


def test_mfu_arithmetic_and_errors():
    # 1000 tok/s * 6e6 FLOP/tok = 6e9 FLOP/s over 2 ranks of 1e12 each
    assert mfu(tokens_per_s=1000, flops_per_token=6e6, peak_flops=1e12, num_ranks=2) == pytest.approx(0.003)
    with pytest.raises(ValueError, match="peak"):
        mfu(tokens_per_s=1, flops_per_token=1, peak_flops=0, num_ranks=1)


def test_peak_flops_cpu_and_gpu_table():
    assert measure_peak_flops(torch.device("cpu"), size=128) > 1e6
    assert cuda_bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert cuda_bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert cuda_bf16_peak("NVIDIA H200") == 989e12
    assert cuda_bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert cuda_bf16_peak("Tesla T4") is None


def test_model_state_bytes_adam_after_one_step():
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    counts = model_state_bytes(model, optimizer)
    num_tensors = len(list(model.parameters()))
    assert counts["params"] == 4 * num_params
    assert counts["grads"] == 4 * num_params
    assert counts["optimizer"] == 8 * num_params + 4 * num_tensors  # exp_avg, exp_avg_sq + fp32 step per tensor
    assert counts["total"] == counts["params"] + counts["grads"] + counts["optimizer"]


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.arange(3, dtype=torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def test_model_state_bytes_counts_tied_weight_and_flat_views_once():
    model = TiedLM()
    assert model_state_bytes(model, None)["params"] == 4 * 11 * 6
    # Parameters and grads as views into flat buffers (as zero/buckets.py makes them); the grad
    # buffer has slack that no grad covers, which must not be counted.
    flat = torch.zeros(30)
    holder = nn.Module()
    holder.a = nn.Parameter(flat[:10].view(2, 5))
    holder.b = nn.Parameter(flat[10:30])
    grad_buffer = torch.zeros(100)
    holder.a.grad = grad_buffer[:10].view(2, 5)
    holder.b.grad = grad_buffer[10:30]
    counts = model_state_bytes(holder, None)
    assert counts["params"] == 4 * 30
    assert counts["grads"] == 4 * 30


def test_rss_readings():
    reset_peak_rss()
    assert peak_rss_bytes() >= current_rss_bytes() > 0


def test_throughput_median_skips_first_step():
    meter = Throughput(window=2)
    for step, seconds in enumerate([100.0, 2.0, 1.0, 4.0]):  # 1, 50, 100, 25 tok/s
        meter.record(step, tokens=100, seconds=seconds)
    assert meter.tokens_per_s() == 50.0  # median of 50, 100, 25
    assert meter.recent_tokens_per_s() == 62.5  # median of 100, 25
    assert meter.total_tokens == 400
    first_only = Throughput()
    first_only.record(0, tokens=10, seconds=2.0)
    assert first_only.tokens_per_s() == 5.0
    assert Throughput().tokens_per_s() == 0.0


# ---------------------------------------------------------------- logs


def _write_log(out_dir: Path, steps: range, *, start_step: int = 0) -> None:
    log = MetricsLog(out_dir, enabled=True, start_step=start_step)
    for step in steps:
        values = {"loss": 10.0 - step, "lr": 1e-3, "tokens_per_s": 123.0}
        if step % 2 == 0:
            values["val_loss"] = 11.0 - step
        log.log(step, values)
    log.close()


def test_metrics_log_csv_and_tensorboard(tmp_path):
    _write_log(tmp_path, range(1, 4))
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss,val_loss") and len(lines) == 4
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [row["step"] for row in rows] == [1.0, 2.0, 3.0]
    assert "val_loss" not in rows[0] and rows[1]["val_loss"] == 9.0
    assert rows[2]["loss"] == 7.0
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_metrics_log_resume_keeps_earlier_rows(tmp_path):
    _write_log(tmp_path, range(1, 6))
    _write_log(tmp_path, range(4, 6), start_step=3)  # the first run's steps 4-5 are replaced
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.csv")] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_metrics_log_disabled_and_unknown_key(tmp_path):
    log = MetricsLog(tmp_path / "rank1", enabled=False)
    log.log(1, {"loss": 1.0, "anything": 2.0})
    log.close()
    assert not (tmp_path / "rank1").exists()
    log = MetricsLog(tmp_path, enabled=True, columns=["step", "loss"])
    with pytest.raises(ValueError, match="columns"):
        log.log(1, {"loss": 1.0, "mfu": 0.1})
    log.close()


def test_plot_loss_curve_writes_png(tmp_path):
    _write_log(tmp_path, range(1, 6))
    png = tmp_path / "plots" / "loss.png"
    plot_loss_curve(tmp_path / "metrics.csv", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_format_metrics_line():
    values = {
        "loss": 5.1234,
        "val_loss": 5.3,
        "lr": 3e-4,
        "tokens_per_s": 1234.4,
        "mfu": 0.123,
        "state_bytes": 120.4e6,
        "peak_rss": 0.9e9,
        "other": 1.0,
    }
    assert format_metrics_line(40, 300, values) == (
        "step 40/300 | loss 5.123 | val 5.300 | lr 3.0e-04 | 1234 tok/s | MFU 12.3% | state 120.4 MB | rss 900.0 MB"
    )


# ---------------------------------------------------------------- checkpoints


def _trained_state(seed: int) -> tuple[TiedLM, dict]:
    torch.manual_seed(seed)
    model = TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    return model, {"step": 7, "optimizer": optimizer.state_dict(), "rng": rng_state()}


def _save(path: Path, seed: int = 0) -> TiedLM:
    model, trainer_state = _trained_state(seed)
    save_checkpoint(path, model_state=model.state_dict(), trainer_state=trainer_state, config={"seed": seed})
    return model


def test_checkpoint_round_trip_bit_identical(tmp_path):
    model, trainer_state = _trained_state(0)
    save_checkpoint(tmp_path / "ck", model_state=model.state_dict(), trainer_state=trainer_state, config={"a": [1]})
    model_state, loaded_trainer, config = load_checkpoint(tmp_path / "ck")
    for name, tensor in model.state_dict().items():
        assert model_state[name].dtype == tensor.dtype and torch.equal(model_state[name], tensor), name
    assert torch.equal(model_state["embed.weight"], model_state["head.weight"])
    fresh = TiedLM()
    fresh.load_state_dict(model_state)
    assert fresh.head.weight is fresh.embed.weight and torch.equal(fresh.head.weight, model.head.weight)
    exp_avg = loaded_trainer["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, trainer_state["optimizer"]["state"][0]["exp_avg"])
    assert loaded_trainer["step"] == 7 and config == {"a": [1]}


def test_checkpoint_views_of_one_flat_buffer(tmp_path):
    flat = torch.arange(10, dtype=torch.float32)
    state = {"a": flat[:4], "b": flat[4:].view(2, 3)}
    save_checkpoint(tmp_path / "ck", model_state=state, trainer_state={}, config={})
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["b"], state["b"])


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_checkpoint_atomicity(tmp_path):
    stale = tmp_path / f".tmp-{checkpoint_name(200)}-dead"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    _save(tmp_path / checkpoint_name(100), seed=0)
    assert list_checkpoints(tmp_path) == [tmp_path / "step-000100"]
    assert not stale.exists()  # a crashed save's hidden directory goes once a save commits
    second = _save(tmp_path / checkpoint_name(100), seed=1)  # over an existing checkpoint
    model_state, _, config = load_checkpoint(tmp_path / "step-000100")
    assert config == {"seed": 1} and torch.equal(model_state["embed.weight"], second.embed.weight)
    with pytest.raises(RuntimeError, match="cannot pickle"):  # the save fails midway
        save_checkpoint(tmp_path / "step-000100", model_state={}, trainer_state={"f": Unpicklable()}, config={})
    assert load_checkpoint(tmp_path / "step-000100")[2] == {"seed": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000100"]


def test_checkpoint_corruption_is_named(tmp_path):
    _save(tmp_path / "step-000100")
    _save(tmp_path / "step-000200")
    model_file = tmp_path / "step-000200" / "shard-00000.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00000\.safetensors is corrupt.*step-000100"):
        load_checkpoint(tmp_path / "step-000200")
    (tmp_path / "step-000100" / "trainer.pt").unlink()
    with pytest.raises(ValueError, match=r"missing trainer\.pt"):
        load_checkpoint(tmp_path / "step-000100")


def test_prune_and_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (900, 1000, 100, 500):
        save_checkpoint(tmp_path / checkpoint_name(step), model_state={}, trainer_state={"step": step}, config={})
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-000100",
        "step-000500",
        "step-000900",
        "step-001000",
    ]
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step-000100", "step-000500"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000900", "step-001000"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-001000"
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def _draws() -> tuple:
    return torch.rand(4), np.random.rand(4), random.random()


def test_rng_round_trip_through_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ck", model_state={}, trainer_state={"rng": rng_state()}, config={})
    expected = _draws()
    _draws()
    set_rng_state(load_checkpoint(tmp_path / "ck")[1]["rng"])
    torch_draw, numpy_draw, python_draw = _draws()
    assert torch.equal(torch_draw, expected[0])
    assert np.array_equal(numpy_draw, expected[1]) and python_draw == expected[2]
