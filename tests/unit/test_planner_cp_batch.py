"""Context parallel with a micro-batch smaller than cp (long-context runs train one sequence per micro-batch):
the dp x cp fold must charge each rank its b x seq / cp tokens, not a micro-batch rounded down to none."""

from __future__ import annotations

import pytest

from plait.config import Plan
from plait.models.gpt_config import GPTConfig
from plait.planner import Cluster, Estimator, ModelShape, Workload

CONFIG = GPTConfig(vocab_size=512, max_seq_len=4096, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2)
PER_TOKEN = ("compute", "tp_comm", "bubble", "pp_comm")


def estimate(global_batch: int, plan: Plan) -> Estimator:
    cluster = Cluster.preset("a100-80gb", nodes=1)
    estimator = Estimator(ModelShape(CONFIG, name="tiny"), Workload(global_batch, 4096), cluster=cluster)
    return estimator.estimate(plan.resolve(8))


@pytest.mark.parametrize("pp", [1, 2])
def test_one_sequence_per_micro_batch_under_cp_4_costs_a_quarter_of_four(pp: int) -> None:
    plan = Plan(dp=1, tp=2 // pp, pp=pp, cp=4, zero=1, microbatches=2)
    one, four = estimate(2, plan), estimate(8, plan)  # b = 1 and b = 4 sequences per micro-batch
    assert one.time.compute > 0
    for name in PER_TOKEN:
        assert getattr(one.time, name) == pytest.approx(getattr(four.time, name) / 4), name
    assert one.time.dp_comm == pytest.approx(four.time.dp_comm)  # the gradients do not depend on tokens
    cluster = Cluster.preset("a100-80gb", nodes=1)
    link = cluster.link(4, stride=plan.tp)
    hop = 2 * (4096 // 4) * CONFIG.resolved_num_kv_heads * CONFIG.head_dim * 4 / plan.tp / link.bandwidth
    hops = 3 * (4 - 1)  # recompute none: k/v forward and again in backward, the accumulator's cp - 1 hops
    layers = CONFIG.num_layers // pp
    assert one.time.cp_comm == pytest.approx(2 * layers * hops * (hop + link.latency))
