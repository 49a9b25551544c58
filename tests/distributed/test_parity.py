"""Data parallel and ZeRO 1-3 against one plain process: same losses every step, same final weights."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

import plait
from plait.models import build
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks

STEPS = 20
GLOBAL_BATCH = 16
SEQ = 16


def make_batches(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    """Random tokens from the first quarter of the vocabulary.

    A token seen once in 20 steps gets one tiny embedding gradient whose
    float noise (GEMM blocking differs with the batch shape) Adam turns into
    lr-sized steps: torch DDP misses atol 1e-6 on such rows just as plait
    does. Drawing from fewer ids keeps every row used seen every few steps,
    as in real text.
    """
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab_size // 4, (STEPS, GLOBAL_BATCH, SEQ), generator=gen)
    labels = tokens.clone()
    labels[:, :, :3] = -100  # uneven token counts per rank exercise the global-token normalisation
    labels[1::2, : GLOBAL_BATCH // 2, 3:6] = -100
    return [{"input_ids": tokens[s], "labels": labels[s]} for s in range(STEPS)]


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, eps=1e-6, weight_decay=0.1)


def scheduler(opt):
    return plait.optim.warmup_cosine(opt, warmup=3, total=STEPS)


def fresh_model(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(preset, max_seq_len=SEQ)


def train_plan(rank: int, world_size: int, preset: str, microbatches: int, zero: int = 0, reduce_op: str = "auto"):
    model = fresh_model(preset)
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=world_size, microbatches=microbatches, bucket_mb=0.01, zero=zero, reduce_op=reduce_op),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return train_every_step(engine, model.config.vocab_size)


def shard_of(batch: dict[str, torch.Tensor], engine: plait.Engine) -> dict[str, torch.Tensor]:
    """This dp rank's slice of a global batch."""
    per_rank = GLOBAL_BATCH // engine.dp_size
    return {k: v[engine.dp_rank * per_rank : (engine.dp_rank + 1) * per_rank] for k, v in batch.items()}


def train_every_step(engine: plait.Engine, vocab_size: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train on every test batch; the loss of each step and the final whole weights."""
    losses = [engine.train_step(shard_of(batch, engine)).loss.item() for batch in make_batches(vocab_size)]
    return losses, engine.model_state_dict()


def reference_run(preset: str | Callable[[], torch.nn.Module]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One plain process on the same batches; `preset` names a model or builds one. A deterministic run
    that ~90 parity cases repeat: computed once per preset or builder, each caller gets its own copy."""
    losses, state = _reference_once(preset)
    return list(losses), {name: value.clone() for name, value in state.items()}


@functools.cache
def _reference_once(preset: str | Callable[[], torch.nn.Module]) -> tuple[list[float], dict[str, torch.Tensor]]:
    reference = fresh_model(preset) if isinstance(preset, str) else preset()
    losses = train_reference(
        reference,
        make_batches(reference.config.vocab_size),
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return losses, reference.state_dict()


def assert_parity(results: list, reference: tuple[list[float], dict[str, torch.Tensor]]) -> None:
    ref_losses, ref_state = reference
    for losses, state in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        assert state.keys() == ref_state.keys()
        for name, value in ref_state.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=f"weight {name}")


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize(("world_size", "microbatches"), [(2, 1), (2, 4), (4, 1), (4, 2)])
def test_data_parallel_matches_one_process(world_size: int, microbatches: int, preset: str) -> None:
    assert_parity(run_ranks(train_plan, world_size, preset, microbatches), reference_run(preset))


@pytest.mark.parametrize("zero", [1, 2, 3])
@pytest.mark.parametrize(("world_size", "microbatches"), [(2, 1), (2, 4), (4, 1), (4, 4)])
def test_zero_matches_one_process(zero: int, world_size: int, microbatches: int) -> None:
    assert_parity(run_ranks(train_plan, world_size, "tiny", microbatches, zero), reference_run("tiny"))


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_with_reduce_scatter_and_llama_options(zero: int) -> None:
    results = run_ranks(train_plan, 2, "tiny-llama", 2, zero, "reduce_scatter")
    assert_parity(results, reference_run("tiny-llama"))
