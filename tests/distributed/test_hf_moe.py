"""Hugging Face Mixture-of-Experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) under data parallel, against
one plain process running the model's own forward: 10 steps, losses within 1e-5 relative, final weights
allclose(1e-5, 1e-6).

The parity is exact in kind, not luck: these blocks are dropless (no capacity), so each token's experts
and weights depend on that token alone, whichever rank or batch routes it; with
``output_router_logits=False`` (the config default) the HF model computes no load-balancing loss, and
with it set the loss would only reach ``outputs.aux_loss``, which ``plait.losses.causal_lm`` never reads.
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_ranks
from tests.distributed.test_hf_families import reference, train_family
from tests.distributed.test_parity import assert_parity
from tests.hf_models import MOE_FAMILIES

PLANS = {
    "dp2-zero0": {"dp": 2, "zero": 0},
    "dp2-zero3": {"dp": 2, "zero": 3},
    "dp2-zero2-recompute": {"dp": 2, "zero": 2, "recompute": "full"},
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_family_under_dp_matches_one_process(family: str, plan: str) -> None:
    results = run_ranks(train_family, 2, family, PLANS[plan], timeout_s=100)
    assert_parity(results, reference(family))
