"""Expert parallel against one plain process whose routing groups are the ranks' micro-batches.

Each case checks the losses of every step (1e-5 relative), the final weights (allclose 1e-5, 1e-6),
and that every rank routed every token to the same experts as the reference did (with the
reference's top-k margin at least 1e-4 everywhere, so no decision could flip on float noise).
Each case also checks the expert bytes each rank holds (a formula, and the planner's expert units)
and the all-to-all bytes of every step against formulas over the routing that happened; under tp,
which splits each expert over the tp ranks, also the experts' tp all-reduce bytes per step. The
dispatch alone is checked against experts on one rank (uneven and empty splits, forward and
backward); a checkpoint saved under ep=2 continues under ep=1, ep=4 and dp only, one saved under
ep=2 x tp=2 (and tp=2) under other ep and tp degrees, and exports to Mixtral. `python -m tests.distributed.test_moe_ep 20 [CASE...]` runs the parity
cases by hand with a summary line each.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

import plait
from plait.distributed.comm import CommCounter, sent_bytes
from plait.models import build
from plait.moe import Experts, MoEConfig, expert_parameters, moe_layers, set_routing_groups
from plait.moe.all_to_all import AllToAllDispatch, Exchange
from plait.moe.aux import in_backward
from plait.moe.dispatch import Dispatched, LocalDispatch
from plait.moe.expert_parallel import count_exchange_bytes, slice_experts
from plait.moe.expert_tp import TensorParallelExperts
from plait.planner import ModelShape
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks

STEPS = 20
GLOBAL_BATCH = 16
SEQ = 16
MIN_MARGIN = 1e-4
ROUTER_SCALE = 30.0


@dataclass(frozen=True)
class Case:
    preset: str
    world: int
    ep: int
    zero: int = 0
    microbatches: int = 1
    capacity_factor: float | None = -1.0  # -1: the preset's
    seed: int = 0
    tp: int = 1
    pp: int = 1
    recompute: str = "none"

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)


def make_model(case: Case) -> torch.nn.Module:
    torch.manual_seed(case.seed)
    options = {} if case.capacity_factor == -1.0 else {"moe_capacity_factor": case.capacity_factor}
    model = build(case.preset, max_seq_len=SEQ, moe_z_loss_weight=1e-3, **options)
    with torch.no_grad():  # wider logit gaps: no routing decision within float noise of a tie
        for _, layer in moe_layers(model):
            layer.router.weight.mul_(ROUTER_SCALE)
    return model


def make_batches(vocab_size: int, steps: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab_size // 4, (steps, GLOBAL_BATCH, SEQ), generator=gen)
    labels = tokens.clone()
    labels[:, :, :3] = -100  # uneven token counts per rank exercise the global-token normalisation
    labels[1::2, : GLOBAL_BATCH // 2, 3:6] = -100
    return [{"input_ids": tokens[s], "labels": labels[s]} for s in range(steps)]


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, eps=1e-6, weight_decay=0.1)


class RouterLog:
    """Every router's logits per forward, by MoE layer name (forward hooks only read)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.logits: dict[str, list[torch.Tensor]] = {}
        for name, layer in moe_layers(model):
            self.logits[name] = []
            layer.router.register_forward_hook(
                lambda _m, _i, out, log=self.logits[name]: None if in_backward() else log.append(out.detach().clone())
            )


