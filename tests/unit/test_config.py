"""Plan and config validation, TOML loading and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from plait.config import Config, Plan, apply_overrides, load_config


def test_plan_infers_dp_from_the_world_size() -> None:
    assert Plan(dp=-1).resolve(4).dp == 4
    assert Plan(dp=-1, tp=2).resolve(8).dp == 4


@pytest.mark.parametrize(
    ("plan", "world", "message"),
    [
        (Plan(dp=2), 4, "launch 2 ranks"),
        (Plan(dp=-1, tp=3), 4, r"not divisible by tp\*pp\*cp=3"),
    ],
)
def test_plan_rejects_degrees_that_do_not_fill_the_world(plan: Plan, world: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan.resolve(world)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dp": 0}, "positive degree"),
        ({"tp": 0}, "degrees are positive"),
        ({"zero": 4}, "0, 1, 2 or 3"),
        ({"precision": "fp8"}, "fp32, bf16, fp16"),
        ({"microbatches": 0}, "1 or more"),
        ({"recompute": "some"}, "none, full, selective"),
        ({"recompute_ratio": 0.0}, "lies in"),
        ({"reduce_op": "ring"}, "auto, reduce_scatter, all_reduce"),
    ],
)
def test_plan_validates_itself(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Plan(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ep": 2, "offload_optimizer": "cpu", "zero": 1}, "plan.ep=2 with offloaded states is not available yet"),
        ({"dp": 4, "ep": 3}, "plan.ep=3 does not divide plan.dp=4"),
        ({"cp": 2, "ep": 2}, "plan.cp=2 with plan.ep is not available yet"),
        ({"cp": 2, "zero": 1, "offload_optimizer": "cpu"}, "plan.cp=2 with offloaded states is not available yet"),
    ],
)
def test_axes_not_built_are_rejected_not_ignored(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Plan(**kwargs).check_available()


def test_expert_parallel_is_carved_from_dp() -> None:
    assert Plan(dp=-1, ep=2).resolve(4).dp == 4
    with pytest.raises(ValueError, match=r"plan\.ep=4 does not divide dp=2"):
        Plan(dp=-1, ep=4).resolve(2)


def test_batching_checks() -> None:
    config = load_config(None, ["train.global_batch=12", "plan.microbatches=4"])
    with pytest.raises(ValueError, match="multiple of 8"):
        config.check_batching(2)
    with pytest.raises(ValueError, match="multiple of 5"):
        config.check_batching(5)
    load_config(None, ["train.global_batch=16", "plan.microbatches=4"]).check_batching(2)


def test_toml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[model]\npreset = "tiny"\nd_model = 32\n[plan]\ndp = 2\n[train]\nlr = 1e-3\n')
    config = load_config(path, ["train.lr=2e-3", "plan.microbatches=2", "data.corpus=['a.txt']", "model.num_layers=3"])
    assert isinstance(config, Config)
    assert config.train.lr == 2e-3 and config.plan.microbatches == 2 and config.plan.dp == 2
    assert config.data.corpus == ["a.txt"]
    assert config.model.overrides == {"d_model": 32, "num_layers": 3}


def test_int_given_for_a_float_field_is_accepted() -> None:
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown key train.lrr.*did you mean 'lr'"),
        (["trian.lr=1"], "unknown section 'trian'.*did you mean 'train'"),
        (["plan.dp"], "section.key=value"),
        (["plan.dp=two"], "plan.dp takes an integer"),
        (["train.lr=-1"], "must be positive"),
    ],
)
def test_bad_overrides(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_overrides_do_not_mutate_their_input() -> None:
    raw = {"plan": {"dp": 2}}
    apply_overrides(raw, ["plan.dp=4"])
    assert raw == {"plan": {"dp": 2}}


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[plan\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)
