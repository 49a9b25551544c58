"""The sandbox's verdict cannot be forged by the program it runs: a body that prints a passing verdict
(from an atexit handler, or before exiting itself) is not scored as passing."""

from __future__ import annotations

from pathlib import Path

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


def test_cached_verified_tasks_equal_fresh_ones_and_follow_the_corpus(tmp_path: Path) -> None:
    from plait.recipes.data.verifiable import cached_verified_tasks, corpus_tasks, verified
    from plait.recipes.sandbox import SandboxLimits

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):  # double0 and triple0..5; double0's doctest is wrong, so it is not verified
        wrong = "5" if i == 0 else str(2 * i)
        (corpus / f"m{i}.py").write_text(
            f"def double{i}(x):\n    '''\n    >>> double{i}({i})\n    {wrong}\n    '''\n    return 2 * x\n\n\n"
            f"def triple{i}(x):\n    '''\n    >>> triple{i}(1)\n    3\n    '''\n    return 3 * x\n"
        )
    args = {"split": "train", "val_fraction": 0.3, "limits": SandboxLimits(), "cache_dir": tmp_path / "cache"}
    fresh = verified(corpus_tasks(str(corpus), split="train", val_fraction=0.3), limits=SandboxLimits())
    built = cached_verified_tasks(str(corpus), **args)
    files = list((tmp_path / "cache" / "verifiable").glob("*.json"))
    assert built == fresh and len(files) == 1 and 0 < len(fresh) < 12
    assert cached_verified_tasks(str(corpus), **args) == fresh  # read back from the file
    (corpus / "m5.py").write_text((corpus / "m5.py").read_text().replace("3 * x", "x + x + x"))
    rebuilt = cached_verified_tasks(str(corpus), **args)  # another corpus: another key, built again
    assert len(list((tmp_path / "cache" / "verifiable").glob("*.json"))) == 2
    assert rebuilt == verified(corpus_tasks(str(corpus), split="train", val_fraction=0.3), limits=SandboxLimits())
