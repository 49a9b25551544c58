"""`plait train` with BERT's, ALBERT's and T5's tasks end to end: 20 steps on two ranks, a checkpoint at
step 10 resumed under another plan continues with the same losses (the task's random choices come from
(seed, position) through the real loader), and what cannot split a family is refused before launch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.train.loop import run_training
from plait.train.setup import validate
from tests.distributed.harness import run_ranks
from tests.distributed.test_train_loop import tiny_config

pytestmark = pytest.mark.timeout(300)

FAMILIES = {
    "bert-tiny": "masked_lm",
    "albert-tiny": "masked_lm_sop",
    "t5-tiny": "span_corruption",
}
# (first plan, plan that resumes at step 10): every family's second plan splits it another way
PLANS = {
    "bert-tiny": ({"tp": 2}, {"pp": 2}),
    "albert-tiny": ({"zero": 3}, {"tp": 2}),
}  # T5 (dp and ZeRO only) is checked against one process in test_language_parity


def language_config(corpus: list[str], tmp: Path, preset: str, *, out: str, zero: int = 0, tp: int = 1, pp: int = 1):
    extra = (f"model.preset={preset}", f"task.kind={FAMILIES[preset]}", "plan.sequence_parallel=false")
    return tiny_config(corpus, tmp, out=out, zero=zero, tp=tp, pp=pp, extra=extra)


def _train(rank: int, world: int, corpus: list[str], tmp: str, preset: str, plan: dict, out: str, resume: str | None):
    return run_training(language_config(corpus, Path(tmp), preset, out=out, **plan), resume=resume).losses


@pytest.mark.parametrize("preset", list(PLANS))
def test_resume_under_another_plan_continues_the_run(small_corpus: list[str], tmp_path: Path, preset: str) -> None:
    first, second = PLANS[preset]
    whole = run_ranks(_train, 2, small_corpus, str(tmp_path), preset, first, "a", None, timeout_s=200)[0]
    checkpoint = str(tmp_path / "a" / "checkpoints" / "step-000010")
    resumed = run_ranks(_train, 2, small_corpus, str(tmp_path), preset, second, "b", checkpoint, timeout_s=200)[0]
    assert len(whole) == 20 and len(resumed) == 10 and whole[-1] < whole[0]
    expected = torch.tensor(whole[10:], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(resumed, dtype=torch.float64), expected, rtol=1e-5, atol=0)


REFUSALS = {
    "task of another family": ("bert-tiny", ["task.kind=span_corruption"], "trains with task.kind='masked_lm'"),
    "task without its preset": ("tiny", ["task.kind=masked_lm"], "trains one of plait's presets albert-100m"),
    "t5 under pp": (
        "t5-tiny",
        ["plan.pp=2", "plan.dp=1", "plan.microbatches=2"],
        "pipeline parallelism is not available for T5",
    ),
    "t5 under tp": ("t5-tiny", ["plan.tp=2", "plan.dp=1"], "tensor parallelism is not available for T5"),
    "albert under pp": (
        "albert-tiny",
        ["plan.pp=2", "plan.dp=1", "plan.microbatches=2"],
        "ALBERT calls one shared group of layers",
    ),
    "bert under tp=3": ("bert-tiny", ["plan.tp=3", "plan.dp=1"], "tp=3 does not divide"),
    "sample too short": ("albert-tiny", ["data.seq_len=4"], "use seq_len >= 5"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_before_launch(small_corpus: list[str], tmp_path: Path, case: str) -> None:
    preset, overrides, message = REFUSALS[case]
    kind = [f"task.kind={FAMILIES[preset]}"] if preset in FAMILIES else []
    config = tiny_config(small_corpus, tmp_path, out="x", extra=(f"model.preset={preset}", *kind, *overrides))
    world = 3 if "plan.tp=3" in overrides else 2
    with pytest.raises(ValueError, match=message):
        validate(config, world_size=world)
