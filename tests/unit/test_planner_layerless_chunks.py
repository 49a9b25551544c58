"""The planner on Llama 3's pipeline layout: an explicit pp_split whose first chunk holds only the embedding and
whose last only the final norm and head, accepted by the estimator and `plait plan --plan` alike (same figures),
each layer-less chunk costed by what it holds; a split the runtime refuses is refused here too."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.planner import Cluster, Estimator, Workload, load_shape
from plait.planner.evaluate import checked_plan
from plait.planner.layout import stage_layout
from plait.planner.plan_string import parse_plan

# llama-7b: 32 layers; pp=2 x 5 chunks = 10 virtual stages, 8 with four layers, the two ends with none
SPLIT = ",".join(str(4 * i) for i in range(9))
PLAN = f"dp=4 tp=2 pp=2 zero=1 microbatches=8 recompute=none pp_schedule=interleaved pp_chunks=5 pp_split={SPLIT}"


def with_split(split: str) -> str:
    return PLAN.replace(f"pp_split={SPLIT}", f"pp_split={split}")


def estimate(plan_text: str) -> dict:
    shape, workload = load_shape("llama-7b"), Workload(64, 2048)
    estimator = Estimator(shape, workload, cluster=Cluster.preset("h100", nodes=2))
    plan = checked_plan(parse_plan(plan_text + " precision=bf16"), world=16, workload=workload)
    return json.loads(json.dumps(estimator.estimate(plan).as_dict()))


def test_layerless_end_chunks_hold_no_layer() -> None:
    layout = stage_layout(load_shape("llama-7b"), parse_plan(PLAN))
    assert layout.chunk_layers == (0, 4, 4, 4, 4, 4, 4, 4, 4, 0) and layout.layers_per_rank == (16, 16)
    assert layout.layer_indices(0) == [*range(4, 8), *range(12, 16), *range(20, 24), *range(28, 32)]


def test_estimator_and_plan_command_agree(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    code = main(["plan", "--model", "llama-7b", "--nodes", "2", "--gpu", "h100", "--global-batch", "64", "--seq",
                 "2048", "--plan", PLAN, "--json", str(path)])  # fmt: skip
    assert "does not fit" not in capsys.readouterr().out and code == 0
    assert json.loads(path.read_text()) == estimate(PLAN)


def test_layerless_chunks_cost_what_they_hold() -> None:
    """The embedding-only and head-only chunks add no layer's work: 16 layers a rank, as plain 1F1B with the
    layers split 16/16 (the head on the last rank either way); 20 layers on a rank cost more."""
    layerless = estimate(PLAN)["time"]["compute"]
    plain = PLAN.split(" pp_schedule=")[0] + " pp_schedule=1f1b pp_split=16"
    assert layerless == pytest.approx(estimate(plain)["time"]["compute"], rel=1e-9)
    heavier = estimate(with_split("0,3,8,11,16,19,24,27,32"))["time"]["compute"]  # ranks 20 and 12 layers
    assert heavier == pytest.approx(layerless * 20 / 16, rel=0.05)


@pytest.mark.parametrize(
    ("split", "message"),
    [("0,0,8,12,16,20,24,28,32", "stage 1 empty"), ("0,4,8,12,16,20,24,28,33", "stage 9 empty"), ("4,8", "gives 3")],
)
def test_a_split_the_runtime_refuses_is_refused(split: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        estimate(with_split(split))


def test_without_a_split_more_stages_than_layers_is_refused() -> None:
    plan = dataclasses.replace(parse_plan(PLAN), pp_split=[], pp_chunks=17)
    with pytest.raises(ValueError, match="non-empty stages"):
        stage_layout(load_shape("llama-7b"), plan)
