"""plait's console log follows sys.stderr: swapping or closing it between runs in one process loses nothing."""

from __future__ import annotations

import io
import sys

import pytest

from plait.distributed.launch import get_logger


def test_console_log_writes_to_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logger = get_logger("plait.test_console")
    logger.info("first run")
    first.close()  # what pytest's capture does to a finished test's stream
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logger.info("second run")
    assert "[rank 0] second run" in second.getvalue()
