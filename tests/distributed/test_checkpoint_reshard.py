"""A checkpoint saved under one plan continues under another: steps 11-20 match the uninterrupted run."""

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
    zero: int = 0
    tp: int = 1
    pp: int = 1

    def config(self, corpus: list[str], tmp: Path, *, out: str):
        return tiny_config(corpus, tmp, out=out, zero=self.zero, tp=self.tp, pp=self.pp, world=self.world)


def _train(rank: int, world: int, layout: Layout, corpus: list[str], tmp: str, out: str, resume: str | None):
    return run_training(layout.config(corpus, Path(tmp), out=out), resume=resume).losses


def _summary(rank: int, world: int, layout: Layout, corpus: list[str], tmp: str, out: str, resume: str | None):
    config = layout.config(corpus, Path(tmp), out=out)
    config.train.steps = 20 if resume is None else 1
    return run_training(config, resume=resume)


CASES = {
    "dp2->dp4": (Layout(world=2), Layout(world=4)),
    "dp4->dp2": (Layout(world=4), Layout(world=2)),
    "zero1->zero3": (Layout(world=2, zero=1), Layout(world=2, zero=3)),
    "tp2->tp1": (Layout(world=2, zero=1, tp=2), Layout(world=2, zero=1)),
    "pp2->dp2": (Layout(world=2, pp=2), Layout(world=2)),
    "zero3->tp2xpp2": (Layout(world=2, zero=3), Layout(world=4, zero=1, tp=2, pp=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_under_another_plan_matches_the_uninterrupted_run(
    small_corpus: list[str], tmp_path: Path, case: str
) -> None:
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


def test_a_sharded_checkpoint_exports_to_transformers(small_corpus: list[str], tmp_path: Path) -> None:
    """Saved under tp=2 x pp=2 with ZeRO-1 (pieces over four ranks), exported, loaded by transformers."""
    transformers = pytest.importorskip("transformers")
    from plait.checkpoint.hf_export import export_hf
    from plait.config import config_from_dict
    from plait.models.gpt import GPT
    from plait.train.setup import model_config_for

    layout = Layout(world=4, zero=1, tp=2, pp=2)
    whole = run_ranks(_summary, 4, layout, small_corpus, str(tmp_path), "a", None, timeout_s=120)[0]
    checkpoint = tmp_path / "a" / "checkpoints" / "step-000020"
    assert export_hf(checkpoint, tmp_path / "hf") == "gpt2"
    weights, _, raw_config = load_checkpoint(checkpoint)
    ours = GPT(model_config_for(config_from_dict(raw_config))).eval()
    ours.load_state_dict(weights)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-5)

    # and back: the imported weights start a ZeRO-3 run whose first validation loss is the saved run's last
    from plait.checkpoint.hf_export import import_hf

    import_hf(tmp_path / "hf", tmp_path / "imported")
    imported = str(tmp_path / "imported")
    start = run_ranks(_summary, 2, Layout(world=2, zero=3), small_corpus, str(tmp_path), "c", imported, timeout_s=120)
    assert start[0].first_val_loss == pytest.approx(whole.last_val_loss, rel=1e-5)


def _save_after_steps(rank: int, world: int, plan_kwargs: dict, path: str, preset: str) -> None:
    from tests.distributed.test_checkpoint_crash import make_engine_for, train

    engine = make_engine_for(plan_kwargs, preset=preset)
    train(engine, range(3))
    engine.save(Path(path))


def _load_and_save_again(rank: int, world: int, plan_kwargs: dict, source: str, path: str, preset: str) -> None:
    from tests.distributed.test_checkpoint_crash import make_engine_for

    engine = make_engine_for(plan_kwargs, preset=preset)
    engine.load(Path(source))
    engine.save(Path(path))


ROUND_TRIPS = {
    "bf16 zero1 dp2 -> bf16 zero3 dp4": (
        "tiny",
        {"dp": 2, "zero": 1, "precision": "bf16"},
        {"dp": 4, "zero": 3, "precision": "bf16"},
    ),
    "zero2 dp2 -> tp2 sp": ("tiny", {"dp": 2, "zero": 2}, {"dp": 1, "tp": 2, "sequence_parallel": True}),
    "tp2 zero1 dp2 -> pp2 dp2": ("tiny", {"dp": 2, "tp": 2, "zero": 1}, {"dp": 2, "pp": 2, "microbatches": 2}),
    "hf llama tp2 -> zero3 dp2": ("hf-llama", {"dp": 1, "tp": 2}, {"dp": 2, "zero": 3}),
    "hf gpt2 zero1 dp2 -> tp2 (Conv1D)": ("hf-gpt2", {"dp": 2, "zero": 1}, {"dp": 1, "tp": 2}),
    "moe ep2 x tp2 zero1 -> zero3 dp2 (tp-split experts)": (
        "mixtral-tiny",
        {"dp": 2, "tp": 2, "ep": 2, "zero": 1},
        {"dp": 2, "zero": 3},
    ),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_loading_under_another_plan_and_saving_again_changes_no_bit(tmp_path: Path, case: str) -> None:
    """Every model and optimizer tensor survives A -> B -> disk exactly (fp32 masters under bf16 too)."""
    from plait.checkpoint.io import open_checkpoint

    preset, plan_a, plan_b = ROUND_TRIPS[case]
    if preset.startswith("hf-"):
        pytest.importorskip("transformers")
    world_a, world_b = (p["dp"] * p.get("tp", 1) * p.get("pp", 1) for p in (plan_a, plan_b))
    run_ranks(_save_after_steps, world_a, plan_a, str(tmp_path / "a"), preset, timeout_s=120)
    run_ranks(_load_and_save_again, world_b, plan_b, str(tmp_path / "a"), str(tmp_path / "b"), preset, timeout_s=120)
    first, second = open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b")
    assert sorted(first.tensors) == sorted(second.tensors)
    assert any(name.startswith("optim/exp_avg_sq/") for name in first.tensors)
    for name in first.tensors:
        assert torch.equal(first.whole(name), second.whole(name)), name
