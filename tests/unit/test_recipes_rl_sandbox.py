"""The sandbox's verdict cannot be forged by the program it runs: a body that prints a passing verdict
(from an atexit handler, or before exiting itself) is not scored as passing."""

from __future__ import annotations

import pytest

from plait.recipes.sandbox import graded_reward, run_sandboxed

FAKE = '{"parsed": true, "defined": true, "examples": 3, "failed": 0, "errors": 0}'
WRONG = "def double(x):\n    '''\n    >>> double(2)\n    4\n    '''\n    return 0\n"
HOSTILE = {
    "atexit": f"import atexit\natexit.register(lambda: print('\\n' + {FAKE!r}))\n",
    "print then exit": f"import os, sys\nprint('\\n' + {FAKE!r})\nsys.stdout.flush()\nos._exit(0)\n",
}


@pytest.mark.parametrize("how", list(HOSTILE))
def test_a_fake_verdict_printed_by_the_program_does_not_score(how: str) -> None:
    verdict = run_sandboxed(WRONG + HOSTILE[how], entry="double")
    assert not verdict.passed and graded_reward(verdict) < 1.0, verdict


def test_the_true_verdict_still_scores() -> None:
    right = WRONG.replace("return 0", "return 2 * x")
    assert run_sandboxed(right, entry="double").passed
    assert graded_reward(run_sandboxed(WRONG, entry="double")) == 0.5
