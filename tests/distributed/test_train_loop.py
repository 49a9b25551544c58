"""The training loop end to end on 2 ranks: exact resume, and the CLI's parity oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.config import load_config
from plait.train.loop import run_training
from tests.distributed.harness import run_ranks


def tiny_config(
    corpus: list[str],
    tmp: Path,
    *,
    out: str,
    steps: int = 20,
    zero: int = 0,
    tp: int = 1,
    pp: int = 1,
    world: int = 2,
    extra: tuple[str, ...] = (),
):
    overrides = [
        f"plan.pp={pp}",
        f"plan.microbatches={2 if pp > 1 else 1}",
        f"plan.zero={zero}",
        f"plan.tp={tp}",
        f"plan.sequence_parallel={str(tp > 1).lower()}",
        "model.preset=tiny",
        "data.vocab_size=512",
        "data.seq_len=32",
        "data.val_fraction=0.1",
        f"data.cache_dir='{tmp / 'cache'}'",
        f"plan.dp={world // tp // pp}",
        f"train.steps={steps}",
        "train.global_batch=8",
        "train.lr=1e-3",
        "train.warmup=3",
        "train.eval_every=5",
        "train.eval_batches=2",
        "train.log_every=5",
        "train.checkpoint_every=10",
        f"train.out_dir='{tmp / out}'",
        *extra,
    ]
    config = load_config(None, overrides)
    config.data.corpus = corpus
    return config


def train_then_resume(
    rank: int, world_size: int, corpus: list[str], tmp: str, zero: int, tp: int, pp: int, asynchronous: bool
):
    tmp_path = Path(tmp)
    extra = (f"train.async_checkpoints={str(asynchronous).lower()}",)
    whole = run_training(tiny_config(corpus, tmp_path, out="whole", zero=zero, tp=tp, pp=pp, extra=extra))
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-000010"
    config = tiny_config(corpus, tmp_path, out="resumed", zero=zero, tp=tp, pp=pp, extra=extra)
    resumed = run_training(config, resume=str(checkpoint))
    return whole.losses, resumed.losses, whole.first_val_loss, whole.last_val_loss


@pytest.mark.parametrize(
    ("zero", "tp", "pp", "asynchronous"), [(0, 1, 1, False), (3, 1, 1, True), (1, 2, 1, False), (0, 1, 2, True)]
)
def test_resume_continues_with_identical_losses(
    small_corpus: list[str], tmp_path: Path, zero: int, tp: int, pp: int, asynchronous: bool
) -> None:
    """Bit-identical steps 11-20, with checkpoints written synchronously or from the background thread."""
    results = run_ranks(train_then_resume, 2, small_corpus, str(tmp_path), zero, tp, pp, asynchronous, timeout_s=120)
    for whole, resumed, first_val, last_val in results:
        assert len(whole) == 20 and len(resumed) == 10
        assert resumed == whole[10:]  # bit-identical, not merely close
        assert last_val < first_val
    assert (tmp_path / "whole" / "loss.png").stat().st_size > 0
    rows = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 21  # header, the step-0 validation row, 20 steps


def test_checkpoint_holds_each_ranks_pieces_once(small_corpus: list[str], tmp_path: Path) -> None:
    from plait.checkpoint.io import load_checkpoint, open_checkpoint

    run_ranks(lambda r, w: run_training(tiny_config(small_corpus, tmp_path, out="a", steps=10, zero=2)) and None, 2)
    path = tmp_path / "a" / "checkpoints" / "step-000010"
    model_state, trainer_state, config = load_checkpoint(path)
    assert trainer_state["step"] == 10 and len(trainer_state["rng"]) == 2
    assert trainer_state["loader"]["offset"] == 10 * 8
    assert config["plan"]["dp"] == 2 and config["plan"]["zero"] == 2
    reader = open_checkpoint(path)
    assert sorted(reader.manifest["files"]) == [
        "config.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "trainer.pt",
    ]
    for name in ("model/embed.weight", "optim/exp_avg/embed.weight", "optim/exp_avg_sq/blocks.0.attn.q_proj.weight"):
        pieces = reader.tensors[name]["pieces"]
        covered = sum(p["flat"][1] - p["flat"][0] for p in pieces)  # ZeRO-2: flat ranges over dp, no overlap
        assert covered == torch.Size(reader.tensors[name]["shape"]).numel()
    assert reader.tensors["optim/step/embed.weight"]["shape"] == []
    assert model_state["embed.weight"].shape == (512, 64)
    assert model_state["lm_head.weight"] is model_state["embed.weight"]  # tied: stored once
    assert all(torch.isfinite(t).all() for t in model_state.values())


def test_verify_and_generate_from_the_command_line(small_corpus: list[str], tmp_path: Path) -> None:
    """`plait verify` launches 2 ranks through torchrun, checks them against one process and keeps the
    plan's run where it says; `plait generate` reads that run's last checkpoint."""
    import subprocess
    import sys

    from plait.train.logs import read_metrics
    from plait.train.loop import LOG_FILE

    config = tmp_path / "c.toml"
    corpus = ", ".join(f"'{p}'" for p in small_corpus)
    config.write_text(
        f'[model]\npreset = "tiny"\n[data]\ncorpus = [{corpus}]\nseq_len = 32\nvocab_size = 512\nval_fraction = 0.1\n'
        f"cache_dir = '{tmp_path / 'cache'}'\n[plan]\ndp = 2\nmicrobatches = 2\n"
        f"[train]\nsteps = 6\nglobal_batch = 8\nlr = 1e-3\nwarmup = 2\neval_batches = 2\n"
        f"out_dir = '{tmp_path / 'run'}'\n"
    )
    verify = subprocess.run(
        [sys.executable, "-m", "plait.cli", "verify", str(config)], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0, verify.stderr[-3000:]
    assert "PASS: worst relative difference" in verify.stdout
    assert len([line for line in verify.stdout.splitlines() if line.strip()[:1].isdigit()]) == 6
    kept = tmp_path / "run-verify"  # the default: next to the config's out_dir
    assert f"is in {kept}" in verify.stdout
    assert len(read_metrics(kept / "metrics.csv")) == 1 + 6  # the step-0 validation row, 6 steps
    assert "done: 6 steps" in (kept / LOG_FILE).read_text()
    checkpoint = kept / "checkpoints" / "step-000006"
    assert (checkpoint / "manifest.json").is_file()
    generate = subprocess.run(
        [sys.executable, "-m", "plait.cli", "generate", str(checkpoint), "--prompt", "def ", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert generate.returncode == 0, generate.stderr[-3000:]
    assert generate.stdout.startswith("def ") and len(generate.stdout) > len("def \n")
