"""What a run leaves behind for its user: every rank's log file and a resumed run's summary (verify's kept
run: test_train_loop's command-line test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from plait.train.logs import read_metrics
from plait.train.loop import LOG_FILE, run_training, summary_line
from tests.distributed.harness import run_ranks
from tests.distributed.test_train_loop import tiny_config

EVERY_2 = ("train.eval_every=2", "train.log_every=2", "train.checkpoint_every=2")


def train_then_resume(rank: int, world_size: int, corpus: list[str], tmp: str) -> list[tuple[int, float | None, str]]:
    tmp_path = Path(tmp)
    whole = run_training(tiny_config(corpus, tmp_path, out="whole", steps=4, extra=EVERY_2))
    resumed = run_training(
        tiny_config(corpus, tmp_path, out="resumed", steps=4, extra=EVERY_2),
        resume=str(tmp_path / "whole" / "checkpoints" / "step-000002"),
    )
    return [(s.start_step, s.first_val_loss, summary_line(s)) for s in (whole, resumed)]


def test_every_rank_logs_to_a_file_and_a_resumed_summary_starts_from_its_validation_loss(
    small_corpus: list[str], tmp_path: Path
) -> None:
    results = run_ranks(train_then_resume, 2, small_corpus, str(tmp_path), timeout_s=120)
    log = (tmp_path / "whole" / LOG_FILE).read_text().splitlines()
    for rank in (0, 1):  # each rank's own metrics line (its memory and bytes sent) and mesh
        assert any(f"[rank {rank}] step 4/4 | loss" in line for line in log)
        assert any(f"[rank {rank}] Mesh(" in line for line in log)
    assert any("[rank 0] done: 4 steps" in line for line in log)
    whole_val_at_2 = next(
        row["val_loss"] for row in read_metrics(tmp_path / "whole" / "metrics.csv") if row["step"] == 2
    )
    for (whole_start, _, whole_line), (start, first_val, line) in results:
        assert whole_start == 0 and f"every rank's log in {tmp_path / 'whole' / LOG_FILE}" in whole_line
        assert start == 2 and first_val == pytest.approx(whole_val_at_2, rel=1e-5)  # the loaded weights' loss
        assert f"validation loss {first_val:.4f} (resumed at step 2) -> " in line and "?" not in line
    assert "[rank 1] step 4/4" in (tmp_path / "resumed" / LOG_FILE).read_text()
