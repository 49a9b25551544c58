"""Precision policies and the loss scaler, in one process."""

from __future__ import annotations

import pytest
import torch

from plait.amp import LossScaler, Overflow, PrecisionPolicy

NAMES = [f"blocks.{i}.weight" for i in range(5)]
NO_OVERFLOW = Overflow(found=False, first_name=None)
OVERFLOW = Overflow(found=True, first_name="w")


@pytest.mark.parametrize(
    ("name", "param", "master_copy", "scaling"),
    [
        ("fp32", torch.float32, False, False),
        ("bf16", torch.bfloat16, True, False),
        ("fp16", torch.float16, True, True),
    ],
)
def test_named_policies(name: str, param: torch.dtype, master_copy: bool, scaling: bool) -> None:
    policy = PrecisionPolicy.from_name(name)
    assert policy.name == name
    assert policy.param_dtype == param
    assert policy.reduce_dtype == torch.float32
    assert policy.master_dtype == torch.float32
    assert policy.needs_master_copy == master_copy
    assert policy.uses_loss_scaling == scaling


def test_policy_reduce_dtype_is_a_choice() -> None:
    policy = PrecisionPolicy.from_name("bf16", reduce_dtype=torch.bfloat16)
    assert policy.reduce_dtype == torch.bfloat16
    assert policy.param_dtype == torch.bfloat16


def test_policy_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        PrecisionPolicy.from_name("fp8")
    with pytest.raises(ValueError, match="master_dtype"):
        PrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32, master_dtype=torch.float16)
    with pytest.raises(ValueError, match="reduce_dtype"):
        PrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.int32)


def test_scaler_schedule_grows_backs_off_and_floors() -> None:
    scaler = LossScaler(init_scale=8.0, growth_interval=3, min_scale=2.0)
    flags = [False, False, False, False, True, False, False, True, True, True, False, False, False]
    expected = [8, 8, 16, 16, 8, 8, 8, 4, 2, 2, 2, 2, 4]
    seen = []
    for found in flags:
        scaler.update(OVERFLOW if found else NO_OVERFLOW)
        seen.append(scaler.scale)
    assert seen == expected


def test_scaler_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=2.0)
    with pytest.raises(ValueError, match="growth_interval"):
        LossScaler(growth_interval=0)
    with pytest.raises(ValueError, match="min_scale"):
        LossScaler(init_scale=0.5, min_scale=1.0)


def test_state_dict_round_trip() -> None:
    scaler = LossScaler(init_scale=1024.0, growth_interval=4)
    for found in [False, True, False, False]:
        scaler.update(OVERFLOW if found else NO_OVERFLOW)
    resumed = LossScaler(init_scale=1024.0, growth_interval=4)
    resumed.load_state_dict(scaler.state_dict())
    assert resumed.state_dict() == scaler.state_dict() == {"scale": 512.0, "num_good_steps": 2, "dynamic": True}
    for _ in range(2):  # the counter came along: growth after the same number of good steps
        scaler.update(NO_OVERFLOW)
        resumed.update(NO_OVERFLOW)
    assert resumed.scale == scaler.scale == 1024.0
    with pytest.raises(ValueError, match="dynamic"):
        LossScaler(dynamic=False).load_state_dict(scaler.state_dict())


def _named(bad_index: int | None, value: float) -> list[tuple[str, torch.Tensor | None]]:
    grads = [torch.randn(4, 3) for _ in NAMES]
    if bad_index is not None:
        grads[bad_index][1, 2] = value
    return list(zip(NAMES, grads, strict=True))


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_check_overflow_names_the_first_non_finite_grad(value: float) -> None:
    named = _named(2, value)
    named[4][1][0, 0] = value  # a later one too: the first still wins
    overflow = LossScaler().check_overflow(named, groups=[None])
    assert overflow == Overflow(found=True, first_name="blocks.2.weight")


def test_check_overflow_skips_none_and_empty_grads() -> None:
    named = _named(3, float("nan"))
    named[0] = (NAMES[0], None)
    named[1] = (NAMES[1], torch.empty(0))
    assert LossScaler().check_overflow(named, groups=[None]).first_name == "blocks.3.weight"
    named[3] = (NAMES[3], None)
    assert LossScaler().check_overflow(named, groups=[None]) == Overflow(found=False, first_name=None)
    assert LossScaler().check_overflow([(n, None) for n in NAMES], groups=[None]).found is False


