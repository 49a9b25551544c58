"""`plait train --plan auto`: the planner calibrates this machine, picks the plan, and the ranks train with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_train_with_the_planners_plan(small_corpus: list[str], tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    corpus = ", ".join(f"'{p}'" for p in small_corpus)
    config.write_text(
        f'[model]\npreset = "tiny"\n[data]\ncorpus = [{corpus}]\nseq_len = 32\nvocab_size = 512\nval_fraction = 0.1\n'
        f"cache_dir = '{tmp_path / 'cache'}'\n"
        f"[train]\nsteps = 3\nglobal_batch = 8\nlr = 1e-3\nwarmup = 1\neval_batches = 1\neval_every = 3\n"
        f"checkpoint_every = 3\nout_dir = '{tmp_path / 'run'}'\n"
    )
    train = subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", str(config), "--nproc", "2", "--plan", "auto"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    best = next(line for line in train.stdout.splitlines() if line.startswith("best: "))
    chosen = best.removeprefix("best: ").split(":")[0].split()
    assert "dp1" in chosen or "dp2" in chosen
    assert (tmp_path / "run" / "checkpoints" / "step-000003").is_dir()


def test_train_with_a_plan_string(small_corpus: list[str], tmp_path: Path) -> None:
    """`--plan "KEY=VALUE ..."` replaces the config's [plan]: the ranks train ZeRO-1 with two micro-batches."""
    config = tmp_path / "c.toml"
    corpus = ", ".join(f"'{p}'" for p in small_corpus)
    config.write_text(
        f'[model]\npreset = "tiny"\n[data]\ncorpus = [{corpus}]\nseq_len = 32\nvocab_size = 512\nval_fraction = 0.1\n'
        f"cache_dir = '{tmp_path / 'cache'}'\n[plan]\nzero = 3\n"
        f"[train]\nsteps = 2\nglobal_batch = 8\nlr = 1e-3\nwarmup = 1\neval_batches = 1\neval_every = 2\n"
        f"checkpoint_every = 2\nout_dir = '{tmp_path / 'run'}'\n"
    )
    plan = "dp=2 tp=1 pp=1 zero=1 microbatches=2 recompute=none"
    train = subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", str(config), "--nproc", "2", "--plan", plan],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    saved = (tmp_path / "run" / "checkpoints" / "step-000002").rglob("*.json")
    text = "\n".join(path.read_text() for path in saved)
    assert '"zero": 1' in text and '"microbatches": 2' in text, text[:2000]
