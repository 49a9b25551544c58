"""The README's "Using it" example, exactly as written, under `plait run --nproc-per-node 2`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"

# The example iterates a `loader` it leaves to the reader: a few short batches of this rank's share.
PRELUDE = """\
import os, torch
_generator = torch.Generator().manual_seed(int(os.environ["RANK"]))  # each rank its own data shard
loader = []
for _ in range(3):
    _ids = torch.randint(0, 256, (2, 16), generator=_generator)
    loader.append({"input_ids": _ids, "labels": _ids})
"""
POSTLUDE = """
import json
print("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), "dp_size": engine.dp_size,
                              "steps": engine.steps_done, "loss": result.loss.item()}))
"""


def readme_example() -> str:
    """The first ```python block under the "## Using it" heading."""
    text = README.read_text()
    section = text[text.index("## Using it") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_readme_example_trains_data_parallel_under_plait_run(tmp_path: Path) -> None:
    script = tmp_path / "my_script.py"
    script.write_text(PRELUDE + readme_example() + POSTLUDE)
    env = {**os.environ, "PET_MASTER_PORT": str(free_port())}  # torchrun's --master-port, off the shared default
    run = subprocess.run(
        [sys.executable, "-m", "plait.cli", "run", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # both ranks print to one pipe: a line may hold the other rank's result too
    results = [json.loads(found) for found in re.findall(r"RESULT (\{[^}]*\})", run.stdout)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["dp_size"] == 2 and r["steps"] == 3 for r in results)  # one group of 2, not 2 lone processes
    assert results[0]["loss"] == results[1]["loss"] and 0 < results[0]["loss"] < 20  # the global batch's loss
