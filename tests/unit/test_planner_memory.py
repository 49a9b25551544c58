"""The planner's memory model on paper: the ZeRO paper's model states, Korthikanti's activations,
plait's own ZeRO layout, and the model shape's parameter count."""

from __future__ import annotations

import pytest

from plait.config import Plan
from plait.models.gpt_config import GPTConfig
from plait.models.presets import get_preset, preset_names
from plait.planner import ModelShape, Workload, layer_activations, zero_paper_bytes
from plait.planner.memory import MemoryModel, unit_state_bytes

GPT3 = GPTConfig(vocab_size=51200, max_seq_len=2048, d_model=12288, num_layers=96, num_heads=96)


@pytest.mark.parametrize("name", preset_names())
def test_units_add_up_to_the_models_parameter_count(name: str) -> None:
    shape = ModelShape(get_preset(name))
    units = shape.stage_units(0, num_layers=shape.num_layers, pp=1, tp=1)
    assert sum(unit.local(1) for unit in units) == shape.num_parameters()


def test_zero_paper_formulas() -> None:
    p, n = 7.5e9, 64
    assert zero_paper_bytes(p, stage=0, dp=n) == 16 * p
    assert zero_paper_bytes(p, stage=1, dp=n) == 4 * p + 12 * p / n
    assert zero_paper_bytes(p, stage=2, dp=n) == 2 * p + 14 * p / n
    assert zero_paper_bytes(p, stage=3, dp=n) == 16 * p / n


# plait's bf16 keeps the paper's bytes plus an fp32 gradient shard (4P/N; 2P/N more where the paper
# already counts a 2-byte gradient shard), but at stage 3, which keeps the paper's 16P/N (fp32 master and
# gradient shards, no 16-bit shard); stage 0 is stage 1's layout unsharded.
BF16_EXTRA = {0: lambda p, n: 4 * p, 1: lambda p, n: 4 * p / n, 2: lambda p, n: 2 * p / n, 3: lambda p, n: 0.0}
FP32 = {
    0: lambda p, n: 16 * p,
    1: lambda p, n: 8 * p + 8 * p / n,
    2: lambda p, n: 4 * p + 12 * p / n,
    3: lambda p, n: 16 * p / n,
}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dp", [1, 8, 64])
def test_model_states_are_the_zero_formulas_exactly(stage: int, dp: int) -> None:
    """Without padding and Adam's 4-byte step counters, the planner's bytes are the formulas to the byte."""
    shape = ModelShape(GPT3)
    units = shape.stage_units(0, num_layers=GPT3.num_layers, pp=1, tp=1)
    assert all(unit.local(1) % dp == 0 for unit in units)  # no padding at these sizes
    p = shape.num_parameters()
    for precision, expected in (("bf16", zero_paper_bytes(p, stage=stage, dp=dp) + BF16_EXTRA[stage](p, dp)),
                                ("fp32", FP32[stage](p, dp))):  # fmt: skip
        states = unit_state_bytes(units, Plan(dp=dp, zero=stage, precision=precision))
        sharded = dp if stage > 0 else 1
        steps = 4 * (sum(u.num_tensors for u in units) / sharded + (len(units) if sharded > 1 else 0))
        total = states.params + states.master + states.grads + states.optimizer
        assert total - steps == pytest.approx(expected, rel=1e-12)


def test_tensor_parallel_shards_the_split_weights_only() -> None:
    shape = ModelShape(get_preset("llama-7b"))
    layer = shape.layer_unit()
    assert layer.replicated == 2 * 4096  # two RMSNorm scales
    assert layer.local(8) * 8 == pytest.approx(layer.sharded + 8 * layer.replicated)


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_korthikanti_activations_exactly(tp: int) -> None:
    shape = ModelShape(GPT3)
    s, b, h, a = 2048, 1, GPT3.d_model, GPT3.num_heads
    sbh = s * b * h

    def act(**kwargs: object) -> float:
        options = {"micro_batch": b, "seq_len": s, "element_bytes": 2, "tp": tp, "profile": "megatron"}
        return layer_activations(shape, **(options | kwargs)).saved

    if tp == 1:
        assert act() == sbh * (34 + 5 * a * s / h)
    else:
        assert act() == pytest.approx(sbh * (10 + 24 / tp + 5 * a * s / (h * tp)))
        assert act(recompute="selective") == pytest.approx(sbh * (10 + 24 / tp))
    assert act(sp=True) == pytest.approx(sbh / tp * (34 + 5 * a * s / h))
    assert act(sp=True, recompute="selective") == pytest.approx(34 * sbh / tp)
    assert act(recompute="full") == 2 * sbh


def test_plait_layer_activations_count_what_the_layer_saves() -> None:
    """GPT-2 layer, fp32: residuals 2nh + norm outputs 2nh + q, k, v, attention output 4nh + MLP 2nf,
    plus fp32 norm statistics and the attention log-sum-exp."""
    config = GPTConfig(vocab_size=4096, max_seq_len=128, d_model=256, num_layers=4, num_heads=4)
    n, h, f = 4 * 128, 256, 1024
    expected = 4 * (8 * n * h + 2 * n * f) + 2 * 2 * 4 * n + 4 * 4 * 4 * 128
    assert layer_activations(ModelShape(config), micro_batch=4, seq_len=128, element_bytes=4).saved == expected
    full = layer_activations(ModelShape(config), micro_batch=4, seq_len=128, element_bytes=4, recompute="full")
    assert full.saved == 4 * n * h and full.working == expected


def test_pipeline_first_stage_holds_more_micro_batches_under_1f1b() -> None:
    shape = ModelShape(get_preset("gpt-10m"))
    model = MemoryModel(shape, Workload(global_batch=8, seq_len=256))
    plan = Plan(dp=1, pp=4, microbatches=8)
    one_f_one_b = model.estimate(plan).activations
    gpipe = model.estimate(Plan(dp=1, pp=4, microbatches=8, pp_schedule="gpipe")).activations
    assert gpipe > one_f_one_b  # GPipe keeps all 8 micro-batches, 1F1B at most 4 on the first stage
