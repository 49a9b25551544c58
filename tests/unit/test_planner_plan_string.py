"""The plan string (Plan's own field names), `plait plan --plan` and `--profile`, and that the evaluator and
the search give one plan the same figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.config import Plan
from plait.planner import Cluster, Estimator, SearchSpace, Workload, load_shape, search
from plait.planner.plan_string import REQUIRED, parse_plan, plan_string

EXAMPLE = "dp=64 tp=8 pp=16 zero=1 pp_schedule=interleaved pp_chunks=4 recompute=none microbatches=64"


def test_the_issues_example_parses_into_plans_fields() -> None:
    plan = parse_plan(EXAMPLE)
    assert (plan.dp, plan.tp, plan.pp, plan.zero) == (64, 8, 16, 1)
    assert (plan.pp_schedule, plan.pp_chunks, plan.recompute, plan.microbatches) == ("interleaved", 4, "none", 64)
    assert plan.precision == Plan().precision  # what the string leaves out keeps Plan's default


@pytest.mark.parametrize(
    "plan",
    [
        Plan(dp=2, tp=2, pp=2, zero=1, microbatches=8, pp_schedule="interleaved", pp_chunks=2),
        Plan(
            dp=-1,
            tp=8,
            pp=4,
            zero=3,
            precision="bf16",
            sequence_parallel=True,
            recompute="selective",
            recompute_ratio=0.5,
            pp_split=[7, 15, 23],
            zero3_gather="microbatch",
        ),
        Plan(dp=4, zero=2, recompute="selective", recompute_modules=["attention"], offload_optimizer="cpu"),
        Plan(dp=4, cp=2, zero=1, zero_shard=2, bucket_mb=12.5),
    ],
)
def test_plan_string_round_trips(plan: Plan) -> None:
    text = plan_string(plan)
    assert parse_plan(text) == plan
    assert text.split()[: len(REQUIRED)] == [f"{key}={getattr(plan, key)}" for key in REQUIRED]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dp=2 tp=1 pp=1 zero=1 microbatches=2 recompute=none mb=2", "unknown key(s): mb"),
        ("dp=2 tp=1 zero=1 recompute=none", "missing key(s): pp, microbatches"),
        ("dp=2 dp=4 tp=1 pp=1 zero=1 microbatches=2 recompute=none", "repeated key(s): dp"),
        ("dp=2 tp 1 pp=1 zero=1 microbatches=2 recompute=none", "not KEY=VALUE: tp 1"),
        ("dp=two tp=1 pp=1 zero=1 microbatches=2 recompute=none", "dp=two: expected an integer"),
        ("dp=2 tp=1 pp=1 zero=1 microbatches=2 recompute=none sequence_parallel=yes", "write true or false"),
        ("dp=2 tp=1 pp=4 zero=1 microbatches=2 recompute=none pp_split=7,x", "comma-separated list"),
        ("dp=2 tp=1 pp=1 zero=5 microbatches=2 recompute=none", "ZeRO stages are 0, 1, 2 or 3"),
    ],
)
def test_bad_plan_strings_are_refused_in_one_line(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_plan(text)
    message = str(info.value)
    assert expected in message and "\n" not in message, message
    if "key" in expected:  # the refusal names the valid keys
        assert (
            "valid keys: dp tp pp cp ep zero" in message and "required: dp tp pp zero microbatches recompute" in message
        )


def plan_cli(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str, str]:
    code = main(["plan", "--model", "llama-7b", "--nodes", "1", "--gpu", "h100", "--global-batch", "32",
                 "--seq", "2048", *flags])  # fmt: skip
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plait_plan_evaluates_exactly_the_given_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan_cli(capsys, "--plan", "dp=2 tp=2 pp=2 zero=1 microbatches=8 recompute=selective "
                            "pp_schedule=interleaved pp_chunks=2")  # fmt: skip
    assert code == 0, out
    assert "plan string: dp=2 tp=2 pp=2 zero=1 microbatches=8 recompute=selective precision=bf16" in out
    assert "plan: dp2 tp2 pp2 z1 bf16 m8 interleavedx2 rc-selective (fits)" in out
    assert "memory per rank: device" in out and "step: " in out
    assert "\nfits: the busiest rank (stage " in out and "GiB spare" in out


def test_a_plan_that_does_not_fit_says_by_how_much(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan_cli(capsys, "--plan", "dp=8 tp=1 pp=1 zero=0 microbatches=1 recompute=none")
    assert code == 1
    assert "(does NOT fit)" in out and "does not fit: the busiest rank" in out and "GiB over 80.0 GiB" in out


def test_plait_plan_refuses_a_bad_plan_string_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = plan_cli(capsys, "--plan", "dp=8 tp=1 pp=1 zero=0 microbatch=1 recompute=none")
    assert code == 2
    assert err.strip().startswith("plait plan: error: plan string") and len(err.strip().splitlines()) == 1
    assert "unknown key(s): microbatch; missing key(s): microbatches" in err


def test_plait_train_refuses_a_bad_plan_string_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "configs/gpt-tiny.toml", "--plan", "dp=1 tp=1 pp=1 zero=1 recompute=none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "missing key(s): microbatches" in err


def test_profile_megatron_selects_megatrons_accounting(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plan = "dp=8 tp=1 pp=1 zero=3 microbatches=4 recompute=none"
    results = {}
    for profile in ("plait", "megatron"):
        path = tmp_path / f"{profile}.json"
        plan_cli(capsys, "--plan", plan, "--profile", profile, "--json", str(path))
        results[profile] = json.loads(path.read_text())
    shape, workload = load_shape("llama-7b"), Workload(32, 2048)
    cluster = Cluster.preset("h100", nodes=1)
    for profile, result in results.items():
        expected = Estimator(shape, workload, cluster=cluster, profile=profile).estimate(
            parse_plan(plan + " precision=bf16")
        )
        assert result["memory"]["activations"] == expected.memory.activations
    assert results["megatron"]["memory"]["activations"] > results["plait"]["memory"]["activations"]


def test_evaluator_and_search_give_the_same_figures(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Each plan the search ranks, given back as a plan string, is estimated to the same bytes and seconds."""
    shape, workload = load_shape("llama-7b"), Workload(32, 2048)
    cluster = Cluster.preset("h100", nodes=1)
    space = SearchSpace(zero=(1, 3), recompute=("none", "selective"), microbatches=(4,), tp=(1, 2), pp=(1, 2, 4))
    result = search(shape, workload, cluster=cluster, space=space, profile="megatron")
    assert len(result.estimates) >= 8
    for found in result.estimates[:: max(1, len(result.estimates) // 8)]:
        path = tmp_path / "one.json"
        plan_cli(capsys, "--plan", plan_string(found.plan), "--profile", "megatron", "--json", str(path))
        evaluated = json.loads(path.read_text())
        assert evaluated == json.loads(json.dumps(found.as_dict())), plan_string(found.plan)
