"""Hugging Face causal LMs under context parallel (ring attention through transformers' AttentionInterface)
against one plain process running the model's own forward on whole rows: 10 steps, losses within 1e-5
relative, final weights allclose(1e-5, 1e-6)."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_ranks
from tests.distributed.test_hf_families import reference, train_family
from tests.distributed.test_parity import assert_parity

CP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox", "falcon")


@pytest.mark.parametrize("family", CP_FAMILIES)
def test_hf_family_under_cp2_matches_one_process(family: str) -> None:
    results = run_ranks(train_family, 2, family, {"dp": 1, "cp": 2}, timeout_s=100)
    assert_parity(results, reference(family))


def test_hf_llama_under_dp2_cp2_zero3_matches_one_process() -> None:
    results = run_ranks(train_family, 4, "llama", {"dp": 2, "cp": 2, "zero": 3}, timeout_s=100)
    assert_parity(results, reference("llama"))
