"""BERT, ALBERT and T5 (transformers' classes) on their pre-training tasks under plait's plans, against
one plain process: fp32, 20 steps, losses within 1e-5 relative, final weights allclose(1e-5, 1e-6)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import plait
from plait.models.language import build_language, language_task_kind
from plait.tasks.masked_lm import MaskedLM, SentenceOrderMLM
from plait.tasks.span_corruption import SpanCorruption
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import assert_parity

pytestmark = pytest.mark.timeout(240)

STEPS = 20
GLOBAL_BATCH = 8
SEQ = 24
VOCAB = 60  # the corpus's; the models add their special tokens (BERT: 64, T5: 162)
TASKS = {"masked_lm": MaskedLM, "masked_lm_sop": SentenceOrderMLM, "span_corruption": SpanCorruption}


def task_of(preset: str):
    return TASKS[language_task_kind(preset)](vocab_size=VOCAB, seed=5)


@functools.cache
def global_batches(preset: str) -> list[dict[str, torch.Tensor]]:
    """The task's batches of random corpus rows, each at its global position (as plait's loader reads them)."""
    task = task_of(preset)
    rows = torch.from_numpy(np.random.default_rng(11).integers(1, VOCAB, size=(STEPS, GLOBAL_BATCH, SEQ)))
    rows = rows[:, :, : task.sample_tokens(SEQ)]
    return [task.make_batch(rows[s], np.arange(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)) for s in range(STEPS)]


def fresh_model(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_language(preset, vocab_size=VOCAB, max_positions=SEQ)


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, eps=1e-6, weight_decay=0.1)


def scheduler(opt):
    return plait.optim.warmup_poly(opt, warmup=3, total=STEPS)


def train_plan(rank: int, world_size: int, preset: str, plan: dict) -> tuple[list[float], dict]:
    engine = plait.boost(
        fresh_model(preset),
        optimizer=optimizer,
        loss_fn=task_of(preset).loss_fn,
        plan=plait.Plan(bucket_mb=0.01, **plan),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    if plan.get("tp", 1) > 1:  # the layers really are split
        assert any(type(module).__name__ == "ColumnParallelLinear" for module in engine.model.modules())
    if plan.get("pp", 1) > 1:
        assert engine.pipeline is not None
    per_rank = GLOBAL_BATCH // engine.dp_size
    shard = slice(engine.dp_rank * per_rank, (engine.dp_rank + 1) * per_rank)
    batches = global_batches(preset)
    losses = [engine.train_step({k: v[shard] for k, v in batch.items()}).loss.item() for batch in batches]
    return losses, engine.model_state_dict()


@functools.cache
def reference(preset: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = fresh_model(preset)
    losses = train_reference(
        model,
        global_batches(preset),
        optimizer=optimizer,
        loss_fn=task_of(preset).loss_fn,
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return losses, model.state_dict()


PLANS = {
    "dp2-zero3": {"dp": 2, "zero": 3},
    "dp2-zero2": {"dp": 2, "zero": 2},
    "dp2-zero2-recompute": {"dp": 2, "zero": 2, "recompute": "full"},
    "tp2": {"dp": 1, "tp": 2},
    "pp2": {"dp": 1, "pp": 2, "microbatches": 4, "pp_schedule": "1f1b"},
}
CASES = [
    ("bert-tiny", "dp2-zero3"),
    ("bert-tiny", "tp2"),
    ("bert-tiny", "pp2"),
    ("bert-tiny", "dp2-zero2-recompute"),
    ("albert-tiny", "dp2-zero3"),
    ("albert-tiny", "tp2"),
    ("albert-tiny", "dp2-zero2-recompute"),
    ("t5-tiny", "dp2-zero2"),
    ("t5-tiny", "dp2-zero3"),
    ("t5-tiny", "dp2-zero2-recompute"),
]


@pytest.mark.parametrize(("preset", "plan"), CASES)
def test_plan_matches_one_process(preset: str, plan: str) -> None:
    results = run_ranks(train_plan, 2, preset, PLANS[plan], timeout_s=150)
    losses = reference(preset)[0]
    assert losses[-1] < losses[0]  # it learns: the comparison is not between two idle runs
    assert_parity(results, reference(preset))


@pytest.mark.parametrize(
    ("preset", "plan", "reason"),
    [
        (
            "albert-tiny",
            "pp2",
            r"pipeline parallelism cannot split AlbertForPreTraining: ALBERT calls one shared group",
        ),
        ("t5-tiny", "pp2", r"pipeline parallelism is not available for T5ForConditionalGeneration.*encoder-decoder"),
        ("t5-tiny", "tp2", r"tensor parallelism is not available for T5ForConditionalGeneration.*relative position"),
    ],
)
def test_plans_that_cannot_split_the_family_are_refused_with_the_reason(preset: str, plan: str, reason: str) -> None:
    """What the engine calls first under pp (the layout) and tp (the plan) refuses, before any collective."""
    from plait.pipeline.partition import decoder_layout
    from plait.tensor.hf import check_tp

    model = fresh_model(preset)
    with pytest.raises(ValueError, match=reason):
        decoder_layout(model) if plan == "pp2" else check_tp(model, 2)
