"""Every collective a training step issues is counted: bytes sent per rank per mesh axis and link,
equal to the theory written out here from the model's sizes (dp=2, tp=2 with and without sequence
parallel, pp=2; two ranks each, three steps, two micro-batches)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import plait
from plait.distributed.mesh import Mesh
from tests.distributed.harness import run_ranks

STEPS = 3
SEQ = 16
PER_RANK = 4  # sequences per rank per step
MICROBATCHES = 2
MICRO = PER_RANK // MICROBATCHES
FP32 = 4

PLANS: dict[str, dict[str, Any]] = {
    "dp": {"dp": 2},
    "tp": {"dp": 1, "tp": 2, "microbatches": MICROBATCHES},
    "tp_sp": {"dp": 1, "tp": 2, "microbatches": MICROBATCHES, "sequence_parallel": True},
    "pp": {"dp": 1, "pp": 2, "microbatches": MICROBATCHES},
}


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return plait.models.build("tiny", max_seq_len=SEQ)  # GPT-2 style: learned positions, tied embeddings


def batch_for(step: int, engine: plait.Engine, vocab_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, vocab_size, (PER_RANK * engine.dp_size, SEQ), generator=gen)
    labels = tokens.clone()
    labels[:, :2] = -100
    mine = slice(engine.dp_rank * PER_RANK, (engine.dp_rank + 1) * PER_RANK)
    return {"input_ids": tokens[mine], "labels": labels[mine]}


def count_steps(engine: plait.Engine, vocab_size: int) -> list[dict[str, Any]]:
    steps = []
    for step in range(STEPS):
        engine.comm.reset()
        engine.train_step(batch_for(step, engine, vocab_size))
        by_op: dict[str, float] = {}
        for (op, _, _), value in engine.comm.sent.items():
            by_op[op] = by_op.get(op, 0.0) + value
        steps.append(
            {
                "axis": engine.comm.sent_by_axis,
                "link": engine.comm.sent_by_link,
                "op": by_op,
                "volume": engine.comm.total_bytes,
            }
        )
    return steps


def count_every_plan(rank: int, world_size: int) -> dict[str, list[dict[str, Any]]]:
    results = {}
    for name, plan_kwargs in PLANS.items():
        model = build()
        plan = plait.Plan(bucket_mb=0.01, **plan_kwargs)
        # dp: as if each rank ran on its own node, so its bytes cross nodes; the rest share one node
        mesh = Mesh(plan, ranks_per_node=1 if name == "dp" else None)
        engine = plait.boost(
            model,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
            loss_fn=plait.losses.causal_lm,
            mesh=mesh,
            max_grad_norm=1.0,
        )
        results[name] = count_steps(engine, model.config.vocab_size)
    return results


@pytest.fixture(scope="module")
def counted() -> list[dict[str, list[dict[str, Any]]]]:
    return run_ranks(count_every_plan, 2, timeout_s=120)


@pytest.fixture(scope="module")
def sizes() -> dict[str, int]:
    model = build()
    config = model.config
    return {
        "params": sum(p.numel() for p in model.parameters()),  # the tied head counts once
        "vocab": config.vocab_size,
        "d": config.d_model,
        "layers": config.num_layers,
    }


def theory_dp(sizes: dict[str, int]) -> float:
    """Two ranks: a ring all-reduce of B sends 2(N-1)/N x B = B. Clipping needs no collective
    (every rank holds every gradient)."""
    gradients = FP32 * sizes["params"]
    token_count = 8  # float64 token count, summed over dp before the first backward
    loss_totals = 2 * 8  # float64 (loss_sum, count)
    return gradients + token_count + loss_totals


def theory_tp(sizes: dict[str, int]) -> float:
    """Per micro-batch all-reduces (two ranks: each sends B) of one activation (micro, seq, d):
    the embedding's partial sums forward; per layer the attention and MLP entries backward and
    their row-parallel exits forward (4); the head's entry backward. The vocab-parallel loss
    all-reduces its max, then (sum of exponentials, target logit), per token. Once per step:
    clipping's squared norm (fp32)."""
    activation = FP32 * MICRO * SEQ * sizes["d"]
    per_token = FP32 * MICRO * SEQ
    per_microbatch = (1 + 4 * sizes["layers"] + 1) * activation + per_token + 2 * per_token
    return MICROBATCHES * per_microbatch + FP32


