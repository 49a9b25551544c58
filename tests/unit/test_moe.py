"""plait.moe against naive per-token references, and plait's GPT with MoE layers, in one process."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import plait
from plait.config import Plan
from plait.models import GPTConfig, build
from plait.models.layers import MLP
from plait.moe import (
    MoEConfig,
    MoELayer,
    assign_slots,
    collect_stats,
    expert_parameters,
    load_balancing_loss,
    reset_stats,
    route,
    router_z_loss,
    set_aux_loss_scale,
    set_routing_groups,
)
from plait.train.reference import plain_loss

D_MODEL, D_FF = 16, 24


def make_layer(seed: int = 0, **options: object) -> MoELayer:
    settings = {"d_model": D_MODEL, "d_ff": D_FF, "num_experts": 4, **options}
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(**settings))  # type: ignore[arg-type]
    layer.reset_parameters()
    with torch.no_grad():  # zero biases would leave the bias paths untested
        for name, param in layer.named_parameters():
            if "bias" in name:
                param.normal_(std=0.1)
    return layer


def naive_route(logits: torch.Tensor, *, top_k: int, order: str, normalize: bool) -> list[list[tuple[int, float]]]:
    """Per token: [(expert, weight)] best first, from plain Python sorting."""
    result = []
    for row in logits.tolist():
        ranked = sorted(range(len(row)), key=lambda e: -row[e])[:top_k]
        if order == "before":
            total = sum(math.exp(v) for v in row)
            weights = [math.exp(row[e]) / total for e in ranked]
            if normalize:
                weights = [w / sum(weights) for w in weights]
        else:
            total = sum(math.exp(row[e]) for e in ranked)
            weights = [math.exp(row[e]) / total for e in ranked]
        result.append(list(zip(ranked, weights, strict=True)))
    return result


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize(("order", "normalize"), [("before", False), ("before", True), ("after", False)])
def test_router_matches_a_per_token_reference(top_k: int, order: str, normalize: bool) -> None:
    logits = torch.randn(20, 5, generator=torch.Generator().manual_seed(top_k))
    routing = route(logits, top_k=top_k, softmax_order=order, normalize_topk=normalize)
    expected = naive_route(logits, top_k=top_k, order=order, normalize=normalize)
    assert routing.expert_index.tolist() == [[e for e, _ in token] for token in expected]
    torch.testing.assert_close(routing.weight, torch.tensor([[w for _, w in token] for token in expected]))


def test_router_computes_in_fp32_whatever_the_input_dtype() -> None:
    layer = make_layer()
    logits = layer.router(torch.randn(6, D_MODEL, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32


def naive_keep(expert_index: torch.Tensor, *, num_experts: int, capacity: int | None) -> list[tuple[int, int, int]]:
    """Kept (expert, group, choice, token) slots by a loop in GShard priority, sorted as the layer sorts them."""
    num_groups, tokens, top_k = expert_index.shape
    kept = []
    for g in range(num_groups):
        taken = [0] * num_experts
        for j in range(top_k):
            for t in range(tokens):
                e = int(expert_index[g, t, j])
                if capacity is None or taken[e] < capacity:
                    taken[e] += 1
                    kept.append((e, g, j, t))
    return sorted(kept)  # by expert, then group, then priority (choice, token)


@pytest.mark.parametrize(("num_groups", "capacity"), [(1, 3), (2, 2), (3, 1), (2, None)])
def test_capacity_drops_in_gshard_priority_like_a_loop(num_groups: int, capacity: int | None) -> None:
    gen = torch.Generator().manual_seed(num_groups)
    tokens, top_k, num_experts = 7, 2, 4
    expert_index = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_groups * tokens)])
    expert_index = expert_index.view(num_groups, tokens, top_k)
    weight = torch.rand(num_groups, tokens, top_k, generator=gen)
    got = assign_slots(expert_index, weight, num_experts=num_experts, capacity=capacity)
    expected = naive_keep(expert_index, num_experts=num_experts, capacity=capacity)
    assert got.expert_index.tolist() == [e for e, _, _, _ in expected]
    assert got.token_index.tolist() == [g * tokens + t for _, g, _, t in expected]
    assert got.weight.tolist() == [weight[g, t, j].item() for _, g, j, t in expected]
    counts = torch.bincount(torch.tensor([e for e, _, _, _ in expected]), minlength=num_experts)
    assert got.tokens_per_expert.tolist() == counts.tolist()
    routed = [[int((expert_index[g] == e).sum()) for e in range(num_experts)] for g in range(num_groups)]
    assert got.routed_counts.tolist() == routed
    assert int(got.num_dropped) == num_groups * tokens * top_k - len(expected)


def test_second_choices_drop_before_first_choices() -> None:
    # Every token's 1st choice is expert 0 and 2nd choice expert 1, except token 0, whose 2nd is expert 0.
    expert_index = torch.tensor([[[1, 0], [0, 1], [0, 1], [0, 1]]])
    got = assign_slots(expert_index, torch.ones(1, 4, 2), num_experts=2, capacity=3)
    kept = sorted(zip(got.expert_index.tolist(), got.token_index.tolist(), strict=True))
    # expert 0 takes the 1st choices of tokens 1-3 (capacity 3); token 0's 2nd choice drops
    assert kept == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]


def test_dropless_keeps_every_slot() -> None:
    layer = make_layer(top_k=2, capacity_factor=None)
    layer(torch.randn(3, 10, D_MODEL))
    assert layer.stats.num_slots == 60 and int(layer.stats.dropped_slots) == 0


def naive_layer_output(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Dropless MoE output token by token: sum over chosen experts of weight x expert MLP (by formula)."""
    cfg, experts = layer.config, layer.experts
    flat = x.reshape(-1, cfg.d_model)
    chosen = naive_route(layer.router(flat), top_k=cfg.top_k, order=cfg.softmax_order, normalize=cfg.normalize_topk)
    rows = []
    for token, picks in zip(flat, chosen, strict=True):
        out = torch.zeros(cfg.d_model)
        for e, w in picks:
            up = experts.up_weight[e] @ token + (experts.up_bias[e] if experts.up_bias is not None else 0)
            if experts.gate_weight is not None:
                gate = experts.gate_weight[e] @ token + (experts.gate_bias[e] if experts.gate_bias is not None else 0)
                hidden = F.silu(gate) * up
            else:
                hidden = 0.5 * up * (1 + torch.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up**3)))
            out += w * (
                experts.down_weight[e] @ hidden + (experts.down_bias[e] if experts.down_bias is not None else 0)
            )
        rows.append(out)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize(("activation", "bias"), [("gelu", True), ("swiglu", False), ("swiglu", True)])
