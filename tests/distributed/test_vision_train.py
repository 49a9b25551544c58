"""`plait train` with task.kind = "image_classification": the run end to end on 2 ranks, and its checks."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from plait.config import load_config
from plait.train.image_tasks import run_image_classification
from plait.train.setup import validate
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.timeout(120)


def vision_config(out_dir: Path, *extra: str):
    return load_config(
        None,
        [
            "task.kind=image_classification",
            "model.preset=vit-tiny",
            "task.image_size=16",
            "train.steps=6",
            "train.global_batch=16",
            "train.warmup=2",
            "train.log_every=3",
            "train.eval_every=3",
            "train.checkpoint_every=3",
            "train.threads=1",
            f"train.out_dir='{out_dir}'",
            *extra,
        ],
    )


def train_ranks(rank: int, world_size: int, out_dir: str, extra: tuple[str, ...]):
    summary = run_image_classification(vision_config(Path(out_dir), *extra))
    return summary.losses, summary.accuracies


@pytest.mark.parametrize("plan", [("plan.dp=2", "plan.zero=3"), ("plan.dp=1", "plan.pp=2", "plan.microbatches=2")])
def test_vision_run_on_two_ranks_logs_accuracy_and_saves(tmp_path: Path, plan: tuple[str, ...]) -> None:
    results = run_ranks(train_ranks, 2, str(tmp_path), plan, timeout_s=100)
    (losses, accuracies), (other_losses, other_accuracies) = results
    assert losses == other_losses and accuracies == other_accuracies  # one global loss and accuracy on every rank
    assert len(losses) == 6 and len(accuracies) == 3  # step 0, 3 and 6
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [row["step"] for row in rows] == [str(s) for s in range(7)]
    assert float(rows[3]["val_acc"]) == pytest.approx(accuracies[1], abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert "top-1" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize(
    ("overrides", "world", "match"),
    [
        (("model.preset=tiny",), 1, "needs a vision preset, got model.preset='tiny'"),
        (("model.preset=swin-tiny", "plan.tp=2"), 2, "tensor parallelism is not available for Swin"),
        (("model.preset=swin-tiny", "plan.pp=2", "plan.microbatches=2"), 2, "pipeline parallelism is not available"),
        (("model.preset=vit-tiny", "plan.tp=4"), 4, "tp=4 does not divide"),
        (("model.preset=vit-tiny", "model.hidden_sizes=3"), 1, "hidden_sizes is not a field of ViTConfig"),
        (("model.preset=vit-tiny", "plan.pp=8", "plan.microbatches=8"), 8, "8 stages but the model has 4 layers"),
    ],
)
def test_bad_vision_runs_are_refused_before_launch(tmp_path: Path, overrides, world: int, match: str) -> None:
    config = vision_config(tmp_path, *overrides)
    with pytest.raises(ValueError, match=match):
        validate(config, world_size=world)


def test_task_section_is_checked() -> None:
    with pytest.raises(ValueError, match=r"task.kind='images': choose one of causal_lm, .*image_classification"):
        load_config(None, ["task.kind=images"])
    with pytest.raises(ValueError, match=r"drop model.pretrained"):
        load_config(None, ["task.kind=image_classification", "model.pretrained=somewhere"])
