"""Bad input gets a one-line error with the fix, a non-zero exit, no traceback, and no process group."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from plait.cli import main

TINY = ["--set", "model.preset=tiny", "--set", "data.seq_len=32", "--set", "train.global_batch=8"]

BAD_INPUTS = {
    "degrees vs world": (["--nproc", "4", "--set", "plan.dp=2"], "but the world size is 4"),
    "unknown preset": (["--set", "model.preset=gpt5"], "unknown model preset 'gpt5'"),
    "seq too long": (["--set", "data.seq_len=4096"], "longer than the model's max_seq_len"),
    "missing corpus": (["--set", "data.corpus=['/no/such/file.txt']"], "does not exist"),
    "negative lr": (["--set", "train.lr=-0.1"], "learning rate must be positive"),
    "microbatches": (["--set", "plan.dp=2", "--set", "plan.microbatches=3"], "plan.microbatches=3 does not divide"),
    "unknown key": (["--set", "train.step=3"], "unknown key train.step"),
    "unknown section": (["--set", "trainer.steps=3"], "unknown section 'trainer'"),
    "cp not built": (["--set", "plan.cp=2", "--set", "plan.dp=1"], "cp parallel is not available yet"),
    "pp microbatches": (["--set", "plan.pp=2", "--set", "plan.dp=1"], "plan.microbatches=1 is fewer than plan.pp=2"),
    "pp layers": (
        ["--nproc", "4", "--set", "plan.pp=4", "--set", "plan.dp=1", "--set", "plan.microbatches=4"],
        "4 stages but the model has 2 layers",
    ),
    "pp zero": (
        ["--set", "plan.pp=2", "--set", "plan.dp=1", "--set", "plan.zero=2", "--set", "plan.microbatches=2"],
        "composes with ZeRO stage 0 or 1",
    ),
    "tp heads": (
        ["--nproc", "3", "--set", "plan.tp=3", "--set", "plan.dp=1"],
        "model.num_heads=4 is not divisible by plan.tp=3; use plan.tp in [1, 2, 4]",
    ),
    "zero stage": (["--set", "plan.zero=4"], "ZeRO stages are 0, 1, 2 or 3"),
    "offload dir missing": (
        ["--set", "plan.zero=3", "--set", "plan.offload_optimizer=disk", "--set", "plan.offload_dir=/no/such/dir"],
        "plan.offload_dir=/no/such/dir does not exist; create it",
    ),
    "offload budget": (
        ["--set", "plan.zero=3", "--set", "plan.memory_budget=1KiB", "--set", "plan.offload_dir=/tmp"],
        "raise plan.memory_budget to at least",
    ),
    "offload params zero": (
        ["--set", "plan.zero=1", "--set", "plan.offload_params=cpu", "--set", "plan.offload_optimizer=cpu"],
        "plan.offload_params='cpu' needs plan.zero=3",
    ),
    "precision": (["--set", "plan.precision=fp8"], "choose one of fp32, bf16, fp16"),
    "batch vs dp": (["--set", "plan.dp=2", "--set", "train.global_batch=7"], "does not split over dp=2"),
    "heads": (["--set", "model.num_heads=5"], "num_heads"),
    "bad model field": (["--set", "model.hidden=5"], "unknown GPTConfig field"),
    "bad value type": (["--set", "plan.dp=two"], "expected a int"),
    "vocab": (["--set", "data.vocab_size=100"], "more than 256 tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_fast_with_the_fix(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra, message = BAD_INPUTS[case]
    code = main(["train", *TINY, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("plait train: error: ")
    assert message in err, err
    assert not dist.is_initialized()


def test_missing_config_file_and_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", str(tmp_path / "nope.toml")]) == 2
    assert main(["train", *TINY, "--resume", str(tmp_path / "nope")]) == 2
    assert main(["generate", str(tmp_path / "nope")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all("error:" in line for line in lines)


def test_console_script_exits_nonzero_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", "--nproc", "2", "--set", "plan.dp=4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "launch 4 ranks" in result.stderr


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        ({"preset": "gpt-10m"}, "the checkpoint holds another model (model.preset differ)"),
        ({"precision": "fp16"}, "saved with precision=fp16, this run uses fp32"),
    ],
)
def test_resume_of_another_model_or_precision_is_refused_before_launch(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, saved: dict, message: str
) -> None:
    """Another plan is fine (the checkpoint reshards); another model or loss-scale regime is not."""
    import dataclasses
    import json

    from plait.config import load_config

    config = dataclasses.asdict(load_config(None, [TINY[1], TINY[3], TINY[5]]))
    config["model"]["preset"] = saved.get("preset", config["model"]["preset"])
    config["plan"]["precision"] = saved.get("precision", "fp32")
    checkpoint = tmp_path / "step-000010"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(config))
    code = main(["train", *TINY, "--nproc", "4", "--set", "plan.zero=2", "--resume", str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