@pytest.mark.parametrize("top_k", [1, 2])
def test_experts_match_a_per_token_reference(activation: str, bias: bool, top_k: int) -> None:
    layer = make_layer(activation=activation, bias=bias, top_k=top_k, normalize_topk=top_k > 1)
    x = torch.randn(2, 5, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_layer_output(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("activation", "bias"), [("gelu", True), ("gelu", False), ("swiglu", False)])
def test_one_expert_top1_dropless_is_the_dense_mlp(activation: str, bias: bool) -> None:
    gpt = GPTConfig(vocab_size=8, max_seq_len=8, d_model=D_MODEL, num_layers=2, num_heads=2, d_ff=D_FF,
                    activation=activation, bias=bias)  # fmt: skip
    torch.manual_seed(0)
    dense = MLP(gpt)
    dense.reset_parameters()
    layer = make_layer(num_experts=1, top_k=1, activation=activation, bias=bias)
    with torch.no_grad():
        for proj in ("up", "gate", "down"):
            linear = getattr(dense, f"{proj}_proj")
            if linear is not None:
                getattr(layer.experts, f"{proj}_weight")[0].copy_(linear.weight)
                if bias:
                    getattr(layer.experts, f"{proj}_bias")[0].copy_(linear.bias)
        layer.router.weight.normal_(std=5.0)  # one expert: its weight is 1 whatever the router says
    x = torch.randn(3, 4, D_MODEL)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-6, atol=1e-6)