class CountingDispatch:
    """Wraps a layer's dispatch to keep the kept-slot counts per expert it was given."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.counts: list[torch.Tensor] = []
        self.rows: list[int] = []  # rows this rank's experts got, per forward

    def dispatch(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> Dispatched:
        dispatched = self.inner.dispatch(tokens, tokens_per_expert)
        if not in_backward():  # recomputation replays the forward: the same counts again
            self.counts.append(tokens_per_expert.detach().clone())
            self.rows.append(int(dispatched.tokens.shape[0]))
        return dispatched

    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return self.inner.combine(expert_output, dispatched)


def train_ep(rank: int, world_size: int, case: Case, steps: int) -> dict:
    model = make_model(case)
    log = RouterLog(model)
    plan = plait.Plan(
        dp=case.dp,
        tp=case.tp,
        pp=case.pp,
        ep=case.ep,
        zero=case.zero,
        microbatches=case.microbatches,
        recompute=case.recompute,
        bucket_mb=0.01,
    )
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plan,
        lr_scheduler=lambda opt: plait.optim.warmup_cosine(opt, warmup=2, total=steps),
        max_grad_norm=1.0,
    )
    counting = {name: CountingDispatch(layer.dispatch) for name, layer in moe_layers(engine.model)}
    for name, layer in moe_layers(engine.model):
        layer.dispatch = counting[name]
    expert_comm = CommCounter.for_mesh(engine.mesh)  # the tp-split experts' collectives alone
    for module in engine.model.modules():
        if isinstance(module, TensorParallelExperts):
            module.counter = expert_comm
    per_rank = GLOBAL_BATCH // engine.dp_size
    losses, exchanged, dropped, expert_tp = [], [], [], []
    for batch in make_batches(model.config.vocab_size, steps):
        engine.comm.reset()
        expert_comm.reset()
        shard = {k: v[engine.dp_rank * per_rank : (engine.dp_rank + 1) * per_rank] for k, v in batch.items()}
        losses.append(engine.train_step(shard).loss.item())
        exchanged.append(count_exchange_bytes(engine.comm))
        expert_tp.append(sum(v for (op, axis, _), v in expert_comm.sent.items() if (op, axis) == ("all_reduce", "tp")))
        stats = plait.moe.collect_stats(engine.model)
        dropped.append(stats.dropped_fraction if stats is not None else 0.0)
    expert_bytes = sum(p.numel() * p.element_size() for _, p in expert_parameters(engine.model))
    return {
        "losses": losses,
        "state": engine.model_state_dict(),
        "logits": {name: forwards for name, forwards in log.logits.items() if name in counting},
        "counts": {name: torch.stack(w.counts) for name, w in counting.items()},  # (forwards, E) per layer
        "exchanged": exchanged,
        "expert_tp_bytes": expert_tp,
        "expert_rows": {name: w.rows for name, w in counting.items()},
        "dropped": dropped,
        "expert_bytes": expert_bytes,
        "param_bytes": engine.state_bytes()["params"],
        "ep_rank": engine.mesh.rank("ep"),
        "dp_rank": engine.dp_rank,
        "ep_group": engine.mesh.ranks("ep"),
    }


def reference(case: Case, steps: int) -> dict:
    model = make_model(case)
    set_routing_groups(model, case.dp * case.microbatches)
    log = RouterLog(model)
    losses = train_reference(
        model,
        make_batches(model.config.vocab_size, steps),
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        lr_scheduler=lambda opt: plait.optim.warmup_cosine(opt, warmup=2, total=steps),
        max_grad_norm=1.0,
    )
    return {"losses": losses, "state": model.state_dict(), "logits": log.logits, "model": model}


def top_k_margin(logits: torch.Tensor, top_k: int) -> float:
    """The smallest gap between consecutive logits among each token's top k + 1 (a flip needs a 0 gap)."""
    ranked = logits.topk(min(top_k + 1, logits.shape[-1]), dim=-1).values
    return float((ranked[:, :-1] - ranked[:, 1:]).min())


def assert_same_routing(result: dict, ref: dict, *, case: Case, top_k: int) -> None:
    """A rank's micro-batches are rows [dp_rank * per_rank, (dp_rank + 1) * per_rank) of each global batch."""
    rows = GLOBAL_BATCH // case.dp * SEQ
    first = result["dp_rank"] * rows
    for name, forwards in result["logits"].items():
        for step in range(len(result["losses"])):
            ref_logits = ref["logits"][name][step][first : first + rows]
            mine = forwards[step * case.microbatches : (step + 1) * case.microbatches]
            got = torch.cat(mine).topk(top_k, dim=-1).indices
            margin = top_k_margin(ref_logits, top_k)
            assert margin >= MIN_MARGIN, f"step {step} {name}: the reference's top-k margin is {margin:.2e}"
            flips = int((got != ref_logits.topk(top_k, dim=-1).indices).any(dim=-1).sum())
            assert flips == 0, f"dp rank {result['dp_rank']} step {step} {name}: {flips} tokens routed differently"


