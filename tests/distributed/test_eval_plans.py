"""plait eval under dp=2, tp=2, pp=2 and pp=2 x dp=2 gives one process's numbers: perplexities within
1e-5 relative, accuracies and exact matches equal (dp shares the requests, tp gathers vocab-parallel
logits, pp broadcasts the last stage's); greedy generation through the KV cache under tp=2, and whole
rows under pp=2 and pp=2 x tp=2 (rows stopping at different steps), gives one process's tokens."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import plait
from plait.eval.cli import eval_plan
from plait.eval.runner import EvalRequest, _scorer, run_eval
from plait.eval.scorer import DataRanks, Scorer
from plait.losses import causal_lm
from tests.distributed.harness import run_ranks
from tests.unit.test_eval_inputs import save_eval_checkpoint, write_eval_corpus

LIMIT = 12
PERPLEXITIES = ("word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity")


def _request(root: Path, plan: str | None, out: str) -> EvalRequest:
    checkpoint = str(root / "run" / "checkpoints" / "step-000010")
    return EvalRequest(paths=[checkpoint], plan=eval_plan(plan), out_dir=str(root / out), limit=LIMIT, batch_size=4)


def _rank(rank: int, world_size: int, root: Path, plan: str) -> dict[str, Any]:
    return run_eval(_request(root, plan, f"out-{plan}"))["checkpoints"][0]["results"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-plans")
    write_eval_corpus(root / "corpus")
    save_eval_checkpoint(root / "run" / "checkpoints" / "step-000010", root, step=10, seed=0)
    return root


@pytest.fixture(scope="module")
def reference(root: Path) -> dict[str, Any]:
    return run_eval(_request(root, None, "out-one"))["checkpoints"][0]["results"]


@pytest.mark.parametrize(
    ("plan", "world"), [("dp=2", 2), ("tp=2", 2), ("pp=2", 2), ("pp=2 dp=2", 4), ("dp=2 zero=3", 2)]
)
def test_plan_matches_one_process(plan: str, world: int, root: Path, reference: dict[str, Any]) -> None:
    results = run_ranks(_rank, world, root, plan, timeout_s=180)
    assert all(result == results[0] for result in results)  # every rank returns the gathered results
    assert set(results[0]) == set(reference)
    for task, metrics in reference.items():
        for metric, expected in metrics.items():
            got = results[0][task][metric]
            if metric.removesuffix("_stderr") in PERPLEXITIES:  # a perplexity's bootstrapped stderr too
                assert math.isclose(got, expected, rel_tol=1e-5), (plan, task, metric, got, expected)
            else:
                assert got == expected, (plan, task, metric, got, expected)
    assert (root / f"out-{plan}" / "results.json").is_file()


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [3]]


def _scaled_tiny() -> torch.nn.Module:
    """tiny, far from init (each next token depends on its position and past, not a repeat of the last)."""
    torch.manual_seed(0)
    model = plait.models.build("tiny")
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(8)
    return model


def _greedy_rank(rank: int, world_size: int) -> list[list[int]]:
    engine = plait.boost(
        _scaled_tiny(), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0), loss_fn=causal_lm, plan=eval_plan("tp=2")
    )
    ranks = DataRanks(rank=engine.dp_rank, size=engine.dp_size, group=engine.mesh.group("data"))
    scorer = Scorer(engine.model, max_length=24, batch_size=3, ranks=ranks)  # the KV cache, vocab-parallel logits
    return scorer.greedy(PROMPTS, max_new_tokens=10, stop=lambda ids: False)


def test_cached_greedy_generation_under_tp_is_one_process_whole_rows() -> None:
    expected = Scorer(_scaled_tiny(), max_length=24, batch_size=3, kv_cache=False).greedy(
        PROMPTS, max_new_tokens=10, stop=lambda ids: False
    )
    assert run_ranks(_greedy_rank, 2, timeout_s=120) == [expected, expected]


def _stop_at_multiple_of_7(ids: list[int]) -> bool:
    return ids[-1] % 7 == 0  # rows end at different steps: every pp rank must still run the same forwards


def _pipeline_greedy_rank(rank: int, world_size: int, plan: str) -> list[list[int]]:
    request = EvalRequest(paths=["unused"], plan=eval_plan(plan), batch_size=3)
    scorer = _scorer(_scaled_tiny(), max_length=24, request=request)  # what plait eval scores with
    return scorer.greedy(PROMPTS, max_new_tokens=10, stop=_stop_at_multiple_of_7)


@pytest.mark.parametrize(("plan", "world"), [("pp=2", 2), ("pp=2 tp=2", 4)])
def test_greedy_generation_under_pp_is_one_process(plan: str, world: int) -> None:
    expected = Scorer(_scaled_tiny(), max_length=24, batch_size=3, kv_cache=False).greedy(
        PROMPTS, max_new_tokens=10, stop=_stop_at_multiple_of_7
    )
    assert {len(new) for new in expected} != {10}  # some rows stop early
    assert run_ranks(_pipeline_greedy_rank, world, plan, timeout_s=120) == [expected] * world


PAIRS = [([5, 6, 7], [8, 9]), ([11, 12, 13, 14, 15, 16, 17], [3]), ([13], [14, 15, 16]), ([3, 4], [5]), ([9, 8], [7])]


def _moe(preset: str) -> torch.nn.Module:
    """An MoE preset far from init (a sharp router: few routing decisions near a tie)."""
    torch.manual_seed(0)
    model = plait.models.build(preset, max_seq_len=24)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4)
    return model


def _moe_rank(rank: int, world_size: int, preset: str, plan: str) -> tuple[Any, Any]:
    request = EvalRequest(paths=["unused"], plan=eval_plan(plan), batch_size=2)
    scorer = _scorer(_moe(preset), max_length=24, request=request)  # what plait eval scores with
    return scorer.score(PAIRS), scorer.greedy(PROMPTS, max_new_tokens=8, stop=_stop_at_multiple_of_7)


@pytest.mark.parametrize(
    ("preset", "plan"), [("mixtral-tiny", "ep=2"), ("switch-tiny", "ep=2"), ("switch-tiny", "dp=2 zero=3")]
)
def test_moe_scores_and_greedy_under_ep_and_zero3_are_one_process(preset: str, plan: str) -> None:
    """Every rank scores every request (unequal dp shares would leave ep's all-to-all or ZeRO-3's
    all-gather unmatched), so each gets one process's log-likelihoods and tokens."""
    one = Scorer(_moe(preset), max_length=24, batch_size=2, kv_cache=False)  # whole rows: no cache to trust
    scores = one.score(PAIRS)
    expected = one.greedy(PROMPTS, max_new_tokens=8, stop=_stop_at_multiple_of_7)
    assert {len(new) for new in expected} != {8}  # some rows stop early
    for got_scores, got_tokens in run_ranks(_moe_rank, 2, preset, plan, timeout_s=120):
        assert got_tokens == expected
        for (got, got_greedy), (want, want_greedy) in zip(got_scores, scores, strict=True):
            assert math.isclose(got, want, rel_tol=1e-5) and got_greedy == want_greedy, (got, want)
