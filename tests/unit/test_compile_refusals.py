"""plan.compile's refusals: an unknown mode, a machine without inductor's compiler, 'full' under ZeRO-3."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import plait
from plait.compile import CompiledUnits, apply_compile, check_compile_available, compile_module, missing_compiler


def test_unknown_mode_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"plan.compile='fast': choose one of off, blocks, full"):
        plait.Plan(compile="fast")
    with pytest.raises(ValueError, match="choose one of off, blocks, full"):
        apply_compile(nn.Linear(2, 2), mode="fast")


def test_without_a_cpp_compiler_boost_refuses_before_any_collective() -> None:
    model = plait.models.build("tiny", max_seq_len=16)
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        assert "no C++ compiler" in (missing_compiler("cpu") or "")
        with pytest.raises(ValueError, match=r"plan.compile='blocks' on cpu: no C\+\+ compiler .* install g\+\+"):
            plait.boost(
                model, optimizer=torch.optim.AdamW, loss_fn=plait.losses.causal_lm, plan=plait.Plan(compile="blocks")
            )
        check_compile_available("off", device_type="cpu")  # eager needs no compiler


@pytest.mark.skipif(missing_compiler("cuda") is None, reason="Triton is installed")
def test_cuda_without_triton_is_refused() -> None:
    with pytest.raises(ValueError, match=r"plan.compile='full' on cuda: Triton .* install Triton"):
        check_compile_available("full", device_type="cuda")


def test_full_with_zero3_is_refused_with_the_alternative() -> None:
    with pytest.raises(ValueError, match=r"plan.compile='blocks'"):
        plait.Plan(dp=2, zero=3, compile="full").check_available()
    plait.Plan(dp=2, zero=3, compile="blocks").check_available()


def test_blocks_are_compiled_in_place_once() -> None:
    model = plait.models.build("tiny", max_seq_len=16)
    names = [name for name, _ in model.named_parameters()]
    units = apply_compile(model, mode="blocks", eager=["blocks.0.mlp"])
    assert units == CompiledUnits(mode="blocks", names=("blocks.0", "blocks.1"), eager=("blocks.0.mlp",))
    assert [name for name, _ in model.named_parameters()] == names  # names and classes stay
    assert apply_compile(model, mode="off") is None
    with pytest.raises(ValueError, match="compiled twice"):
        compile_module(model.blocks[0])