def test_shared_experts_add_a_dense_mlp_for_every_token() -> None:
    gpt = GPTConfig(vocab_size=8, max_seq_len=8, d_model=D_MODEL, num_layers=2, num_heads=2, d_ff=2 * D_FF)
    shared = MLP(gpt)
    layer = make_layer(top_k=2)
    with_shared = MoELayer(layer.config, shared=shared)
    with_shared.reset_parameters()
    with_shared.router.load_state_dict(layer.router.state_dict())
    with_shared.experts.load_state_dict(layer.experts.state_dict())
    x = torch.randn(2, 6, D_MODEL)
    torch.testing.assert_close(with_shared(x), layer(x) + shared(x))


def test_routing_groups_equal_running_each_group_alone() -> None:
    layer = make_layer(top_k=2, capacity_factor=0.75, z_loss_weight=1e-3)
    x = torch.randn(4, 6, D_MODEL)
    halves = []
    for part in x.chunk(2):
        reset_stats(layer)
        halves.append((layer(part), collect_stats(layer)))
    reset_stats(layer)
    set_routing_groups(layer, 2)
    whole, stats = layer(x), collect_stats(layer)
    torch.testing.assert_close(whole, torch.cat([out for out, _ in halves]), rtol=1e-6, atol=1e-7)
    assert stats is not None and all(s is not None for _, s in halves)
    mean = lambda field: sum(getattr(s, field) for _, s in halves) / 2  # noqa: E731
    for field in ("aux_loss", "z_loss", "dropped_fraction"):
        assert getattr(stats, field) == pytest.approx(mean(field), rel=1e-6), field
    assert stats.dropped_fraction > 0  # capacity 0.75 must drop: the groups' capacities differ from one group's
    set_routing_groups(layer, 1)
    assert not torch.allclose(layer(x), whole)


def test_num_groups_must_divide_the_batch() -> None:
    layer = make_layer()
    set_routing_groups(layer, 3)
    with pytest.raises(ValueError, match="does not divide the batch of 4"):
        layer(torch.randn(4, 2, D_MODEL))
    with pytest.raises(ValueError, match="positive int"):
        set_routing_groups(layer, 0)