def theory_tp_sp(sizes: dict[str, int]) -> float:
    """Sequence parallel: each all-gather and reduce-scatter of a full (micro, seq, d) buffer B sends
    (N-1)/N x B = B/2. Per micro-batch: the embedding reduce-scatters forward and all-gathers
    backward (2); per layer the two entries all-gather forward, reduce-scatter backward and gather their
    input's sequence chunk again in backward for the weight gradients (the chunk, not the gathered copy,
    is kept), the two exits reduce-scatter forward and all-gather backward (10); the head gathers forward and reduce-scatters backward (2); the learned
    positions (seq, d) keep their chunk forward and all-gather backward; the loss as without sequence
    parallel. Once per step: the norms' and row biases' partial gradients are summed over tp
    (norm1, norm2 weight and bias, o_proj and down_proj bias: 6d per layer; norm_f: 2d) and clipping."""
    d, layers = sizes["d"], sizes["layers"]
    full = FP32 * MICRO * SEQ * d
    per_token = FP32 * MICRO * SEQ
    per_microbatch = (2 + 10 * layers + 2) * full / 2 + FP32 * SEQ * d / 2 + 3 * per_token
    partial_grads = FP32 * (6 * d * layers + 2 * d)
    return MICROBATCHES * per_microbatch + partial_grads + FP32


def theory_pp(sizes: dict[str, int], *, step: int) -> float:
    """Each stage sends one (micro, seq, d) tensor per micro-batch (activations forward from the first,
    gradients back from the last); the first step also sends each direction's shape header (10
    int64). Then the tied embedding's gradient (vocab, d) is all-reduced between the first and last
    stage, the loss totals over pp, and clipping's squared norm."""
    messages = MICROBATCHES * FP32 * MICRO * SEQ * sizes["d"] + (10 * 8 if step == 0 else 0)
    tied = FP32 * sizes["vocab"] * sizes["d"]
    return messages + tied + 2 * 8 + FP32


def test_data_parallel_bytes_and_inter_node_link(counted: list, sizes: dict[str, int]) -> None:
    expected = theory_dp(sizes)
    for rank_result in counted:
        for step in rank_result["dp"]:
            assert step["axis"] == {"dp": expected}
            assert step["link"] == {"inter": expected}  # one rank per node
            assert step["op"] == {"all_reduce": expected}
            assert step["volume"] == 2 * expected  # the ZeRO paper's 2P (plus the loss's scalars)


def test_tensor_parallel_bytes(counted: list, sizes: dict[str, int]) -> None:
    expected = theory_tp(sizes)
    for rank_result in counted:
        for step in rank_result["tp"]:
            assert step["axis"] == {"tp": expected}
            assert step["link"] == {"intra": expected}
            assert step["op"] == {"all_reduce": expected}


def test_sequence_parallel_bytes(counted: list, sizes: dict[str, int]) -> None:
    expected = theory_tp_sp(sizes)
    for rank_result in counted:
        for step in rank_result["tp_sp"]:
            assert step["axis"] == {"tp": expected}
            assert step["link"] == {"intra": expected}
            assert set(step["op"]) == {"all_gather", "reduce_scatter", "all_reduce"}


def test_pipeline_bytes_with_p2p_tied_embeddings_and_clipping(counted: list, sizes: dict[str, int]) -> None:
    for rank_result in counted:
        for index, step in enumerate(rank_result["pp"]):
            expected = theory_pp(sizes, step=index)
            assert step["axis"] == {"pp": expected}
            assert step["link"] == {"intra": expected}
            messages = MICROBATCHES * FP32 * MICRO * SEQ * sizes["d"] + (80 if index == 0 else 0)
            assert step["op"] == {"send": messages, "all_reduce": expected - messages}
