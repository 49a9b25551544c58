"""`plait finetune` honours [train]'s operations as `plait train` does (plait.train.operations): SIGTERM
finishes the step, saves it and exits with 128 + 15; train.checkpoint_every_s saves by time. In-process sft
runs through `plait.cli.main` on the tiny base of test_recipes_cli_e2e."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from plait.recipes.loop import FinetuneRun
from tests.unit.test_recipes_cli_e2e import finetune, root  # noqa: F401  (root: the module's tiny base)


class Unhandled(Exception):
    """SIGTERM reached the test's own handler: the run did not install plait's."""


def _unhandled(signum: int, frame: object) -> None:
    raise Unhandled(signal.Signals(signum).name)


@pytest.fixture
def sigterm_guard() -> Iterator[None]:
    """A SIGTERM the run does not take raises here instead of ending pytest."""
    previous = signal.signal(signal.SIGTERM, _unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


def steps_saved(out: Path) -> list[str]:
    return sorted(path.name for path in (out / "checkpoints").glob("step-*"))


@pytest.mark.timeout(120)
def test_sigterm_saves_the_step_and_exits_as_plait_train_does(
    root: Path,  # noqa: F811
    sigterm_guard: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    step_of = FinetuneRun.train_one_step

    def step_then_term(run: FinetuneRun) -> dict:
        values = step_of(run)
        if run.step == 1:  # the second step: SIGTERM arrives while it trains
            os.kill(os.getpid(), signal.SIGTERM)
        return values

    monkeypatch.setattr(FinetuneRun, "train_one_step", step_then_term)
    code, out = finetune(root, "sft", "train.steps=5", "train.checkpoint_every=1000", name="sigterm")
    assert code == 128 + signal.SIGTERM
    assert steps_saved(out) == ["step-000002"]
    log = (out / "finetune.log").read_text()
    assert "stopped by SIGTERM after step 2; saved" in log, log[-2000:]
    assert "--resume" not in log  # `plait finetune` has none to offer
    assert signal.getsignal(signal.SIGTERM) is _unhandled  # the run gave the handler back


@pytest.mark.timeout(120)
def test_checkpoint_every_s_saves_by_time(root: Path) -> None:  # noqa: F811
    sets = ["train.steps=3", "train.checkpoint_every=1000", "train.keep_checkpoints=5"]
    code, out = finetune(root, "sft", *sets, "train.checkpoint_every_s=0.001", name="by-time")
    assert code == 0
    assert steps_saved(out) == ["step-000001", "step-000002", "step-000003"]
