"""plan.precision="auto": bf16 where the hardware has bf16 units, fp32 elsewhere; explicit wins."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import plait
from plait.checkpoint.engine_state import _plan_changes
from plait.distributed.mesh import Mesh
from plait.distributed.precision import PrecisionChoice, cpu_bf16_units, cpu_flags, resolve_precision

SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
COOPER_LAKE = {"avx512f", "avx512_bf16"}
EPYC_ZEN2 = {"avx2", "fma", "sse4_2"}


@pytest.mark.parametrize(
    ("flags", "expected"), [(SAPPHIRE_RAPIDS, "bf16"), (COOPER_LAKE, "bf16"), (EPYC_ZEN2, "fp32"), (set(), "fp32")]
)
def test_auto_on_cpu_follows_the_bf16_units(flags: set[str], expected: str) -> None:
    choice = resolve_precision("auto", device_type="cpu", cpu_flags=flags)
    assert choice.precision == expected
    assert choice.line().startswith(f"precision: auto -> {expected} (")


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_on_cuda_follows_the_compute_capability(capability: tuple[int, int], expected: str) -> None:
    assert resolve_precision("auto", device_type="cuda", cuda_capability=capability).precision == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_always_wins(precision: str) -> None:
    for flags in (SAPPHIRE_RAPIDS, EPYC_ZEN2):
        assert resolve_precision(precision, device_type="cpu", cpu_flags=flags).precision == precision
    assert resolve_precision(precision, device_type="cuda", cuda_capability=(7, 0)).precision == precision


def test_cpu_flags_are_read_from_cpuinfo_text() -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx512f amx_bf16 avx512_bf16\n\nprocessor\t: 1\n"
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "amx_bf16", "avx512_bf16"}
    assert cpu_bf16_units(cpu_flags(cpuinfo)) == ("amx_bf16", "avx512_bf16")
    assert cpu_flags("processor\t: 0\n") == frozenset()


def test_plan_accepts_auto_and_names_it_among_the_choices() -> None:
    assert plait.Plan(precision="auto").precision == "auto"
    with pytest.raises(ValueError, match="fp32, bf16, fp16, auto"):
        plait.Plan(precision="bf17")


def test_the_mesh_resolves_auto_for_this_machine_and_the_engine_runs_it() -> None:
    here = resolve_precision("auto", device_type="cpu")
    mesh = Mesh(plait.Plan(precision="auto"), device_type="cpu")
    assert mesh.plan.precision == here.precision and mesh.precision == here
    torch.manual_seed(0)
    model = plait.models.build("tiny", vocab_size=64, max_seq_len=16)
    engine = plait.boost(
        model, optimizer=plait.optim.adamw(lr=1e-3), loss_fn=plait.losses.causal_lm, plan=plait.Plan(precision="auto")
    )
    assert engine.policy.name == here.precision
    expected_dtype = torch.bfloat16 if here.precision == "bf16" else torch.float32
    assert next(engine.model.parameters()).dtype == expected_dtype
    tokens = torch.randint(0, 64, (2, 16))
    assert torch.isfinite(engine.train_step({"input_ids": tokens, "labels": tokens}).loss)


def _engine_with(choice: PrecisionChoice) -> SimpleNamespace:
    plan = plait.Plan(dp=1, precision=choice.precision)
    return SimpleNamespace(plan=plan, mesh=SimpleNamespace(precision=choice))


def test_a_resume_where_auto_resolves_differently_says_so_in_one_line() -> None:
    saved = {"dp": 1, "tp": 1, "pp": 1, "ep": 1, "zero": 0, "microbatches": 1, "pp_schedule": "1f1b"}
    fp32_here = PrecisionChoice("auto", "fp32", "the CPU has neither amx_bf16 nor avx512_bf16")
    notes = _plan_changes(saved | {"precision": "bf16"}, _engine_with(fp32_here))
    assert notes == [f"trained in bf16; plan.precision=auto resolves to fp32 here ({fp32_here.reason})"]
    assert _plan_changes(saved | {"precision": "fp32"}, _engine_with(fp32_here)) == []
    explicit = PrecisionChoice("fp32", "fp32", "set explicitly")
    assert "precision bf16->fp32" in _plan_changes(saved | {"precision": "bf16"}, _engine_with(explicit))[0]


def test_calibrate_measures_the_bf16_gain_and_names_autos_choice() -> None:
    from plait.planner.calibrate_precision import measure_precision_gain

    gain = measure_precision_gain(size=128)
    assert gain.fp32_flops > 0 and gain.bf16_flops > 0 and gain.gain == gain.bf16_flops / gain.fp32_flops
    assert gain.choice == resolve_precision("auto", device_type="cpu")
    assert f"x{gain.gain:.2f}; plan.precision=auto -> {gain.choice.precision}" in gain.line()


def test_plait_plan_resolves_auto_for_the_cluster_it_plans() -> None:
    import argparse

    from plait.planner.cli import _precision
    from plait.planner.cluster import Cluster

    auto = argparse.Namespace(precision="auto")
    assert _precision(auto, Cluster.preset("h100")) == "bf16"
    cpu = Cluster.preset("h100").replace(backend="gloo")
    assert _precision(auto, cpu) == resolve_precision("auto", device_type="cpu").precision
