"""Llama 3's pipeline layout: the first chunk holds only the embedding and the last only the final norm and
head (an explicit plan.pp_split starting at layer 0 and ending at the last layer), against one process."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import assert_parity
from tests.distributed.test_pipeline_parity import reference, train_pp

pytestmark = pytest.mark.timeout(150)


@pytest.mark.parametrize(
    "plan",
    [
        {"pp_schedule": "interleaved", "pp_chunks": 3, "pp_split": [0, 2, 4, 6, 8]},  # 6 chunks, 8 layers
        {"pp_schedule": "1f1b", "pp_split": [0]},  # rank 0 embeds, rank 1 runs every layer and the head
    ],
    ids=["interleaved-x3", "1f1b"],
)
def test_embedding_only_and_head_only_chunks_match_one_process(plan: dict) -> None:
    assert_parity(run_ranks(train_pp, 2, {"dp": 1, "pp": 2, **plan}, timeout_s=120), reference())