def expected_exchange_bytes(results: list[dict], *, rank: int, case: Case, d_model: int) -> list[float]:
    """All-to-all bytes global rank `rank` sends per step: per MoE layer and micro-batch, the counts exchange
    ((ep-1)/ep x E x 8 bytes), and forward dispatch + combine and their backward reverses: twice
    (slots it sends to other ep ranks + slots it receives from them) x d_model x 4 bytes. Full
    recomputation replays the forward's exchanges (counts, dispatch, combine) once more in backward."""
    replays = 2 if case.recompute == "full" else 1
    ep, me = case.ep, results[rank]
    peers = [results[r] for r in me["ep_group"] if r != rank]
    per_step = []
    for step in range(len(me["losses"])):
        total = 0.0
        for name, counts in me["counts"].items():
            num_experts = counts.shape[1]
            mine = slice(me["ep_rank"] * num_experts // ep, (me["ep_rank"] + 1) * num_experts // ep)
            for forward in range(step * case.microbatches, (step + 1) * case.microbatches):
                sent = int(counts[forward].sum() - counts[forward][mine].sum())
                received = sum(int(peer["counts"][name][forward][mine].sum()) for peer in peers)
                counts_bytes = (ep - 1) / ep * num_experts * 8
                total += replays * counts_bytes + (replays + 1) * (sent + received) * d_model * 4
        per_step.append(total)
    return per_step


def expected_expert_bytes(model: torch.nn.Module, ep: int, *, names: Iterable[str], tp: int = 1) -> int:
    """The experts of the MoE layers `names`: E / ep of them per rank, each up (d_ff/tp x d) + down
    (d x d_ff/tp), a gate (d_ff/tp x d) with SwiGLU, biases d_ff/tp (+ d_ff/tp) + d (whole) when the
    model has them; fp32."""
    layers = dict(moe_layers(model))
    total = 0
    for name in names:
        c = layers[name].config
        swiglu = c.activation == "swiglu"
        width = c.d_ff // tp
        per_expert = (3 if swiglu else 2) * width * c.d_model
        if c.bias:
            per_expert += (2 if swiglu else 1) * width + c.d_model
        total += c.num_experts // ep * per_expert * 4
    return total


def expected_expert_tp_bytes(result: dict, *, case: Case, d_model: int) -> list[float]:
    """Tp all-reduce bytes of the experts per step: per MoE layer and micro-batch, the rows this rank's
    experts received (its own kept slots for them plus its ep peers'), d_model x 4 bytes each, once
    forward (the partial outputs) and once backward (the input gradient), each a ring all-reduce; full
    recomputation replays the forward's once more in backward."""
    collectives = 3 if case.recompute == "full" else 2
    per_step = []
    for step in range(len(result["losses"])):
        total = 0.0
        for received in result["expert_rows"].values():
            for rows in received[step * case.microbatches : (step + 1) * case.microbatches]:
                total += collectives * sent_bytes("all_reduce", rows * d_model * 4, case.tp)
        per_step.append(total)
    return per_step


def check_case(case: Case, steps: int) -> dict:
    ref = reference(case, steps)
    results = run_ranks(train_ep, case.world, case, steps, timeout_s=120.0)
    top_k = moe_layers(ref["model"])[0][1].config.top_k
    d_model = ref["model"].config.d_model
    whole_experts = sum(p.numel() * 4 for _, p in expert_parameters(ref["model"]))
    dense_bytes = sum(p.numel() * 4 for p in ref["model"].parameters()) - whole_experts
    for rank, result in enumerate(results):
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
        assert result["state"].keys() == ref["state"].keys()
        for name, value in ref["state"].items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6, msg=f"weight {name}")
        assert_same_routing(result, ref, case=case, top_k=top_k)
        names = result["counts"]
        assert result["expert_bytes"] == expected_expert_bytes(ref["model"], case.ep, names=names, tp=case.tp)
        if case.pp == 1:  # the planner's expert units, as many as MoE layers
            per_layer = ModelShape(ref["model"].config).expert_unit(case.ep).local(case.tp)
            assert result["expert_bytes"] == 4 * per_layer * ref["model"].config.num_moe_layers
        if case.pp == 1 and case.tp == 1:
            assert result["expert_bytes"] == whole_experts // case.ep
        if case.tp > 1:
            expected_tp = expected_expert_tp_bytes(result, case=case, d_model=d_model)
            assert result["expert_tp_bytes"] == pytest.approx(expected_tp, rel=1e-12)
            assert min(expected_tp) > 0
        if case.zero == 0 and case.tp == case.pp == 1:  # whole dense parameters plus this rank's experts
            assert result["param_bytes"] == dense_bytes + whole_experts // case.ep
        expected = expected_exchange_bytes(results, rank=rank, case=case, d_model=d_model)
        assert result["exchanged"] == pytest.approx(expected, rel=1e-12)
    return {"ref": ref, "results": results}