def test_check_overflow_mixed_dtypes_and_huge_finite_values() -> None:
    named = [
        ("a", torch.full((3,), 3e38)),  # finite: a sum of squares would overflow, max-abs does not
        ("b", torch.full((3,), 60000.0, dtype=torch.float16)),
        ("c", torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)),
    ]
    assert LossScaler(dynamic=False).check_overflow(named, groups=[]).first_name == "c"


def test_unscale_is_exact_for_power_of_two_scales() -> None:
    for scale in [2.0**-3, 1.0, 2.0**10, 2.0**16, 2.0**24]:
        scaler = LossScaler(init_scale=scale, min_scale=2.0**-3)
        grads = [torch.randn(5, 7), torch.randn(3, dtype=torch.float64)]
        expected = [g.clone() for g in grads]
        scaled = [g * scale for g in grads]
        scaler.unscale_(scaled)
        for got, want in zip(scaled, expected, strict=True):
            assert torch.equal(got, want)


def test_disabled_scaler_is_identity_but_still_checks() -> None:
    scaler = LossScaler(dynamic=False)
    loss = torch.tensor(3.0)
    assert scaler.scale == 1.0 and scaler.scale_loss(loss) is loss
    grads = [torch.full((2,), 4.0)]
    scaler.unscale_(grads)
    assert torch.equal(grads[0], torch.full((2,), 4.0))
    overflow = scaler.check_overflow(_named(0, float("nan")), groups=[None])
    assert overflow.first_name == "blocks.0.weight"
    scaler.update(overflow)
    assert scaler.scale == 1.0
    assert scaler.message(overflow, 3) == "step 3 skipped: non-finite gradient first found in blocks.0.weight"


def test_from_policy() -> None:
    assert LossScaler.from_policy(PrecisionPolicy.from_name("fp16")).dynamic
    assert not LossScaler.from_policy(PrecisionPolicy.from_name("bf16")).dynamic


def test_message() -> None:
    scaler = LossScaler()
    overflow = Overflow(found=True, first_name="blocks.0.attn.q_proj.weight")
    assert scaler.message(overflow, 12) == (
        "step 12 skipped: non-finite gradient first found in blocks.0.attn.q_proj.weight; loss scale 65536 -> 32768"
    )
    assert scaler.message(NO_OVERFLOW, 13) == "step 13: gradients finite; loss scale 65536"


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _small_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Computed in fp32, as plait's losses do; the 1e-5 puts gradients deep in fp16's subnormal range (below 6e-5, steps of 6e-8).
    return 1e-5 * (model(x.to(next(model.parameters()).dtype)).float() - y).pow(2).mean()


def _fp16_master_grads(scaler: LossScaler, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model = _tiny_model().half()
    scaler.scale_loss(_small_loss(model, x, y)).backward()
    named = [(name, p.grad) for name, p in model.named_parameters()]
    assert not scaler.check_overflow(named, groups=[None]).found
    # Unscale the fp32 master copies, as the engine does: unscaling the fp16 grads would underflow them again.
    master = [p.grad.float() for p in model.parameters()]
    scaler.unscale_(master)
    return master


def test_fp16_loss_scaling_recovers_fp32_grads() -> None:
    """fp16 grads of a scaled loss, unscaled in fp32, match fp32 grads to fp16 precision.

    Tolerance: rtol 1e-2 and atol 1% of the largest gradient. fp16 keeps 11
    significant bits (relative step 4.9e-4) and the forward/backward chain
    rounds a handful of times, so errors near 1e-3 of a value are expected;
    without scaling most of these gradients are subnormal or zero in fp16 and
    miss by far more than that, which the second half checks.
    """
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
    reference = _tiny_model()
    _small_loss(reference, x, y).backward()
    want = [p.grad for p in reference.parameters()]
    scaled = _fp16_master_grads(LossScaler(init_scale=2.0**16), x, y)
    unscaled = _fp16_master_grads(LossScaler(dynamic=False), x, y)
    for got, ref in zip(scaled, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    worst_unscaled = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(unscaled, want, strict=True))
    assert worst_unscaled > 0.2  # measured 0.3-1.2 over seeds; scaled: below 2e-3


def test_fp16_overflow_backs_off_the_scale() -> None:
    model = _tiny_model().half()
    scaler = LossScaler(init_scale=2.0**24)
    x = torch.randn(4, 8, dtype=torch.float16)
    scaler.scale_loss(model(x).float().pow(2).sum()).backward()  # 2**24 overflows fp16 (max 65504)
    overflow = scaler.check_overflow([(n, p.grad) for n, p in model.named_parameters()], groups=[None])
    assert overflow == Overflow(found=True, first_name="0.weight")
    scaler.update(overflow)
    assert scaler.scale == 2.0**23
