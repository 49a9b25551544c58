"""`plait train` continuing a pretrained transformers directory (a tiny random Qwen2 with its own
tokenizer) on 2 ranks: the first step's loss is the model's own loss on the same batch
(`AutoModelForCausalLM.from_pretrained(dir)(..., labels=...)`), a checkpoint resumes exactly,
and it exports and samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from plait.config import Config, load_config
from plait.tensor import gather_vocab_logits, is_vocab_sharded
from plait.train.loop import Run
from tests.distributed.harness import run_ranks
from tests.pretrained_dirs import TOKENIZER_VOCAB, save_tiny_pretrained

transformers = pytest.importorskip("transformers")

SEQ, GLOBAL_BATCH = 16, 4
PLANS = {
    "dp2-zero3": ("plan.dp=2", "plan.zero=3"),
    "tp2": ("plan.dp=1", "plan.tp=2"),
    "pp2": ("plan.dp=1", "plan.pp=2", "plan.microbatches=2"),
    "tp2-sp": ("plan.dp=1", "plan.tp=2", "plan.sequence_parallel=true"),
}


@dataclass(frozen=True)
class Setup:
    directory: Path
    corpus: list[str]
    cache_dir: Path
    first_loss: float  # the model's own (HF) loss on the run's first global batch


def run_config(setup: Setup, out: Path, plan: tuple[str, ...], *, steps: int) -> Config:
    config = load_config(
        None,
        [
            f"model.pretrained='{setup.directory}'",
            f"data.seq_len={SEQ}",
            "data.val_fraction=0.1",
            f"data.cache_dir='{setup.cache_dir}'",
            f"train.global_batch={GLOBAL_BATCH}",
            f"train.steps={steps}",
            "train.lr=1e-3",
            "train.warmup=1",
            "train.eval_every=100",
            "train.eval_batches=1",
            "train.checkpoint_every=2",
            f"train.out_dir='{out}'",
            *plan,
        ],
    )
    config.data.corpus = setup.corpus
    return config


def first_batch(config: Config) -> dict[str, torch.Tensor]:
    """Step 1's global batch: the loader walks one seeded global order, whatever the plan."""
    from plait.checkpoint.hf_pretrained import inspect_pretrained
    from plait.data.loader import ShardedLoader, TokenDataset
    from plait.train.setup import prepare_data

    data = prepare_data(config, pretrained=inspect_pretrained(config.model.pretrained or ""))
    dataset = TokenDataset(data.train_path, dtype=data.dtype, seq_len=config.data.seq_len)
    loader = ShardedLoader(
        dataset, global_batch=config.train.global_batch, dp_rank=0, dp_size=1, seed=config.train.seed
    )
    return loader.next_batch()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, small_corpus: list[str]) -> Setup:
    root = tmp_path_factory.mktemp("pretrained-run")
    directory = save_tiny_pretrained(root / "qwen2", small_corpus[:8])
    partial = Setup(directory=directory, corpus=small_corpus[8:16], cache_dir=root / "cache", first_loss=0.0)
    batch = first_batch(run_config(partial, root / "unused", (), steps=1))  # also fills the data cache
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    return Setup(directory=directory, corpus=partial.corpus, cache_dir=partial.cache_dir, first_loss=loss)


def probe_ids() -> torch.Tensor:
    return torch.randint(0, TOKENIZER_VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))


def train(rank: int, world_size: int, config: Config, resume: str | None) -> tuple[list[float], torch.Tensor | None]:
    """The run's losses and, without pp, its model's logits on probe_ids() (gathered under tp)."""
    run = Run(config, resume=resume)
    losses = run.run().losses
    if config.plan.pp > 1:
        return losses, None
    run.engine.model.eval()
    with torch.no_grad():
        logits = run.engine.model(input_ids=probe_ids()).logits
    return losses, gather_vocab_logits(logits) if is_vocab_sharded(logits) is not None else logits


def assert_first_loss(losses: list[float], setup: Setup) -> None:
    assert losses[0] == pytest.approx(setup.first_loss, rel=1e-5, abs=0)


@pytest.mark.parametrize("plan", ["pp2", "tp2-sp"])
def test_first_step_loss_is_the_models_own(plan: str, setup: Setup, tmp_path: Path) -> None:
    """(dp2-zero3 and tp2 check theirs below.)"""
    results = run_ranks(train, 2, run_config(setup, tmp_path / "run", PLANS[plan], steps=2), None, timeout_s=90)
    for losses, _ in results:
        assert_first_loss(losses, setup)
        assert losses == results[0][0]


def test_zero3_run_resumes_exactly(setup: Setup, tmp_path: Path) -> None:
    whole = run_ranks(train, 2, run_config(setup, tmp_path / "whole", PLANS["dp2-zero3"], steps=4), None, timeout_s=90)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-000002"
    resumed_config = run_config(setup, tmp_path / "resumed", PLANS["dp2-zero3"], steps=4)
    resumed = run_ranks(train, 2, resumed_config, str(checkpoint), timeout_s=90)
    for (all_losses, logits), (later_losses, resumed_logits) in zip(whole, resumed, strict=True):
        assert_first_loss(all_losses, setup)
        assert later_losses == all_losses[2:]  # bit-identical
        assert torch.equal(logits, resumed_logits)


def test_tp2_checkpoint_exports_and_samples(setup: Setup, tmp_path: Path) -> None:
    from plait.checkpoint.hf_export import export_hf
    from plait.train.generate import generate_text

    results = run_ranks(train, 2, run_config(setup, tmp_path / "run", PLANS["tp2"], steps=2), None, timeout_s=90)
    for losses, _ in results:
        assert_first_loss(losses, setup)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert export_hf(checkpoint, tmp_path / "hf") == "qwen2"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = theirs(input_ids=probe_ids()).logits
    for _, logits in results:
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    original = transformers.AutoTokenizer.from_pretrained(setup.directory)
    assert tokenizer("def f(x): pass")["input_ids"] == original("def f(x): pass")["input_ids"]
    text = generate_text(checkpoint, prompt="def ", max_new_tokens=5, temperature=0.8, top_k=20, seed=0)
    assert text.startswith("def ") and len(text) > len("def ")