# Seeds whose reference keeps every top-k margin >= 1e-4 over 20 steps (a scan of seeds 0-12 found them).
CASES = {
    "world2-ep2": Case("switch-tiny", world=2, ep=2, seed=2),
    "world4-ep4": Case("switch-tiny", world=4, ep=4, seed=2),
    "world4-dp4-ep2": Case("switch-tiny", world=4, ep=2, microbatches=2, seed=2),
    "ep2-zero1": Case("switch-tiny", world=2, ep=2, zero=1, microbatches=2, seed=2),
    "ep2-zero3": Case("switch-tiny", world=4, ep=2, zero=3, seed=2),
    "ep2-zero2-recompute": Case("switch-tiny", world=2, ep=2, zero=2, recompute="full", seed=2),
    "top1-capacity1": Case("switch-tiny", world=2, ep=2, capacity_factor=1.0, seed=7),
    "top2-dropless": Case("mixtral-tiny", world=2, ep=2, capacity_factor=None, seed=4),
    "ep2-tp2": Case("switch-tiny", world=4, ep=2, tp=2, seed=2),
    "ep2-pp2": Case("switch-tiny", world=4, ep=2, pp=2, microbatches=2, seed=2),
    "ep1-tp2-pp2": Case("switch-tiny", world=4, ep=1, tp=2, pp=2, microbatches=2, seed=2),
    "tp2": Case("switch-tiny", world=2, ep=1, tp=2, seed=2),
    "ep2-tp2-recompute": Case("switch-tiny", world=4, ep=2, tp=2, zero=2, recompute="full", seed=2),
    "tp2-zero3": Case("switch-tiny", world=4, ep=1, tp=2, zero=3, seed=2),
    "mixtral-ep2-tp2": Case("mixtral-tiny", world=4, ep=2, tp=2, capacity_factor=None, seed=4),
}


def check_drops(case: Case, results: list[dict]) -> float:
    """The largest dropped fraction of any rank's step: some under capacity 1.0, none dropless."""
    dropped = max(d for result in results for d in result["dropped"])
    if case.capacity_factor == 1.0:
        assert dropped > 0, "capacity 1.0 dropped no token: the case tests nothing about dropping"
    if case.capacity_factor is None:
        assert dropped == 0
    return dropped


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_matches_one_process(name: str) -> None:
    check_drops(CASES[name], check_case(CASES[name], STEPS)["results"])


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else STEPS
    for name in sys.argv[2:] or list(CASES):
        outcome = check_case(CASES[name], steps)
        ref, results = outcome["ref"], outcome["results"]
        dropped = check_drops(CASES[name], results)
        worst = max(abs(a - b) / abs(b) for r in results for a, b in zip(r["losses"], ref["losses"], strict=True))
        top_k = moe_layers(ref["model"])[0][1].config.top_k
        margin = min(top_k_margin(logits, top_k) for forwards in ref["logits"].values() for logits in forwards)
        print(
            f"{name}: {steps} steps PASS, loss {ref['losses'][0]:.4f} -> {ref['losses'][-1]:.4f}, worst loss "
            f"rel. diff {worst:.1e}, min top-k margin {margin:.1e}, max dropped fraction {dropped:.3f}",
            flush=True,
        )


def _exchange_case(rank: int, world_size: int, counts: list[list[int]]) -> None:
    """One all-to-all dispatch + experts + combine, forward and backward, against every expert on one rank."""
    config = MoEConfig(d_model=8, d_ff=16, num_experts=4)
    torch.manual_seed(0)
    full = Experts(config)
    full.reset_parameters()
    inputs = [torch.randn(sum(c), 8, generator=torch.Generator().manual_seed(10 + r)) for r, c in enumerate(counts)]
    weights = [torch.randn(sum(c), 8, generator=torch.Generator().manual_seed(20 + r)) for r, c in enumerate(counts)]

    def run(tokens: torch.Tensor, per_expert: torch.Tensor, experts: Experts, dispatch) -> torch.Tensor:
        dispatched = dispatch.dispatch(tokens, per_expert)
        return dispatch.combine(experts(dispatched.tokens, dispatched.tokens_per_local_expert), dispatched)

    reference_inputs = [x.clone().requires_grad_() for x in inputs]
    reference_outputs = [
        run(x, torch.tensor(c), full, LocalDispatch()) for x, c in zip(reference_inputs, counts, strict=True)
    ]
    sum((y * w).sum() for y, w in zip(reference_outputs, weights, strict=True)).backward()
    group = dist.new_group(list(range(world_size)))
    local = slice_experts(full, config=config, first=2 * rank, count=2)
    mine = inputs[rank].clone().requires_grad_()
    dispatch = AllToAllDispatch(Exchange(group=group, rank=rank, size=world_size), num_local_experts=2)
    out = run(mine, torch.tensor(counts[rank]), local, dispatch)
    (out * weights[rank]).sum().backward()
    torch.testing.assert_close(out, reference_outputs[rank].detach())
    torch.testing.assert_close(mine.grad, reference_inputs[rank].grad)
    for name, param in local.named_parameters():
        reference = getattr(full, name).grad[2 * rank : 2 * rank + 2]
        torch.testing.assert_close(param.grad, reference, msg=name)


