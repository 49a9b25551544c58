"""A checkpoint saved under context parallel continues under cp and without it, matching the uninterrupted run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from plait.checkpoint.io import load_checkpoint
from plait.train.loop import run_training
from tests.distributed.harness import run_ranks
from tests.distributed.test_train_loop import tiny_config


@dataclass(frozen=True)
class Layout:
    world: int
    cp: int = 1
    zero: int = 0

    def config(self, corpus: list[str], tmp: Path, *, out: str):
        extra = (f"plan.cp={self.cp}", f"plan.dp={self.world // self.cp}", "model.preset=tiny-llama")
        return tiny_config(corpus, tmp, out=out, zero=self.zero, world=self.world, extra=extra)


def _train(rank: int, world: int, layout: Layout, corpus: list[str], tmp: str, out: str, resume: str | None):
    return run_training(layout.config(corpus, Path(tmp), out=out), resume=resume).losses


CASES = {
    "cp2->cp2": (Layout(world=2, cp=2, zero=1), Layout(world=2, cp=2, zero=1)),
    "cp2-zero3->cp1": (Layout(world=2, cp=2, zero=3), Layout(world=1)),
    "dp2xcp2->dp2": (Layout(world=4, cp=2, zero=2), Layout(world=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_checkpoint_resumes(small_corpus: list[str], tmp_path: Path, case: str) -> None:
    before, after = CASES[case]
    whole = run_ranks(_train, before.world, before, small_corpus, str(tmp_path), "a", None, timeout_s=120)[0]
    checkpoint = str(tmp_path / "a" / "checkpoints" / "step-000010")
    resumed = run_ranks(_train, after.world, after, small_corpus, str(tmp_path), "b", checkpoint, timeout_s=120)[0]
    assert len(whole) == 20 and len(resumed) == 10
    expected = torch.tensor(whole[10:], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(resumed, dtype=torch.float64), expected, rtol=1e-5, atol=0)
    weights_a, _, _ = load_checkpoint(tmp_path / "a" / "checkpoints" / "step-000020")
    weights_b, _, _ = load_checkpoint(tmp_path / "b" / "checkpoints" / "step-000020")
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
