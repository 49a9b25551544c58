"""The evaluator (`plait plan --plan`) and the search agree on the same plan's figures across two nodes:
interleaved (2..16 chunks) and zero-bubble schedules, ZeRO-3 with pp, sequence parallel, under the plait profile
(test_planner_plan_string checks Megatron's on one node without interleaving)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.planner import Cluster, SearchSpace, Workload, load_shape, search
from plait.planner.plan_string import plan_string


def evaluate(capsys: pytest.CaptureFixture[str], plan: str, path: Path) -> dict:
    code = main(["plan", "--model", "llama-7b", "--nodes", "2", "--gpu", "h100", "--global-batch", "64",
                 "--seq", "2048", "--plan", plan, "--json", str(path)])  # fmt: skip
    capsys.readouterr()
    assert code == 0, plan
    return json.loads(path.read_text())


def test_search_and_evaluator_agree_on_two_nodes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    shape, workload, cluster = load_shape("llama-7b"), Workload(64, 2048), Cluster.preset("h100", nodes=2)
    space = SearchSpace(
        zero=(1, 3), recompute=("selective",), microbatches=(8,), schedules=("interleaved", "zb-h1"), tp=(2,),
        pp=(2, 4),
    )  # fmt: skip
    found = search(shape, workload, cluster=cluster, space=space).estimates
    plans = [plan_string(estimate.plan) for estimate in found]
    assert any("pp_chunks=" in p for p in plans) and any("sequence_parallel=true" in p for p in plans), plans
    assert any("zero=3" in p and "pp=" in p for p in plans), plans
    for estimate in found[:: max(1, len(found) // 8)]:
        evaluated = evaluate(capsys, plan_string(estimate.plan), tmp_path / "one.json")
        assert evaluated == json.loads(json.dumps(estimate.as_dict())), plan_string(estimate.plan)