@pytest.mark.parametrize(
    "counts",
    [
        [[1, 2, 0, 5], [4, 0, 0, 1]],  # uneven splits both ways
        [[3, 0, 2, 0], [0, 0, 0, 0]],  # rank 1 sends nothing; its second expert gets no token
        [[0, 0, 0, 0], [0, 0, 0, 0]],  # nothing anywhere: every rank still joins each exchange
    ],
)
def test_all_to_all_dispatch_matches_local_experts(counts: list[list[int]]) -> None:
    run_ranks(_exchange_case, 2, counts)


@dataclass(frozen=True)
class Stage:
    world: int
    ep: int
    zero: int
    microbatches: int  # dp x microbatches stays 4: the same routing groups on both sides
    tp: int = 1


def _engine(case: Case, stage: Stage, *, steps: int) -> tuple[plait.Engine, torch.nn.Module]:
    model = make_model(case)
    plan = plait.Plan(
        dp=stage.world // stage.tp,
        tp=stage.tp,
        ep=stage.ep,
        zero=stage.zero,
        microbatches=stage.microbatches,
        bucket_mb=0.01,
    )
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plan,
        lr_scheduler=lambda opt: plait.optim.warmup_cosine(opt, warmup=2, total=steps),
        max_grad_norm=1.0,
    )
    return engine, model


def train_and_save(rank: int, world_size: int, case: Case, stage: Stage, path: str, steps: int, save_at: int):
    engine, model = _engine(case, stage, steps=steps)
    per_rank = GLOBAL_BATCH // engine.dp_size
    losses = []
    for step, batch in enumerate(make_batches(model.config.vocab_size, steps)):
        if step == save_at:
            engine.save(path)
        shard = {k: v[engine.dp_rank * per_rank : (engine.dp_rank + 1) * per_rank] for k, v in batch.items()}
        losses.append(engine.train_step(shard).loss.item())
    return losses, engine.model_state_dict()


def load_and_continue(rank: int, world_size: int, case: Case, stage: Stage, path: str, steps: int, save_at: int):
    engine, model = _engine(case, stage, steps=steps)
    engine.load(path)
    per_rank = GLOBAL_BATCH // engine.dp_size
    losses = []
    for batch in make_batches(model.config.vocab_size, steps)[save_at:]:
        shard = {k: v[engine.dp_rank * per_rank : (engine.dp_rank + 1) * per_rank] for k, v in batch.items()}
        losses.append(engine.train_step(shard).loss.item())
    return losses, engine.model_state_dict()


RESHARD_TARGETS = {
    "ep1": Stage(world=2, ep=1, zero=0, microbatches=2),
    "ep4": Stage(world=4, ep=4, zero=3, microbatches=1),
    "dp4": Stage(world=4, ep=1, zero=1, microbatches=1),
}