def test_aux_and_z_loss_match_their_formulas() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 10, 4, generator=gen)  # two groups of ten tokens
    top_k = 2
    routing = route(logits.view(20, 4), top_k=top_k, softmax_order="before")
    counts = torch.stack(
        [torch.bincount(routing.expert_index.view(2, 10, 2)[g].flatten(), minlength=4) for g in range(2)]
    )
    got = load_balancing_loss(routing.probs.view(2, 10, 4), counts, top_k=top_k)
    expected = 0.0
    for g in range(2):
        probs = logits[g].softmax(-1)
        f = [sum(int(e == i) for row in routing.expert_index.view(2, 10, 2)[g].tolist() for e in row) / (10 * top_k)
             for i in range(4)]  # fmt: skip
        expected += 4 * sum(f[i] * probs[:, i].mean().item() for i in range(4)) / 2
    assert got.item() == pytest.approx(expected, rel=1e-6)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.view(20, 4).tolist()) / 20
    assert router_z_loss(logits.view(20, 4)).item() == pytest.approx(z, rel=1e-6)
    even = torch.full((1, 8, 4), 0.25)
    assert load_balancing_loss(even, torch.full((1, 4), 4), top_k=2).item() == pytest.approx(1.0)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_injected_aux_gradient_equals_autograd_of_the_total_loss(scale: float) -> None:
    x = torch.randn(4, 5, D_MODEL)
    target = torch.randn(4, 5, D_MODEL)
    options = {"top_k": 2, "capacity_factor": 1.0, "aux_loss_weight": 0.3, "z_loss_weight": 0.05}

    def grads(layer: MoELayer, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": inputs.grad, **{n: p.grad for n, p in layer.named_parameters()}}

    injected, direct = make_layer(**options), make_layer(**options)
    for layer in (injected, direct):
        set_routing_groups(layer, 2)
    set_aux_loss_scale(injected, scale)
    x1 = x.clone().requires_grad_()
    (scale * (injected(x1) * target).sum()).backward()

    set_aux_loss_scale(direct, 0.0)  # the injected path adds nothing: the aux loss is computed here instead
    x2 = x.clone().requires_grad_()
    main = (direct(x2) * target).sum()
    routing = route(direct.router(x2.reshape(-1, D_MODEL)), top_k=2, softmax_order="before")
    slots = assign_slots(routing.expert_index.view(2, 10, 2), routing.weight.view(2, 10, 2), num_experts=4, capacity=5)
    aux = load_balancing_loss(routing.probs.view(2, 10, 4), slots.routed_counts, top_k=2)
    (scale * (main + 0.3 * aux + 0.05 * router_z_loss(routing.logits))).backward()

    expected = grads(direct, x2)
    for name, grad in grads(injected, x1).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert injected.router.weight.grad.abs().sum() > 0


def test_moe_config_errors_say_what_to_change() -> None:
    base = {"d_model": 8, "d_ff": 8, "num_experts": 4}
    cases = [
        ({"top_k": 5}, "top_k=5 exceeds num_experts=4"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0 must be a positive number"),
        ({"softmax_order": "middle"}, "softmax_order='middle' is not supported"),
        ({"softmax_order": "after", "normalize_topk": True}, "normalize_topk=True has no effect"),
        ({"aux_loss_weight": -1}, "aux_loss_weight=-1 must be a number >= 0"),
        ({"activation": "relu"}, "activation='relu' is not supported"),
        ({"num_experts": 0}, "num_experts must be a positive int"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            MoEConfig(**{**base, **options})  # type: ignore[arg-type]


def test_gpt_moe_options_are_validated() -> None:
    tiny = plait.models.get_preset("tiny")
    cases = [
        ({"moe_experts": 4, "moe_top_k": 5}, "moe_top_k=5 exceeds moe_experts=4"),
        ({"moe_experts": 4, "moe_every": 3}, "moe_every=3 exceeds num_layers=2"),
        ({"moe_experts": 4, "moe_every": 0}, "moe_every must be a positive int"),
        ({"moe_experts": 4, "moe_capacity_factor": -1.0}, "moe_capacity_factor"),
        ({"moe_experts": 4, "moe_softmax_order": "late"}, "moe_softmax_order='late' is not supported"),
        ({"moe_experts": -1}, "moe_experts must be an int >= 0"),
        ({"moe_experts": 4, "moe_z_loss_weight": -0.1}, "moe_z_loss_weight=-0.1 must be a number >= 0"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(tiny, **options)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"moe_every": 2, "moe_shared_experts": 2, "moe_d_ff": 48},
        {"activation": "swiglu", "bias": False, "moe_shared_experts": 1, "moe_top_k": 1},
        {"activation": "swiglu", "bias": True, "moe_every": 2},
    ],
)
def test_gpt_moe_parameter_counts(options: dict[str, object]) -> None:
    model = build("tiny", moe_experts=4, **options)  # type: ignore[arg-type]
    cfg = model.config
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for _, p in expert_parameters(model))
    idle = experts * (cfg.moe_experts - cfg.moe_top_k) // cfg.moe_experts
    assert cfg.num_active_parameters() == cfg.num_parameters() - idle
    assert [type(b.mlp).__name__ for b in model.blocks] == [
        "MoELayer" if cfg.is_moe_layer(i) else "MLP" for i in range(cfg.num_layers)
    ]


def test_moe_presets_build_and_count_their_parameters() -> None:
    for name in ("switch-tiny", "mixtral-tiny"):
        model = build(name)
        assert model.config.num_parameters() == sum(p.numel() for p in model.parameters())
    moe_100m = plait.models.get_preset("moe-100m")
    assert 95e6 < moe_100m.num_parameters() < 105e6 and moe_100m.moe_experts == 8
    dense = plait.models.get_preset("tiny")
    switch = plait.models.get_preset("switch-tiny")
    assert switch.flops_per_token(64) - dense.flops_per_token(64) == 6 * 4 * 64 * 2  # the routers' matmuls


def batches(vocab_size: int, *, num: int, batch: int, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(0, vocab_size // 4, (num, batch, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": t, "labels": t.clone()} for t in tokens]


@pytest.mark.parametrize("preset", ["switch-tiny", "mixtral-tiny"])
def test_gpt_moe_trains_in_one_process(preset: str) -> None:
    torch.manual_seed(0)
    model = build(preset, max_seq_len=16)
    engine = plait.boost(
        model, optimizer=plait.optim.adamw(lr=3e-3), loss_fn=plait.losses.causal_lm, plan=Plan(microbatches=2)
    )
    batch = batches(model.config.vocab_size, num=1, batch=8)[0]
    losses = []
    for _ in range(8):
        losses.append(engine.train_step(batch).loss.item())
        stats = collect_stats(engine.model)
        assert stats is not None and stats.load_max >= stats.load_min
    assert losses[-1] < losses[0] - 0.3
    assert 1.0 <= stats.aux_loss < 4.0


class GradRecorder(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it was handed at its last step."""

    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        self.grads = {id(p): p.grad.clone() for group in self.param_groups for p in group["params"]}
        return super().step(closure)


def test_accumulation_equals_one_batch_split_into_routing_groups() -> None:
    torch.manual_seed(0)
    model = build("switch-tiny", max_seq_len=16, moe_z_loss_weight=1e-2)
    reference = build("switch-tiny", max_seq_len=16, moe_z_loss_weight=1e-2)
    reference.load_state_dict(model.state_dict())
    batch = batches(model.config.vocab_size, num=1, batch=8)[0]
    batch["labels"][:3, :5] = -100  # the micro-batches count different numbers of tokens
    engine = plait.boost(
        model, optimizer=lambda ps: GradRecorder(ps, lr=0.0), loss_fn=plait.losses.causal_lm, plan=Plan(microbatches=2)
    )
    engine.train_step(batch)
    got = engine.optimizer.grads  # type: ignore[attr-defined]

    def reference_grads(num_groups: int) -> dict[str, torch.Tensor]:
        reference.zero_grad(set_to_none=True)
        set_routing_groups(reference, num_groups)
        plain_loss(plait.losses.causal_lm, reference(**batch), batch).backward()
        return {name: p.grad for name, p in reference.named_parameters()}

    expected = reference_grads(2)
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[id(param)], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    one_group = reference_grads(1)
    assert not all(torch.allclose(one_group[n], expected[n], rtol=1e-4, atol=1e-6) for n in expected)


def test_recomputation_replays_routing_without_counting_it_twice() -> None:
    from plait.recompute import apply_recompute

    torch.manual_seed(0)
    plain = build("switch-tiny", max_seq_len=16, moe_z_loss_weight=1e-2)
    recomputed = build("switch-tiny", max_seq_len=16, moe_z_loss_weight=1e-2)
    recomputed.load_state_dict(plain.state_dict())
    apply_recompute(recomputed, mode="full")
    batch = batches(plain.config.vocab_size, num=1, batch=4)[0]
    for model in (plain, recomputed):
        plain_loss(plait.losses.causal_lm, model(**batch), batch).backward()
    assert all(layer.stats.num_forwards == 1 for layer in recomputed.modules() if isinstance(layer, MoELayer))
    assert collect_stats(recomputed) == collect_stats(plain)
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-8, msg=name)