def test_checkpoint_saved_under_ep2_continues_under_other_ep_degrees(tmp_path) -> None:
    """Saved at step 2 by world 2, ep=2, ZeRO-1; steps 3-4 reloaded under ep=1, ep=4 and dp only match."""
    case, steps, save_at = CASES["ep2-zero1"], 4, 2
    source = Stage(world=2, ep=2, zero=1, microbatches=2)
    path = str(tmp_path / "ckpt")
    whole_losses, whole_state = run_ranks(train_and_save, 2, case, source, path, steps, save_at)[0]
    for name, target in RESHARD_TARGETS.items():
        results = run_ranks(load_and_continue, target.world, case, target, path, steps, save_at, timeout_s=120.0)
        for losses, state in results:
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(whole_losses[save_at:]), rtol=1e-5, atol=0)
            for key, value in whole_state.items():
                torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def _check_reshard(case: Case, source: Stage, targets: dict[str, Stage], path: str) -> None:
    steps, save_at = 4, 2
    whole_losses, whole_state = run_ranks(train_and_save, source.world, case, source, path, steps, save_at)[0]
    for name, target in targets.items():
        results = run_ranks(load_and_continue, target.world, case, target, path, steps, save_at, timeout_s=120.0)
        for losses, state in results:
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(whole_losses[save_at:]), rtol=1e-5, atol=0)
            for key, value in whole_state.items():
                torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_checkpoint_with_tp_split_experts_reshards(tmp_path) -> None:
    """Experts split over tp (and ep): saved at step 2 under ep=2 x tp=2 (ZeRO-1) and tp=2 alone; steps 3-4
    reloaded under ep=1 x tp=1, ep=1 x tp=2 with ZeRO-3, ep=2 x tp=1, and tp=2 -> tp=1, match."""
    case = CASES["ep2-zero1"]
    source = Stage(world=4, ep=2, zero=1, microbatches=2, tp=2)
    targets = {
        "ep1-tp1": Stage(world=2, ep=1, zero=0, microbatches=2),
        "ep1-tp2-zero3": Stage(world=4, ep=1, zero=3, microbatches=2, tp=2),
        "ep2-tp1": Stage(world=2, ep=2, zero=1, microbatches=2),
    }
    _check_reshard(case, source, targets, str(tmp_path / "ep2-tp2"))
    source = Stage(world=2, ep=1, zero=0, microbatches=4, tp=2)
    _check_reshard(case, source, {"tp1": Stage(world=2, ep=1, zero=2, microbatches=2)}, str(tmp_path / "tp2"))


def _lazy_initial_state(rank: int, world_size: int, preset: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build(preset, max_seq_len=SEQ)
    plan = plait.Plan(dp=world_size, ep=2, zero=3)
    engine = plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan)
    return engine.model_state_dict()


@pytest.mark.parametrize("preset", ["switch-tiny", "mixtral-tiny"])
def test_lazy_zero3_under_ep_materialises_the_plain_build(preset: str) -> None:
    """Each rank materialises only its experts' rows (drawn as the whole layer's), unit by unit."""
    torch.manual_seed(0)
    plain = build(preset, max_seq_len=SEQ).state_dict()
    for state in run_ranks(_lazy_initial_state, 4, preset):
        assert state.keys() == plain.keys()
        for name, value in plain.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


def _train_and_save_for_export(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    from plait.config import Config, DataConfig, ModelConfig

    case = CASES["mixtral-ep2-tp2"]
    model = make_model(case)
    plan = plait.Plan(dp=2, tp=2, ep=2, zero=1, bucket_mb=0.01)
    engine = plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan)
    for batch in make_batches(model.config.vocab_size, 2):
        engine.train_step({k: v[engine.dp_rank * 8 : (engine.dp_rank + 1) * 8] for k, v in batch.items()})
    overrides = {"max_seq_len": SEQ, "moe_z_loss_weight": 1e-3}
    config = Config(
        model=ModelConfig(preset=case.preset, overrides=overrides), data=DataConfig(vocab_size=512, seq_len=SEQ)
    )
    engine.save(path, config=config.to_dict())
    return engine.model_state_dict()


def test_checkpoint_with_tp_split_experts_exports_to_mixtral(tmp_path) -> None:
    """Saved under ep=2 x tp=2 (each piece of an expert tensor an ep rank's rows of a tp slice): the
    checkpoint reads back as the engine's gathered weights, bit for bit, and transformers' Mixtral loaded
    from its export reproduces plait's logits."""
    transformers = pytest.importorskip("transformers")
    from plait.checkpoint.hf_export import export_hf
    from plait.checkpoint.io import load_checkpoint
    from plait.config import config_from_dict
    from plait.models.gpt import GPT
    from plait.train.setup import model_config_for

    path = tmp_path / "ckpt"
    state = run_ranks(_train_and_save_for_export, 4, str(path), timeout_s=120.0)[0]
    weights, _, raw_config = load_checkpoint(path)
    assert weights.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(weights[name], value), name
    assert export_hf(path, tmp_path / "hf") == "mixtral"
    ours = GPT(model_config_for(config_from_dict(raw_config))).eval()
    ours.load_state_dict(weights)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(512, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-5)
